"""How carefully a value must be handled: the four levels, ordered, and which are masked."""

from __future__ import annotations

from enum import Enum


class DataSensitivity(str, Enum):
    """How carefully a value must be handled; ordered from least to most sensitive."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"

    @property
    def rank(self) -> int:
        return _SENSITIVITY_ORDER.index(self)

    @classmethod
    def highest(cls, *levels: DataSensitivity) -> DataSensitivity:
        return max(levels, key=lambda level: level.rank)

    @property
    def masked(self) -> bool:
        """Whether values of this level are hidden in logs, task arguments and the CLI."""
        return self.rank >= DataSensitivity.CONFIDENTIAL.rank


_SENSITIVITY_ORDER = [DataSensitivity.PUBLIC, DataSensitivity.INTERNAL, DataSensitivity.CONFIDENTIAL, DataSensitivity.SECRET]
