"""Every name runctx gives a thing in Redis or a cache (state/keys.py), pure: keys a script touches
together share one hash tag (one Redis Cluster slot), cache keys parse back to what they name, and
context ids lead back to their run."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from redis.crc import key_slot

from state.keys import (
    L2_SHARDS,
    RUN_RECORD_PARTS,
    STEP_RECORD_SHARDS,
    CacheKey,
    RedisKeys,
    config_key,
    context_change_key,
    context_id,
    context_shard,
    routine_key,
    run_of_context,
)

ROOT = Path(__file__).resolve().parents[2]
KEYS = RedisKeys("pfx")
CONTEXTS = ["run-1", "run-1/sub", "run-1/sub/inner", "run-2", "0f3a9c", "r/p.q-r_s"]


def hash_tag(key: str) -> str:
    match = re.search(r"\{([^}]*)\}", key)
    assert match, key
    return match.group(1)


# ---- Redis keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", CONTEXTS)
def test_a_contexts_entry_applied_steps_and_write_behind_schedule_share_one_slot(cid: str) -> None:
    names = [KEYS.context(cid), KEYS.applied(cid), KEYS.write_behind_due(cid), KEYS.write_behind_first(cid)]
    assert len(set(names)) == 4
    assert {hash_tag(name) for name in names} == {f"c{context_shard(cid)}"}
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert KEYS.write_behind_due(cid) == KEYS.due_sets()[context_shard(cid)]
    assert KEYS.write_behind_first(cid) == KEYS.first_change_sets()[context_shard(cid)]
    assert KEYS.context(cid).endswith(f":ctx:{cid}") and KEYS.applied(cid).endswith(f":applied:{cid}")


def test_contexts_spread_over_every_shard_and_each_shard_has_its_own_due_set() -> None:
    shards = {context_shard(f"run-{n}") for n in range(500)}
    assert shards == set(range(L2_SHARDS))
    assert len(set(KEYS.due_sets())) == L2_SHARDS and len(set(KEYS.first_change_sets())) == L2_SHARDS
    assert all(0 <= context_shard(cid) < L2_SHARDS for cid in CONTEXTS)


def test_every_process_names_a_context_alike_whatever_its_hash_seed() -> None:
    script = f"from state.keys import RedisKeys; print([RedisKeys('pfx').context(c) for c in {CONTEXTS!r}])"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str([KEYS.context(cid) for cid in CONTEXTS])


def test_a_runs_records_share_the_runs_tag_and_its_step_records_are_spread_over_shards() -> None:
    singles = [KEYS.run_record("run-1", part) for part in RUN_RECORD_PARTS if part not in ("steps", "fan_outs")]
    assert {hash_tag(key) for key in singles} == {"run-1"}
    assert len({key_slot(key.encode()) for key in singles}) == 1
    assert all(key.endswith(f":run:{part}") for key, part in zip(singles, [p for p in RUN_RECORD_PARTS if p not in ("steps", "fan_outs")]))

    steps = KEYS.step_records("run-1")
    assert len(set(steps)) == STEP_RECORD_SHARDS
    assert {hash_tag(key) for key in steps} == {f"run-1#{m}" for m in range(STEP_RECORD_SHARDS)}
    for step_id in ("a", "b", "sub/k1", "x" * 100):
        assert KEYS.run_record("run-1", "steps", step_id) in steps
        assert KEYS.run_record("run-1", "steps", step_id) == KEYS.run_record("run-1", "steps", step_id)

    every = KEYS.run_records("run-1")
    assert sorted(every) == sorted(singles + steps) and len(set(every)) == len(every)
    assert not set(every) & set(KEYS.run_records("run-2"))


def test_an_unknown_run_record_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown run record 'stpes'"):
        KEYS.run_record("run-1", "stpes")


def test_every_key_of_a_prefix_matches_its_scan_pattern_and_no_other_prefixs() -> None:
    names = [
        KEYS.context("run-1/sub"), KEYS.applied("run-1"), *KEYS.due_sets(), *KEYS.first_change_sets(), KEYS.config("routine:r@1"),
        *KEYS.run_records("run-1"), KEYS.lease("watchdog"), KEYS.relayed_event("e1"), KEYS.probe_reply("p1"),
        KEYS.server_token("t1"), KEYS.trace("e1"), KEYS.control_channel,
    ]
    assert len(set(names)) == len(names)
    assert all(fnmatch.fnmatchcase(name, KEYS.pattern()) for name in names)
    other = RedisKeys("pfx2")
    assert not any(fnmatch.fnmatchcase(name, other.pattern()) for name in names)
    assert not fnmatch.fnmatchcase(other.context("run-1"), KEYS.pattern())


# ---- cache keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("routine:daily", CacheKey("routine", "daily")),
        ("routine:daily@3", CacheKey("routine", "daily", 3)),
        ("config:bot:alice", CacheKey("config", "alice", config_kind="bot")),
        ("config:team:a:b", CacheKey("config", "a:b", config_kind="team")),  # a name may hold a colon
    ],
)
def test_a_cache_key_parses_to_what_it_names_and_prints_back_as_it_was(text: str, parsed: CacheKey) -> None:
    assert CacheKey.parse(text) == parsed
    assert str(parsed) == text


def test_cache_keys_are_built_in_one_place() -> None:
    assert routine_key("daily") == "routine:daily" and routine_key("daily", 3) == "routine:daily@3"
    assert config_key("bot", "alice") == "config:bot:alice"
    assert CacheKey.parse(routine_key("daily", 12)).version == 12


@pytest.mark.parametrize("text", ["routine:", "config:bot", "config::alice", "config:bot:", "context:run-1", "daily", "", "routine:r@x"])
def test_anything_else_is_not_a_cache_key(text: str) -> None:
    with pytest.raises(ValueError):
        CacheKey.parse(text)


def test_a_changed_context_is_named_apart_from_cache_keys() -> None:
    assert context_change_key("run-1/sub") == "context:run-1/sub"
    with pytest.raises(ValueError, match="not a cache key"):
        CacheKey.parse(context_change_key("run-1/sub"))


# ---- context ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [("", "run-1"), ("sub", "run-1/sub"), ("sub/inner", "run-1/sub/inner")])
def test_a_childs_context_id_is_its_runs_id_and_its_path_and_leads_back_to_the_run(path: str, expected: str) -> None:
    assert context_id("run-1", path) == expected
    assert run_of_context(expected) == "run-1"
