"""The one place where contexts and configurations become bytes for L2 and documents for L3.

Every tier goes through a ``Codec``. With a `Keyring` (every real tier: `TieredStore.from_settings`)
confidential and secret values are sealed in ``to_document`` (in variables, intermediate values,
a child's inherited copies and exports) and opened in ``from_document``, where a plain value in
their place is refused, never read; a payload's checksum is a keyed MAC. Without one (the
in-memory twins of the engine tests) values stay as they are and the checksum is unkeyed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from state.applied import AppliedSteps
from state.errors import ContextCorruption
from state.limits import canonical_json
from state.models import DataSensitivity, RunContext
from state.sealing import Keyring, binding, is_sealed

_SEALED_SCOPES = ("variables", "intermediate", "inherited")
_MASKED = (DataSensitivity.CONFIDENTIAL.value, DataSensitivity.SECRET.value)
_STATE_SERIALIZER = RunContext.__pydantic_serializer__
_APPLIED = {"applied_steps"}


def checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class Codec:
    """JSON only, so nothing stored can execute code when it is read; sensitive values sealed."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        self.keyring = keyring

    def checksum(self, payload: bytes) -> str:
        return self.keyring.mac(payload) if self.keyring else checksum(payload)

    def verify(self, payload: bytes, stored: str, *, where: str = "a stored entry") -> bool:
        """Whether ``stored`` is ``payload``'s checksum; KeyNotHeld if it is a MAC under a key this
        process does not hold (another process's configuration, not damage)."""
        if self.keyring is None:
            return checksum(payload) == stored
        return self.keyring.verify(payload, stored, where=where)

    def to_document(self, ctx: RunContext, *, with_applied: bool = True) -> dict[str, Any]:
        document = ctx.model_dump(mode="json", exclude=None if with_applied else {"applied_steps"})
        if self.keyring is not None and ctx.holds_sensitive:
            for scope in _SEALED_SCOPES:
                values = document[scope]
                for name in values:
                    level = ctx.sensitivity_of(name)
                    if level.masked:
                        values[name] = self.keyring.seal(values[name], self._binding(document, scope, name, level.value))
        return document

    def from_document(self, document: dict[str, Any], *, key: str = "?") -> RunContext:
        if not isinstance(document, dict):
            raise ContextCorruption(key, "document does not describe a RunContext (not a mapping)")
        document = self._opened(document, key)
        try:
            return RunContext.model_validate(document)
        except ValidationError as exc:
            raise ContextCorruption(key, f"document does not describe a RunContext ({exc.error_count()} errors)") from exc

    def _opened(self, document: dict[str, Any], key: str) -> dict[str, Any]:
        """The document with its sealed values opened; a sensitive value stored in plain is refused."""
        levels = document.get("sensitivity_map")
        if not isinstance(levels, dict):
            return document
        opened = dict(document)
        for scope in _SEALED_SCOPES:
            values = document.get(scope)
            if not isinstance(values, dict):
                continue
            out = dict(values)
            for name, value in values.items():
                level = levels.get(name, "public")
                masked = level in _MASKED
                if not masked and not is_sealed(value):
                    continue
                if self.keyring is None:
                    if is_sealed(value):
                        raise ContextCorruption(key, f"{scope}.{name} is encrypted and no key is configured (RUNCTX_ENCRYPTION_KEYS)")
                    continue  # no keys: nothing is sealed
                if not is_sealed(value):
                    raise ContextCorruption(key, f"{scope}.{name} is {level} but stored in plain: refused, never read")
                out[name] = self.keyring.open(value, self._binding(document, scope, name, str(level)), where=key)
            opened[scope] = out
        return opened

    @staticmethod
    def _binding(document: dict[str, Any], scope: str, name: str, level: str) -> bytes:
        return binding(str(document.get("run_id")), str(document.get("context_id")), scope, name, level)

    # ---- exports ---------------------------------------------------------------------------------

    def export_value(self, run_id: str, destination: str, scope: str, key: str, variable: str, sensitivity: str, value: Any) -> Any:
        """An export's value as stored: sealed when confidential or secret (bound to where it goes:
        run, destination, scope, key and, for a persistent export, the variable)."""
        if self.keyring is None or not DataSensitivity(sensitivity).masked:
            return value
        return self.keyring.seal(value, self._export_binding(run_id, destination, scope, key, variable, sensitivity))

    def open_export(self, run_id: str, destination: str, scope: str, key: str, variable: str, sensitivity: str, value: Any) -> Any:
        if not DataSensitivity(sensitivity).masked:
            return value
        if self.keyring is None or not is_sealed(value):
            raise ContextCorruption(f"export {scope}:{key}", "a sensitive export that is not sealed, or no key to open it")
        associated = self._export_binding(run_id, destination, scope, key, variable, sensitivity)
        return self.keyring.open(value, associated, where=f"export {scope}:{key}")

    @staticmethod
    def _export_binding(run_id: str, destination: str, scope: str, key: str, variable: str, sensitivity: str) -> bytes:
        name = key if destination == "blackboard" else variable  # a blackboard entry keeps no variable name
        return binding(run_id, f"export:{destination}:{scope}:{key}", "exports", name, sensitivity)

    # ---- signals -----------------------------------------------------------------------------------

    def signal_value(self, run_id: str, event: str, sensitivity: str, value: Any) -> Any:
        """A signal's payload as stored until a step consumes it: sealed when confidential or secret
        (bound to its run, event and sensitivity)."""
        if self.keyring is None or not DataSensitivity(sensitivity).masked:
            return value
        return self.keyring.seal(value, binding(run_id, f"signal:{event}", "signals", "payload", sensitivity))

    def open_signal(self, run_id: str, event: str, sensitivity: str, value: Any) -> Any:
        if not DataSensitivity(sensitivity).masked or (self.keyring is None and not is_sealed(value)):
            return value  # (a store without keys, the in-memory one, seals nothing)
        if self.keyring is None or not is_sealed(value):
            raise ContextCorruption(f"signal {event!r} of run {run_id}", "a sensitive payload that is not sealed, or no key to open it")
        associated = binding(run_id, f"signal:{event}", "signals", "payload", sensitivity)
        return self.keyring.open(value, associated, where=f"signal {event!r} of run {run_id}")

    def dump_state(self, ctx: RunContext) -> bytes:
        """L2's payload: the context without its applied steps (L2 keeps those beside it, in a set
        that each commit adds one to, so a commit's size does not grow with the run).

        Encoded by pydantic itself, leaving out what equals its default (fields in their order, not
        the canonical form L3 and the limits use: a payload is only ever compared by its checksum),
        unless values must be sealed. Small, because a step's message may carry it.
        """
        if self.keyring is not None and ctx.holds_sensitive:
            return self.dump_document(self.to_document(ctx, with_applied=False))
        return _STATE_SERIALIZER.to_json(ctx, exclude=_APPLIED, exclude_defaults=True)

    def load_state(self, payload: bytes, applied: list[str], *, key: str = "?") -> RunContext:
        """A context from L2's payload and its applied steps; sealed values opened, plain values
        where sealed ones belong refused (as ``from_document``)."""
        try:
            ctx = RunContext.model_validate_json(payload)
        except ValidationError as exc:
            if any(error["type"] == "json_invalid" for error in exc.errors(include_url=False)):
                raise ContextCorruption(key, "not JSON") from None
            raise ContextCorruption(key, f"document does not describe a RunContext ({exc.error_count()} errors)") from None
        if ctx.applied_steps:
            raise ContextCorruption(key, "a payload holds no applied steps (L2 keeps them beside it)")
        ctx.applied_steps = AppliedSteps.of(applied)
        levels = {name: level.value for name, level in ctx.sensitivity_map.items()}
        for scope in _SEALED_SCOPES:
            values = getattr(ctx, scope)
            if any(levels.get(name) in _MASKED or is_sealed(value) for name, value in values.items()):
                opened = self._opened({"sensitivity_map": levels, "run_id": ctx.run_id, "context_id": ctx.context_id, scope: values}, key)
                setattr(ctx, scope, opened[scope])
        return ctx

    def dump_document(self, document: Any) -> bytes:
        return canonical_json(document).encode()

    def load_document(self, payload: bytes, *, key: str = "?") -> Any:
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContextCorruption(key, f"not JSON ({exc})") from exc


DEFAULT_CODEC = Codec()
