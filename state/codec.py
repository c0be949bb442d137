"""The one place where contexts and configurations become bytes for L2 and documents for L3.

Every tier goes through a ``Codec``; encryption of sensitive values at rest slots in by
transforming documents in ``to_document`` / ``from_document``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from state.errors import ContextCorruption
from state.limits import canonical_json
from state.models import RunContext


def checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class Codec:
    """JSON only, so nothing stored can execute code when it is read."""

    def to_document(self, ctx: RunContext, *, with_applied: bool = True) -> dict[str, Any]:
        return ctx.model_dump(mode="json", exclude=None if with_applied else {"applied_steps"})

    def from_document(self, document: dict[str, Any], *, key: str = "?") -> RunContext:
        try:
            return RunContext.model_validate(document)
        except ValidationError as exc:
            raise ContextCorruption(key, f"document does not describe a RunContext ({exc.error_count()} errors)") from exc

    def dump_context(self, ctx: RunContext) -> bytes:
        return self.dump_document(self.to_document(ctx))

    def load_context(self, payload: bytes, *, key: str = "?") -> RunContext:
        return self.from_document(self.load_document(payload, key=key), key=key)

    def dump_state(self, ctx: RunContext) -> bytes:
        """L2's payload: the context without its applied steps (L2 keeps those beside it, in a set
        that each commit adds one to, so a commit's size does not grow with the run)."""
        return self.dump_document(self.to_document(ctx, with_applied=False))

    def load_state(self, payload: bytes, applied: list[str], *, key: str = "?") -> RunContext:
        document = self.load_document(payload, key=key)
        if not isinstance(document, dict):
            raise ContextCorruption(key, "document does not describe a RunContext (not a mapping)")
        document["applied_steps"] = applied
        return self.from_document(document, key=key)

    def dump_document(self, document: Any) -> bytes:
        return canonical_json(document).encode()

    def load_document(self, payload: bytes, *, key: str = "?") -> Any:
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContextCorruption(key, f"not JSON ({exc})") from exc


DEFAULT_CODEC = Codec()
