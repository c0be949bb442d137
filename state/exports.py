"""What a run exports when it finalizes: where each declared variable goes."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from state.limits import MAX_TEXT_LENGTH, NAME_PATTERN


class ExportDestination(str, Enum):
    BLACKBOARD = "blackboard"  # SwarmSharedState.blackboard of a swarm or team
    PERSISTENT = "persistent"  # kept in L3 after the run


class ExportDeclaration(BaseModel):
    model_config = ConfigDict(frozen=True)

    variable: str = Field(pattern=NAME_PATTERN.pattern)
    destination: ExportDestination
    scope: str = Field(
        default="default", min_length=1, max_length=MAX_TEXT_LENGTH, description="blackboard scope, e.g. 'swarm:42' or 'team:ops'"
    )
    key: str | None = Field(
        default=None, min_length=1, max_length=MAX_TEXT_LENGTH, description="name under which it is exported; the variable's by default"
    )

    @property
    def export_key(self) -> str:
        return self.key or self.variable
