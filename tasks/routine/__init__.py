"""Routine definitions: the YAML/JSON a user writes, validated before anything runs.

    model.py    the language as pydantic models (steps, variables, merges, exports)
    bounds.py   the bounds of a definition as data (JSON only, depth, size)
    parse.py    a definition into a `Routine`, or one line naming the file, place and problem
    files.py    a routine file with its sub-routine files and stored routines
"""

from tasks.routine.bounds import MAX_DEFINITION_BYTES, MAX_INTEGER_BITS, MAX_ROUTINE_FILE_BYTES, check_definition
from tasks.routine.files import MAX_PATH_LENGTH, MAX_ROUTINE_FILES, load_routine, read_routine_file
from tasks.routine.model import (
    EVENT_NAME,
    STEP_ID,
    ActionStep,
    CollectSpec,
    ExportSpec,
    ForEachStep,
    MergeSpec,
    ParallelStep,
    RetrySpec,
    Routine,
    Step,
    SubRoutineStep,
    VariableSpec,
    WaitSpec,
    WaitStep,
    iter_steps,
)
from tasks.routine.parse import parse_routine

__all__ = [
    "EVENT_NAME",
    "MAX_DEFINITION_BYTES",
    "MAX_INTEGER_BITS",
    "MAX_PATH_LENGTH",
    "MAX_ROUTINE_FILES",
    "MAX_ROUTINE_FILE_BYTES",
    "STEP_ID",
    "ActionStep",
    "CollectSpec",
    "ExportSpec",
    "ForEachStep",
    "MergeSpec",
    "ParallelStep",
    "RetrySpec",
    "Routine",
    "Step",
    "SubRoutineStep",
    "VariableSpec",
    "WaitSpec",
    "WaitStep",
    "check_definition",
    "iter_steps",
    "load_routine",
    "parse_routine",
    "read_routine_file",
]
