"""Who may use the inspector and what a browser may do with its pages.

Every request needs credentials (basic auth or a bearer token, `WebSettings`), compared in
constant time; without them, 401 with a basic-auth challenge. Every POST also needs the CSRF token
(header ``X-CSRF-Token``): the page carries it, a script gets it from ``GET /api/csrf``. A browser
replays basic auth on its own, so a forged form from another site would otherwise pass. Every
response carries headers that forbid framing, inline scripts and loading anything from elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runctx.web.settings import WebSettings

CSRF_HEADER = "X-CSRF-Token"
REALM = 'Basic realm="runctx", charset="UTF-8"'
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Guard:
    """Owns the credentials and the secret the CSRF tokens are made from (new at every start)."""

    def __init__(self, settings: WebSettings) -> None:
        self.user = settings.user
        self.secrets = [value for value in (settings.password, settings.token) if value]
        self.token = settings.token
        self._csrf_key = secrets.token_bytes(32)

    def identity(self, request: Request) -> str | None:
        """Who the request's credentials name, or None when they are missing or wrong."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return "token"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            matches = [hmac.compare_digest(password.encode(), secret.encode()) for secret in self.secrets]
            if hmac.compare_digest(user.encode(), self.user.encode()) and any(matches):
                return f"user:{user}"
        return None

    def csrf_token(self, identity: str) -> str:
        return hmac.new(self._csrf_key, identity.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, identity: str) -> bool:
        given = request.headers.get(CSRF_HEADER, "")
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf_token(identity).encode())


class GuardMiddleware(BaseHTTPMiddleware):
    """Authentication and CSRF on every request, security headers on every response."""

    def __init__(self, app, guard: Guard) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.guard = guard

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        identity = self.guard.identity(request)
        if identity is None:
            response: Response = JSONResponse(
                {"error": "authentication required (basic auth or a bearer token)"}, status_code=401,
                headers={"WWW-Authenticate": REALM},
            )
        elif request.method not in ("GET", "HEAD", "OPTIONS") and not self.guard.csrf_ok(request, identity):
            response = JSONResponse({"error": f"a POST needs the CSRF token in the {CSRF_HEADER} header"}, status_code=403)
        else:
            request.state.identity = identity
            response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response
