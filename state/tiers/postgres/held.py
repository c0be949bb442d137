"""A snapshot's large values held beside it: written once per run, named by the document.

A plain value whose JSON is over `DETACH_BYTES` is kept in `context_values` (one row per run and
digest) and the snapshot's document holds ``{"$held": <digest>, "size": <bytes>}`` in its place,
with an index of what it holds under the document's ``"$held"`` key (so a user's value that looks
like a mark is never taken for one). A write sends only the values L3 does not hold yet: a step
that leaves a large value alone costs its flush nothing for that value, and a child, a rewind or a
flush made again shares the row. Sealed values stay in the document (key rotation reseals them
there); so do values a context holds by reference already (`state.blobs`), which are small.

Rows are immutable and belong to the run: prune deletes them with it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, text

from state.detached import DETACH_BYTES, digest
from state.limits import canonical_json
from state.schema import context_values
from state.sealing import is_sealed

HELD = "$held"
_SCOPES = ("variables", "intermediate", "inherited")


def large_text(value: Any) -> str | None:
    """The value's canonical JSON when it is over DETACH_BYTES and plain; None otherwise."""
    if value is None or isinstance(value, (bool, int, float)) or is_sealed(value):
        return None
    if isinstance(value, str) and len(value) * 6 + 2 <= DETACH_BYTES:
        return None  # (no string this short can be over the limit, however it is escaped)
    encoded = canonical_json(value)
    return encoded if len(encoded) > DETACH_BYTES // 4 and len(encoded.encode()) > DETACH_BYTES else None


def split(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The document with its large plain values replaced by marks, and those values' JSON by digest."""
    held: dict[str, str] = {}
    index: dict[str, dict[str, str]] = {}
    for scope in _SCOPES:
        values = document.get(scope)
        if not isinstance(values, dict):
            continue
        for name, value in list(values.items()):
            encoded = large_text(value)
            if encoded is None:
                continue
            data = encoded.encode()
            key = digest(data)
            held[key] = encoded
            index.setdefault(scope, {})[name] = key
            values[name] = {HELD: key, "size": len(data)}
    if index:
        document[HELD] = index
    return document, held


def digests_in(document: dict[str, Any]) -> set[str]:
    index = document.get(HELD)
    return {key for names in index.values() for key in names.values()} if isinstance(index, dict) else set()


def joined(document: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The document with its marks replaced by the values they name (a value not held: left as
    its mark, which the caller's check finds)."""
    index = document.get(HELD)
    if not isinstance(index, dict):
        return document
    document = {**document}
    del document[HELD]
    for scope, names in index.items():
        if isinstance(document.get(scope), dict):
            document[scope] = {**document[scope], **{name: values[key] for name, key in names.items() if key in values}}
    return document


def store_values(conn: Connection, run_id: str, held: dict[str, str]) -> None:
    """Insert the values L3 does not hold yet for ``run_id``, inside the caller's transaction."""
    if not held:
        return
    table = context_values
    known = set(conn.execute(select(table.c.digest).where(table.c.run_id == run_id, table.c.digest.in_(list(held)))).scalars())
    missing = [key for key in held if key not in known]
    if missing:
        # One row of parameters each, not arrays: an array's text would be escaped value by value.
        rows = ", ".join(f"(:run, :d{n}, CAST(:v{n} AS jsonb))" for n in range(len(missing)))
        params: dict[str, str] = {"run": run_id}
        for n, key in enumerate(missing):
            params[f"d{n}"], params[f"v{n}"] = key, held[key]
        conn.execute(text(f"INSERT INTO {context_values.name} (run_id, digest, value) VALUES {rows} ON CONFLICT DO NOTHING"), params)


def fetch_values(conn: Connection, run_ids: set[str], digests: set[str]) -> dict[str, Any]:
    if not digests:
        return {}
    table = context_values
    query = select(table.c.digest, table.c.value).where(table.c.run_id.in_(sorted(run_ids)), table.c.digest.in_(sorted(digests)))
    return {row.digest: row.value for row in conn.execute(query)}


def delete_values(conn: Connection, run_ids: list[str]) -> None:
    conn.execute(context_values.delete().where(context_values.c.run_id.in_(run_ids)))
