"""The ids of the steps a context holds: a sequence that a commit extends in O(1), whatever the
run's length.

A context's applied steps grow by one id per step, and every step copies its context (the copy it
changes and commits). Copying a list of 10,000 ids at each step made the 10,000th step cost a
fifth more than the 10th, so copies share instead: `AppliedSteps` is immutable, and ``plus``
returns a new one that shares its ids with the one it extends.

Invariants: the ids of an `AppliedSteps` are the first ``n`` ids of a log shared by the copies of
one lineage (a context and the copies made from it). The log only ever grows: ``plus`` appends in
place when it is called on the log's newest view, and otherwise (another copy of the same version
was extended first: a refused commit being retried) copies the first ``n`` ids into a log of its
own. Membership is a dict lookup of the id's position in the log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


class _Log:
    """The ids of one lineage's commits in order, and where each is: grows, never changes."""

    __slots__ = ("ids", "position", "lock")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = list(ids)
        self.position: dict[str, int] = {}
        for index, step_id in enumerate(self.ids):
            self.position.setdefault(step_id, index)
        self.lock = threading.Lock()  # contexts are shared by the threads of a process (L1)


class AppliedSteps(Sequence[str]):
    """The applied step ids of one context, oldest first; immutable, compares equal to a list of the
    same ids, and is stored as one (pydantic validates a list into it and serializes it as a list)."""

    __slots__ = ("_log", "_n")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._log = _Log(ids)
        self._n = len(self._log.ids)

    @classmethod
    def _view(cls, log: _Log, n: int) -> AppliedSteps:
        view = cls.__new__(cls)
        view._log, view._n = log, n
        return view

    def plus(self, step_id: str) -> AppliedSteps:
        """These ids and ``step_id`` after them (this one is left as it is)."""
        log = self._log
        with log.lock:
            if len(log.ids) == self._n:  # the newest view of the log: extend it where it is
                log.ids.append(step_id)
                log.position.setdefault(step_id, self._n)
                return self._view(log, self._n + 1)
        return AppliedSteps([*islice(log.ids, self._n), step_id])  # a sibling extended it first

    def __contains__(self, step_id: object) -> bool:
        position = self._log.position.get(step_id)  # type: ignore[call-overload]
        return position is not None and position < self._n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        return islice(self._log.ids, self._n)

    def __getitem__(self, index: Any) -> Any:
        return list(self)[index] if isinstance(index, slice) else self._log.ids[range(self._n)[index]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (AppliedSteps, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AppliedSteps({list(self)!r})"

    def __copy__(self) -> AppliedSteps:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> AppliedSteps:
        return AppliedSteps(self)  # a log of its own (a lock is not copied)

    def __reduce__(self) -> tuple[Any, ...]:
        return (AppliedSteps, (list(self),))

    @classmethod
    def of(cls, ids: Sequence[str]) -> AppliedSteps:
        """``ids`` as AppliedSteps (itself if it is one)."""
        return ids if isinstance(ids, AppliedSteps) else cls(ids)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        from_list = core_schema.no_info_after_validator_function(cls, core_schema.list_schema(core_schema.str_schema()))
        return core_schema.json_or_python_schema(
            json_schema=from_list,
            python_schema=core_schema.union_schema([core_schema.is_instance_schema(cls), from_list]),
            serialization=core_schema.plain_serializer_function_ser_schema(
                list, return_schema=core_schema.list_schema(core_schema.str_schema())
            ),
        )
