"""Large values by reference (claim checks): a value larger than its context's ``value_ref_bytes``
(`ResourceLimits`, RUNCTX_VALUE_REF_BYTES) is stored once,
content-addressed, in L3's blob table, and the context holds ``{"$blob": <id>, "size": <bytes>}``
in its place: every commit, message, L2 entry, snapshot, history entry, fork and child that holds
the value holds those few bytes. A step reads the value itself (`tasks.changes.ContextView` opens
the reference; this process keeps the values it opened, by id, in an LRU).

The id is a keyed hash of the value and its sensitivity (the MAC key of `state.sealing`), so an
address says nothing of its content; a confidential or secret value is sealed before it is stored.
Each run records the blobs it holds; `prune` deletes a blob once no kept run holds it. With an
object store (RUNCTX_BLOB_URL=s3://...: `state.tiers.s3`) the data is kept there and L3 keeps the
index: an object is uploaded before its index row, so a crash between leaves an object no row
names, which `collect` deletes once it is older than ``GRACE_S``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cachetools import LRUCache

from state.codec import Codec
from state.errors import ContextCorruption
from state.limits import canonical_json
from state.models import RunContext
from state.tiers.contracts import L3Blobs, ObjectStore
from state.tiers.data import NewBlob

REF = "$blob"
CACHE_BYTES = 256 << 20  # opened values a process keeps, by size
GRACE_S = 3600.0  # an object no index row names is deleted once older than this (its upload may be under way)


def is_ref(value: Any) -> bool:
    """Whether a value is a reference: ``{"$blob": id, "size": n}`` (a list's also has its ``items``)."""
    return isinstance(value, dict) and isinstance(value.get(REF), str) and value.keys() <= {REF, "size", "items"}


def list_length(value: Any) -> int | None:
    """How many items a list holds, held itself or by reference (None: not a list): what a fan-out
    over it counts without opening it."""
    if isinstance(value, list):
        return len(value)
    return value["items"] if is_ref(value) and isinstance(value.get("items"), int) else None


def refs_in(values: Iterable[Any]) -> set[str]:
    """The blob ids these values hold: references, and references in a list (a fan-out's collect)."""
    found = set()
    for value in values:
        if is_ref(value):
            found.add(value[REF])
        elif isinstance(value, list):
            found |= {item[REF] for item in value if is_ref(item)}
    return found


class Blobs:
    """Stores large values once and opens references. Owns its LRU of opened values; promises that
    a value is stored once whoever stores it again, and opens byte for byte as it was set."""

    def __init__(self, l3: L3Blobs, codec: Codec, *, objects: ObjectStore | None = None, cache_bytes: int = CACHE_BYTES) -> None:
        self.l3 = l3
        self.codec = codec
        self.objects = objects
        self._opened: LRUCache[str, Any] = LRUCache(maxsize=cache_bytes, getsizeof=lambda entry: entry[1])

    def claim_check(self, ctx: RunContext, names: Iterable[str] | None = None) -> None:
        """Store each value of ``ctx`` over its ``value_ref_bytes`` not stored yet, and hold it by
        reference; ``names``: only these (a commit's: what its working copy changed). One L3
        transaction for all of them."""
        ref_bytes = ctx.limits.value_ref_bytes
        sizes = ctx._ensure_sizes()
        held = sizes.items() if names is None else [
            (key, sizes[key]) for name in names for key in (("variables", name), ("intermediate", name)) if key in sizes
        ]
        new: list[NewBlob] = []
        for (scope, name), size in list(held):
            value = ctx._store(scope)[name]
            if size > ref_bytes and not is_ref(value):
                ref, blob = self._made(value, ctx.sensitivity_of(name).value, size)
                ctx.hold_by_reference(scope, name, ref)
                new.append(blob)
        self._store(ctx.run_id, new)

    def _made(self, value: Any, level: str, size: int) -> tuple[dict[str, Any], NewBlob]:
        """A value's reference and its blob as stored (kept in the LRU of opened values)."""
        plain = canonical_json(value).encode()
        blob_id = self.codec.blob_id(level, plain)
        data = self.codec.blob_data(blob_id, level, value, plain)
        self._keep(blob_id, value, size)
        ref = {REF: blob_id, "size": size, **({"items": len(value)} if isinstance(value, list) else {})}
        return ref, NewBlob(blob_id, data, len(data))

    def _store(self, run_id: str, new: list[NewBlob]) -> None:
        if not new:
            return
        if self.objects is not None:
            for blob in new:
                self.objects.put_object(blob.blob_id, blob.data)
            new = [NewBlob(blob.blob_id, b"", blob.size) for blob in new]
        self.l3.put_blobs(run_id, new)

    def _keep(self, blob_id: str, value: Any, size: int) -> None:
        if 0 < size <= self._opened.maxsize:
            self._opened[blob_id] = (value, size)

    def open(self, value: Any) -> Any:
        """The value a reference stands for (anything else as it is; a list's references opened)."""
        if isinstance(value, list) and any(is_ref(item) for item in value):
            return [self.open(item) for item in value]
        if not is_ref(value):
            return value
        blob_id = value[REF]
        cached = self._opened.get(blob_id)
        if cached is not None:
            return cached[0]
        data = self.l3.get_blob(blob_id) if self.objects is None else self.objects.get_object(blob_id)
        if data is None:
            raise ContextCorruption(f"blob {blob_id[:24]}", "a context holds a reference to a value that is not stored")
        opened = self.codec.open_blob(blob_id, data)
        self._keep(blob_id, opened, int(value.get("size") or len(data)))
        return opened

    def hold(self, run_id: str, contexts: Iterable[RunContext]) -> None:
        """``run_id`` holds the blobs these contexts reference (a fork's, made from another run's)."""
        held: set[str] = set()
        for ctx in contexts:
            held |= refs_in([*ctx.variables.values(), *ctx.intermediate.values(), *ctx.inherited.values()])
        self.l3.hold_blobs(run_id, held)

    def usage(self) -> tuple[int, int]:
        """How many blobs are stored, and their bytes."""
        return self.l3.blob_usage()

    def reseal_objects(self, old_key_ids: set[str]) -> int:
        """Seal again under the newest key the objects sealed under ``old_key_ids`` (L3's own blobs
        are resealed by L3); how many."""
        if self.objects is None or not old_key_ids:
            return 0
        markers = [f"v1.{key_id}.".encode() for key_id in old_key_ids]
        done = 0
        for key in self.objects.object_keys(older_than_s=-1.0):
            data = self.objects.get_object(key)
            if data is not None and any(marker in data for marker in markers):
                self.objects.put_object(key, self.codec.blob_data(key, "secret", self.codec.open_blob(key, data), b""), replace=True)
                done += 1
        return done

    def collect(self, *, grace_s: float = GRACE_S) -> int:
        """Delete the objects no index row names (prune deleted their rows); how many."""
        if self.objects is None:
            return 0
        keys = self.objects.object_keys(older_than_s=grace_s)
        orphans = sorted(set(keys) - self.l3.known_blobs(keys))
        self.objects.delete_objects(orphans)
        return len(orphans)
