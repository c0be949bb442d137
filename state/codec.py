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
from state.detached import DETACH_BYTES, MARK, SCOPES, Detachment, Fields, digest, field_of, is_mark
from state.errors import ContextCorruption, DetachedNotHeld
from state.limits import canonical_json, json_size
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
                    if level.masked and not is_mark(values[name]):
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
                if (not masked and not is_sealed(value)) or is_mark(value):
                    continue  # (a detached value's field is opened where it is read)
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

    # ---- blobs: values stored once by reference (`state.blobs`) ------------------------------------

    def blob_id(self, level: str, data: bytes) -> str:
        """A value's address: a keyed hash of it and its sensitivity (with keys: it reveals nothing)."""
        return "b" + self.checksum(level.encode() + b"\0" + data).replace(":", "-")

    def blob_data(self, blob_id: str, level: str, value: Any, plain: bytes) -> bytes:
        """A blob as stored: its canonical JSON (``plain``), sealed when it is confidential or secret."""
        if self.keyring is None or level not in _MASKED:
            return plain
        return canonical_json(self.keyring.seal(value, binding("blob", blob_id, "blobs", "value", "sealed"))).encode()

    def open_blob(self, blob_id: str, data: bytes) -> Any:
        where = f"blob {blob_id[:24]}"
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ContextCorruption(where, "not JSON") from None
        if not is_sealed(value):
            return value
        if self.keyring is None:
            raise ContextCorruption(where, "encrypted and no key is configured (RUNCTX_ENCRYPTION_KEYS)")
        return self.keyring.open(value, binding("blob", blob_id, "blobs", "value", "sealed"), where=where)

    def dump_state(self, ctx: RunContext, *, whole: bool = False) -> bytes:
        """L2's payload: the context without its applied steps (L2 keeps those beside it, in a set
        that each commit adds one to, so a commit's size does not grow with the run), and without
        its large values (`state.detached`: marks in their place; `pending_fields` says which
        fields to write: those the context's changes made, or, ``whole``, every one: a fill).

        Encoded by pydantic itself, leaving out what equals its default (fields in their order, not
        the canonical form L3 and the limits use: a payload is only ever compared by its checksum),
        unless values must be sealed. Small, because a step's message may carry it.
        """
        marks = self._detach(ctx, whole)
        if marks:
            ctx = ctx.model_copy(update={scope: {**getattr(ctx, scope), **named} for scope, named in marks.items()})
        if self.keyring is not None and ctx.holds_sensitive:
            return self.dump_document(self.to_document(ctx, with_applied=False))
        return _STATE_SERIALIZER.to_json(ctx, exclude=_APPLIED, exclude_defaults=True)

    def _detach(self, ctx: RunContext, whole: bool) -> dict[str, dict[str, Any]]:
        """Each large value's mark, by scope; the context's detachments brought up to date (a value
        that is the same object at the same sensitivity keeps its field, another gets a new one)."""
        previous = {} if whole else (getattr(ctx, "_detached", None) or {})
        current: dict[str, Detachment] = {}
        marks: dict[str, dict[str, Any]] = {}
        sizes = ctx._ensure_sizes()
        for scope in SCOPES:
            for name, value in getattr(ctx, scope).items():
                field = field_of(scope, name)
                level = ctx.sensitivity_of(name).value
                known = previous.get(field)
                if known is None or known.value is not value or known.level != level:
                    size = sizes.get((scope, name)) if scope != "inherited" else _inherited_size(name, value)
                    if size is None or (size <= DETACH_BYTES and not is_mark(value)):
                        continue
                    data = self._field_data(ctx, scope, name, level, value)
                    known = Detachment(value, digest(data), size, level, data)
                current[field] = known
                marks.setdefault(scope, {})[name] = {MARK: known.digest, "size": known.size}
        ctx._detached = current
        # (What an earlier encoding of this same working copy dropped stays dropped.)
        gone = (*(() if whole else getattr(ctx, "_dropped", ())), *previous)
        ctx._dropped = tuple(field for field in dict.fromkeys(gone) if field not in current)
        return marks

    def _field_data(self, ctx: RunContext, scope: str, name: str, level: str, value: Any) -> bytes:
        if self.keyring is not None and level in _MASKED:
            value = self.keyring.seal(value, binding(ctx.run_id, ctx.context_id, scope, name, level))
        return canonical_json(value).encode()

    @staticmethod
    def pending_fields(ctx: RunContext) -> Fields:
        """The detached fields a store of ``ctx`` writes and drops, as its last `dump_state` found them."""
        detached = getattr(ctx, "_detached", None) or {}
        return Fields({field: one.data for field, one in detached.items() if one.data is not None}, getattr(ctx, "_dropped", ()))

    @staticmethod
    def stored(ctx: RunContext) -> None:
        """The fields of ``ctx`` are stored: it keeps their digests, not their data."""
        detached = getattr(ctx, "_detached", None)
        if detached:
            ctx._detached = {field: one.without_data() for field, one in detached.items()}
        ctx._dropped = ()

    def load_state(
        self, payload: bytes, applied: list[str], *, key: str = "?", fields: dict[str, bytes] | None = None,
        known: RunContext | None = None,
    ) -> RunContext:
        """A context from L2's payload and its applied steps; sealed values opened, plain values
        where sealed ones belong refused (as ``from_document``); each detached value taken from
        ``known`` (a version before it, holding the same field) or read from ``fields`` (checked
        against its digest). DetachedNotHeld if neither has one."""
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
        self._attach(ctx, levels, key, fields or {}, known)
        return ctx

    def _attach(self, ctx: RunContext, levels: dict[str, str], key: str, fields: dict[str, bytes], known: RunContext | None) -> None:
        """Put each detached value back in place of its mark (see `load_state`)."""
        held = (getattr(known, "_detached", None) or {}) if known is not None and known.context_id == ctx.context_id else {}
        detached: dict[str, Detachment] = {}
        for scope in SCOPES:
            values = getattr(ctx, scope)
            for name, mark in values.items():
                if not is_mark(mark):
                    continue
                field, wanted, level = field_of(scope, name), mark[MARK], levels.get(name, "public")
                prior = held.get(field)
                if prior is not None and prior.digest == wanted and prior.level == level:
                    detached[field] = prior.without_data()
                elif field in fields:
                    data = fields[field]
                    if digest(data) != wanted:
                        raise ContextCorruption(key, f"field {field} does not match its digest")
                    detached[field] = Detachment(self._open_field(ctx, scope, name, level, data, key), wanted, int(mark.get("size") or len(data)), level)
                else:
                    raise DetachedNotHeld(key, field)
                values[name] = detached[field].value
        if detached:
            ctx._detached = detached
            sizes = {(scope, name): json_size(name, value) for scope in ("variables", "intermediate")
                     for name, value in getattr(ctx, scope).items() if field_of(scope, name) not in detached}
            ctx._sizes = {**sizes, **{(scope, field[4:]): one.size for field, one in detached.items()
                                      for scope, letter in SCOPES.items() if field.startswith(f"x:{letter}:") and scope != "inherited"}}

    def _open_field(self, ctx: RunContext, scope: str, name: str, level: str, data: bytes, key: str) -> Any:
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ContextCorruption(key, f"field of {scope}.{name} is not JSON") from None
        if level in _MASKED or is_sealed(value):
            if self.keyring is None:
                if is_sealed(value):
                    raise ContextCorruption(key, f"{scope}.{name} is encrypted and no key is configured (RUNCTX_ENCRYPTION_KEYS)")
                return value
            if not is_sealed(value):
                raise ContextCorruption(key, f"{scope}.{name} is {level} but stored in plain: refused, never read")
            return self.keyring.open(value, binding(ctx.run_id, ctx.context_id, scope, name, level), where=key)
        return value

    def dump_document(self, document: Any) -> bytes:
        return canonical_json(document).encode()

    def load_document(self, payload: bytes, *, key: str = "?") -> Any:
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContextCorruption(key, f"not JSON ({exc})") from exc


def _inherited_size(name: str, value: Any) -> int | None:
    """A child's inherited copy's size, measured only where it may be large (a short string or a
    number never is): an inherited value is copied once, when the child is made."""
    if isinstance(value, str) and len(value) * 4 <= DETACH_BYTES:
        return None
    if not isinstance(value, (str, list, dict)):
        return None
    return json_size(name, value)


DEFAULT_CODEC = Codec()
