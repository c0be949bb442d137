"""Operating runctx as a user does, on real worker processes: `runctx prune`, `runctx run`'s progress
on a terminal, `runctx worker` with its Prometheus endpoint, and retention without Celery beat."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, select as sql_select

from state.change_events import libpq_url
from state.schema import exports
from tests.support.servers import free_port
from tests.support.waiting import wait_for


def _routine(path: Path, name: str, steps: list[dict], **extra: object) -> Path:
    path.write_text(json.dumps({"name": name, "variables": {"counter": 0}, "steps": steps, **extra}))
    return path


def _increments(n: int) -> list[dict]:
    return [{"id": f"s{i:03d}", "action": "increment", "args": {"name": "counter"}} for i in range(n)]


def _naps(n: int) -> list[dict]:
    return [{"id": f"s{i:02d}", "action": "sleep", "args": {"seconds": 0.1}} for i in range(n)]


def _one_node(make_cluster):  # noqa: ANN001, ANN202 - the fixture's factory
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    return cluster


def _age_s(database_url: str, run_id: str) -> float:
    """How long ago the run finished, by the database's clock (the one `runctx prune` goes by)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute("SELECT extract(epoch FROM now() - finished_at) FROM runs WHERE run_id = %s", (run_id,)).fetchone()[0]


# ---- prune and retention ------------------------------------------------------------------------------


@pytest.mark.slow
def test_prune_removes_an_old_run_and_keeps_a_recent_one_and_the_exports(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    exporting = {"exports": [{"variable": "counter", "destination": "persistent"}]}
    old = cluster.run(_routine(tmp_path / "old.json", "old", _increments(3), **exporting))
    # Older than the 5 s of the prune below (by the database's clock); the recent run is then younger
    # (a `runctx` command takes a second or two to start).
    wait_for(lambda: _age_s(cluster.database_url, old["run_id"]) > 5.5, 30, "the old run to be 5.5 s old", 0.1)
    recent = cluster.run(_routine(tmp_path / "recent.json", "recent", _increments(2)))
    assert old["status"] == recent["status"] == "succeeded"

    pruned = cluster.runctx("prune", "--older-than", "5s", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == {"older_than_s": 5.0, "runs": 1, "contexts": 1}

    listed = [run["run_id"] for run in json.loads(cluster.runctx("runs", "--json").stdout)["runs"]]
    assert listed == [recent["run_id"]]
    gone = cluster.runctx("status", old["run_id"])
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    assert cluster.runctx("status", recent["run_id"]).returncode == 0
    store = cluster.store()
    try:
        assert store.l3.get_context(old["run_id"]) is None and store.l2.get_context(old["run_id"]) is None
        assert store.l2.run_summary(old["run_id"])["steps"] == []  # its step records went too
    finally:
        store.close()
    engine = create_engine(cluster.database_url)
    with engine.connect() as conn:  # what the run exported stays
        kept = conn.execute(sql_select(exports.c.variable).where(exports.c.run_id == old["run_id"])).scalars().all()
    engine.dispose()
    assert kept == ["counter"]

    assert json.loads(cluster.runctx("prune", "--older-than", "1h", "--json").stdout)["runs"] == 0
    bad = cluster.runctx("prune", "--older-than", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--older-than" in bad.stderr and "30d" in bad.stderr


@pytest.mark.slow
def test_workers_apply_the_retention_setting_without_celery_beat(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.extra_env["RUNCTX_RETENTION_DAYS"] = str(10.0 / 86400)  # ten seconds
    cluster.start_nodes("n1", concurrency=1)
    done = cluster.run(_routine(tmp_path / "r.json", "kept-briefly", _increments(2)))
    assert done["status"] == "succeeded"

    def listed() -> list[str]:
        return [run["run_id"] for run in json.loads(cluster.runctx("runs", "--json").stdout)["runs"]]

    assert done["run_id"] in listed()
    wait_for(lambda: done["run_id"] not in listed(), 30, "the finished run pruned by a worker")
    assert "retention: pruned" in cluster.logs()


# ---- runctx run on a terminal ---------------------------------------------------------------------------


@pytest.mark.slow
def test_run_on_a_terminal_shows_a_progress_bar_that_advances(make_cluster, tmp_path: Path) -> None:
    path = _routine(tmp_path / "slow.json", "slow-bar", _naps(30))
    cluster = _one_node(make_cluster)

    pid, fd = pty.fork()
    if pid == 0:  # the child: `runctx run` with a terminal for its output
        os.chdir(cluster.work_dir)
        os.execve(sys.executable, [sys.executable, "-m", "runctx.cli", "run", str(path)], {**cluster.env, "COLUMNS": "120"})
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]

    counts = [int(done) for done, total in re.findall(r"(\d+)/(\d+)", text) if total == "30"]
    assert counts and counts[-1] == 30, text[-2000:]
    assert len(set(counts)) >= 3 and counts == sorted(counts), counts  # it moved forward, more than once
    assert "run " in text and ": succeeded" in text


@pytest.mark.slow
def test_run_without_a_terminal_prints_plain_progress_lines_and_json_only_with_json(make_cluster, tmp_path: Path) -> None:
    path = _routine(tmp_path / "plain.json", "plain", _naps(10))
    cluster = _one_node(make_cluster)

    plain = cluster.runctx("run", str(path))
    assert plain.returncode == 0, plain.stderr
    assert "\x1b[" not in plain.stdout + plain.stderr  # no terminal, no escape codes
    progress = [line for line in plain.stderr.splitlines() if "done " in line]
    assert progress and progress[-1].endswith("done 10 / running 0 / pending 0 / failed 0 (of 10)"), plain.stderr

    as_json = cluster.runctx("run", str(path), "--json")
    assert as_json.returncode == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["status"] == "succeeded"


# ---- runctx worker and its metrics -------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z0-9_:]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


@pytest.mark.slow
def test_runctx_worker_serves_metrics_of_its_pool_processes_during_and_after_a_run(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    port = free_port()
    log = open(cluster.log_path("m1"), "ab")
    node = subprocess.Popen(
        [sys.executable, "-m", "runctx.cli", "worker", "--concurrency", "2", "--metrics-port", str(port),
         "--hostname", cluster.node_name("m1"), "--", "--without-gossip", "--without-mingle"],
        env=cluster.env, cwd=cluster.work_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log.close()
    cluster.nodes["m1"] = node  # stopped with the cluster
    cluster.wait_ready("m1")
    assert len(cluster.pool_pids("m1")) == 2
    wait_for(lambda: _value(_scrape(port), "runctx_change_listener_up") == 1.0, 30, "both listeners up")

    steps = [{"id": "a", "action": "increment", "args": {"name": "counter"}},
             {"id": "fan", "parallel": [_increments(20)[:10], [{**s, "id": f"b{s['id']}"} for s in _increments(10)]]},
             {"id": "nap", "action": "sleep", "args": {"seconds": 1.5}}]
    run_id = cluster.submit(_routine(tmp_path / "m.json", "metered", steps))
    wait_for(lambda: _value(_scrape(port), "runctx_steps_total", routine="metered") >= 10, 60, "steps counted during the run")
    during = _scrape(port)
    assert _value(during, "runctx_runs_total", routine="metered") == 0  # still running

    assert cluster.wait(run_id)["status"] == "succeeded"
    wait_for(lambda: _value(_scrape(port), "runctx_runs_total", routine="metered", status="succeeded") == 1, 30, "the run counted")
    after = _scrape(port)
    assert _value(after, "runctx_steps_total", routine="metered", status="succeeded") == 22
    assert _value(after, "runctx_step_duration_seconds_count", routine="metered") == 22
    assert _value(after, "runctx_l2_commits_total") >= 22
    assert _value(after, "runctx_cache_reads_total", tier="l1") + _value(after, "runctx_cache_reads_total", tier="l2") >= 22
    assert _value(after, "runctx_l3_writes_total") >= 2  # the run's creation and its finish at least
    # A pushed step's message carries the state its predecessor committed (a run of 22 steps: 19 are
    # pushed, all but the first step, a branch's first and the step after the join); commits whose
    # successor is sent after them (the fork, the join, the finalize) are broadcast to both processes.
    assert _value(after, "runctx_invalidations_total", source="message") >= 15
    broadcasts = _value(after, "runctx_invalidations_total", source="commit")
    assert broadcasts >= 4
    assert _value(after, "runctx_invalidation_delay_seconds_count", source="commit") == broadcasts
    for name in ("runctx_write_behind_pending", "runctx_write_behind_oldest_seconds", "runctx_rewinds_total",
                 "runctx_l2_conflicts_total"):
        assert re.search(rf"^{name} ", after, re.MULTILINE), name
    # Pool processes write their own files; the main process adds them up. Labels stay bounded.
    labels = set(re.findall(r'\w+="([^"]*)"', after))
    assert not any(run_id in label for label in labels)
    assert run_id not in after
