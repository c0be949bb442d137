"""A worker node's Prometheus endpoint (workers/metrics.py), served by a process of this test's own
on the real servers: the scrape adds up the counts of the process and of a child it forked (the
dead child's counter stays, its live gauge goes), shows the write-behind backlog read from L2, and
never a previous node's counts left in the directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]

# A node's main process in miniature: the metrics directory first (before anything counts or forks),
# then a step counted here and one in a forked child that also says its change listener is up and
# exits; a context committed to L2 and not yet written to L3; then the endpoint. "count" only counts.
NODE = """
import os, sys
from workers import metrics as node_metrics
path = node_metrics.use_multiprocess_dir()
from state.metrics import metrics
mode, redis_url, database_url, prefix, port = sys.argv[1:6]
if mode == "count":
    metrics().steps.labels("metered", "succeeded").inc(5)
    sys.exit(0)
from state.models import RunContextInit, StateCacheConfig
from state.store import TieredStore
store = TieredStore.connect(redis_url, database_url, config=StateCacheConfig(), prefix=prefix)
ctx = store.create_context(RunContextInit(run_id="metered-1", routine_id="metered@1", variables={"n": 0}))
with store.edit(ctx.context_id) as working:
    working.set_variable("n", 1)
metrics().steps.labels("metered", "succeeded").inc()
child = os.fork()
if child == 0:
    metrics().steps.labels("metered", "succeeded").inc()
    metrics().change_listener_up.set(1)
    os._exit(0)
os.waitpid(child, 0)
node_metrics.serve(int(port), "127.0.0.1", store, path)
print(path, flush=True)
sys.stdin.read()
store.close()
"""


def node_env(multiproc_dir: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    return env


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of ``name``'s samples that carry ``labels``."""
    found = []
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z0-9_:]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(key) == value for key, value in labels.items()):
            found.append(float(match.group(3)))
    return found


def serve_and_scrape(redis_url: str, database_url: str, prefix: str, multiproc_dir: Path | None) -> tuple[str, Path]:
    """Start the node, scrape it once, stop it (it exits on its own); the scrape and its directory."""
    port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-c", NODE, "serve", redis_url, database_url, prefix, str(port)],
        cwd=ROOT, env=node_env(multiproc_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    path = node.stdout.readline().strip()  # printed once the endpoint listens
    if not path:
        _, errors = node.communicate(timeout=60)
        raise AssertionError(f"the node did not start: {errors}")
    try:
        text = scrape(port)
    finally:
        _, errors = node.communicate(input="", timeout=60)  # stdin closed: it exits
    assert node.returncode == 0, errors
    return text, Path(path)


def test_a_scrape_adds_up_every_process_and_shows_the_write_behind_backlog(redis_url: str, database_url: str, key_prefix: str) -> None:
    text, path = serve_and_scrape(redis_url, database_url, key_prefix, None)
    assert samples(text, "runctx_steps_total", routine="metered", status="succeeded") == [2.0]  # the dead child's count stays
    assert samples(text, "runctx_l2_commits_total") == [1.0]
    assert samples(text, "runctx_l3_writes_total", kind="context") == [1.0]
    assert samples(text, "runctx_change_listener_up") == []  # a dead child's live gauge leaves with it
    assert samples(text, "runctx_write_behind_pending") == [1.0]  # the edit, not yet written to L3
    [oldest] = samples(text, "runctx_write_behind_oldest_seconds")
    assert 0 <= oldest < 300
    assert "metered-1" not in text  # no series per run or context
    assert not path.exists()  # a directory the node made for itself is removed when it exits


def test_a_node_never_shows_a_previous_nodes_counts_left_in_its_directory(
    redis_url: str, database_url: str, key_prefix: str, tmp_path: Path
) -> None:
    given = tmp_path / "prometheus"
    before = subprocess.run(
        [sys.executable, "-c", NODE, "count", redis_url, database_url, key_prefix, "0"],
        cwd=ROOT, env=node_env(given), capture_output=True, text=True, timeout=120,
    )
    assert before.returncode == 0, before.stderr
    assert list(given.glob("counter_*.db"))  # what the previous node left behind

    text, path = serve_and_scrape(redis_url, database_url, key_prefix, given)
    assert path == given
    assert samples(text, "runctx_steps_total", routine="metered", status="succeeded") == [2.0]  # not 7
