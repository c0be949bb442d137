"""The web inspector, used as a user would: `runctx web` started in a shell next to real worker
nodes, a browser (headless Chromium) on its pages, scripts on its JSON API.

Each test has its own cluster (2 nodes, concurrency 2) and its own inspector, started with
``runctx web --bind 127.0.0.1:<port>`` and RUNCTX_WEB_PASSWORD, and stopped at the end. The browser
sends the credentials on every request (`tests.support.browser`). Nothing is waited for by
sleeping: every wait is on something the page, the API or the command shows.

    the runs list         a run submitted while the page is open appears without a reload
    the run page          the history and the timeline grow while a ~200-step run goes on, and
                          end with every step shown and the run succeeded (a screenshot for the README)
    the step panel        a step's change, before -> after
    time travel           the context as it was just after step 50
    cancel                the page's button ends the run cancelled
    need-to-know          a secret and a confidential value appear in no page, API answer or event
    security              401 without (or with wrong) credentials, 403 for a POST without the CSRF
                          token, the security headers, and no start on 0.0.0.0 without a password
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By

from tests.support.browser import basic_auth, chromium, click_row, console_errors, rows, text_of
from tests.support.cluster import HERE, Cluster
from tests.support.servers import free_port
from tests.support.waiting import wait_for

USER, PASSWORD = "runctx", f"web-{uuid.uuid4().hex[:12]}"
SCREENSHOT = HERE / "docs" / "images" / "run-page.png"

BRANCHES, BRANCH_STEPS, SEQUENTIAL = 2, 20, 160
PAUSES = {n: f"pause-{n:03d}" for n in range(20, SEQUENTIAL + 1, 20)}  # slow steps after these sequential steps
PAUSE_S = 0.5


# ---- the inspector, as a user starts it ---------------------------------------------------------------


@dataclass
class Inspector:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def client(self, **options: Any) -> httpx.Client:
        """An HTTP client of the inspector, with the right credentials unless ``auth`` is given."""
        return httpx.Client(base_url=self.base, **{"auth": (USER, PASSWORD), "timeout": 30.0, **options})

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def inspector(cluster: Cluster) -> Iterator[Inspector]:
    """``runctx web --bind 127.0.0.1:<free port>`` with the cluster's settings and a password, up
    once it answers 401 to a request without credentials; stopped (SIGTERM) at the end."""
    port = free_port()
    log = cluster.work_dir / f"web-{port}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "runctx.cli", "web", "--bind", f"127.0.0.1:{port}"],
            env={**cluster.env, "RUNCTX_WEB_PASSWORD": PASSWORD}, cwd=cluster.work_dir, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    web = Inspector(process, f"http://127.0.0.1:{port}", log)

    def answers_401() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"runctx web exited ({process.returncode}):\n{web.logs()}")
        try:
            return httpx.get(web.base + "/", timeout=2).status_code == 401
        except httpx.TransportError:
            return False  # not listening yet

    try:
        wait_for(answers_401, 60, lambda: f"runctx web to listen on {web.base}:\n{web.logs()}", 0.1)
        yield web
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"runctx web did not stop within 20 s of SIGTERM:\n{web.logs()}")


# ---- routines ---------------------------------------------------------------------------------------------


def step_id(n: int) -> str:
    return f"s{n:03d}"


def counter_routine(path: Path, *, pauses: bool) -> list[str]:
    """A parallel group of 2 branches x 20 increments of ``counter``, then s001..s160 (increments
    of ``counter`` too). With ``pauses``, slow steps to watch it by: a 1 s warm-up first, and a
    0.5 s pause after every 20th sequential step. Returns the ids of every step."""
    branches = [
        [{"id": f"{'ab'[b]}{s:02d}", "action": "increment", "args": {"name": "counter", "by": 1}} for s in range(1, BRANCH_STEPS + 1)]
        for b in range(BRANCHES)
    ]
    steps: list[dict[str, Any]] = [{"id": "warm-up", "action": "sleep", "args": {"seconds": 1}}] if pauses else []
    steps.append({"id": "fan-out", "parallel": branches})
    for n in range(1, SEQUENTIAL + 1):
        steps.append({"id": step_id(n), "action": "increment", "args": {"name": "counter", "by": 1}})
        if pauses and n in PAUSES:
            steps.append({"id": PAUSES[n], "action": "sleep", "args": {"seconds": PAUSE_S}})
    path.write_text(json.dumps({"name": "web-counter", "variables": {"counter": 0}, "steps": steps}))
    return [step["id"] for branch in branches for step in branch] + [step["id"] for step in steps if step["id"] != "fan-out"]


def counter_after(n: int) -> int:
    """The root's counter just after step s<n>: both branches' increments merged, then n more."""
    return BRANCHES * BRANCH_STEPS + n


def slow_routine(path: Path, steps: int = 60) -> str:
    """A long routine: each step increments ``counter`` then sleeps 1 s. Returns its last step's id."""
    body = []
    for n in range(1, steps + 1):
        body += [
            {"id": f"inc-{n:02d}", "action": "increment", "args": {"name": "counter", "by": 1}},
            {"id": f"nap-{n:02d}", "action": "sleep", "args": {"seconds": 1}},
        ]
    path.write_text(json.dumps({"name": "web-slow", "variables": {"counter": 0}, "steps": body}))
    return body[-1]["id"]


# ---- reading the page --------------------------------------------------------------------------------------


def history_count(driver) -> int | None:
    found = re.fullmatch(r"(\d+) entries", (text_of(driver, "#history-count") or "").strip())
    return int(found.group(1)) if found else None


def timeline_bars(driver) -> int | None:
    return driver.execute_script("const l = document.getElementById('timeline').layout; return l ? l.bars.length : null;")


def mark_page(driver) -> None:
    """A mark on the loaded document: still there later means the page was not reloaded."""
    driver.execute_script("window.__notReloaded = true;")


def not_reloaded(driver) -> bool:
    return driver.execute_script("return window.__notReloaded === true;")


def step_ids_on_every_page(driver) -> list[str]:
    """The step column of the history table, page by page from the newest (the pager's buttons)."""
    while (text_of(driver, "#page") or "").split(" of ")[0] != "page 1":
        driver.find_element(By.ID, "prev").click()
    pages = int((text_of(driver, "#page") or "page 1 of 1").split(" of ")[1])
    seen: list[str] = []
    for page in range(1, pages + 1):
        wait_for(lambda page=page: text_of(driver, "#page") == f"page {page} of {pages}", 10, f"history page {page}")
        seen += [cells[1] for cells in rows(driver, "#steps tbody tr")]
        if page < pages:
            driver.find_element(By.ID, "next").click()
    return seen


def open_step(driver, step: str) -> None:
    """Find the step's row on whichever history page holds it and click it: the step panel shows it."""
    while (text_of(driver, "#page") or "").split(" of ")[0] != "page 1":
        driver.find_element(By.ID, "prev").click()
    pages = int((text_of(driver, "#page") or "page 1 of 1").split(" of ")[1])
    for page in range(1, pages + 1):
        if click_row(driver, "#steps", 1, step):
            wait_for(lambda: text_of(driver, "#panel-step") == step and driver.find_elements(By.CSS_SELECTOR, "#step-panel table.changes"),
                     15, f"the step panel of {step}")
            return
        if page < pages:
            driver.find_element(By.ID, "next").click()
            wait_for(lambda page=page: text_of(driver, "#page") == f"page {page + 1} of {pages}", 10, f"history page {page + 1}")
    raise AssertionError(f"no row of step {step} on any of the {pages} history pages")


def panel_changes(driver) -> dict[str, tuple[str, str]]:
    """The step panel's "changed" table: variable -> (before, after) as shown."""
    return {cells[0]: (cells[1], cells[2]) for cells in rows(driver, "#step-panel table.changes tr")}


def travel_after_open_step(driver, step: str) -> dict[str, list[str]]:
    """Click the panel's "context just after this step": the rows of the context-at table by variable."""
    driver.find_element(By.XPATH, "//div[@id='step-panel']/button[normalize-space()='context just after this step']").click()
    wait_for(lambda: (text_of(driver, "#travel-title") or "").endswith(")") and f"just after {step} " in text_of(driver, "#travel-title")
             and driver.find_elements(By.CSS_SELECTOR, "table#context-at"), 15, f"the context just after {step}")
    found = driver.execute_script(  # read in one go: the page may redraw the table
        "return [...document.querySelectorAll('table#context-at tr[data-variable]')]"
        ".map((r) => [r.dataset.variable, [...r.querySelectorAll('td')].map((c) => c.textContent)]);"
    )
    return {variable: cells for variable, cells in found}


def wait_status(driver, status: str, timeout_s: float = 120) -> None:
    wait_for(lambda: text_of(driver, "#run-status") == status, timeout_s,
             lambda: f"the page to show {status} (it shows {text_of(driver, '#run-status')!r})", 0.1)


def cli_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    done = cluster.runctx(*args, "--json")
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout)


# ---- 1. the runs list --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_list_shows_a_new_run_live(make_cluster, tmp_path: Path) -> None:
    counter_routine(tmp_path / "counter.json", pauses=False)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        driver.get(web.base + "/")
        wait_for(lambda: "on" in (driver.find_element(By.ID, "live").get_attribute("class") or ""), 30, "the live updates to connect")
        assert (text_of(driver, "#runs tbody") or "").strip() == "no runs", "a new cluster's runs list is empty"
        mark_page(driver)

        run_id = cluster.submit(tmp_path / "counter.json")
        row = f'#runs tbody tr[data-run="{run_id}"]'
        cells = wait_for(lambda: rows(driver, row), 30, f"the row of {run_id} to appear")[0]
        assert cells[0] == run_id and cells[1].startswith("web-counter@"), cells
        assert not_reloaded(driver), "the page was reloaded: the row did not come by a live update"
        # Its status follows the run, still without a reload.
        wait_for(lambda: (rows(driver, row) or [[""] * 3])[0][2] == "succeeded", 120,
                 lambda: f"the row to say succeeded: {rows(driver, row)}", 0.1)
        assert not_reloaded(driver)
        assert len(rows(driver, "#runs tbody tr")) == 1

        # The row's link opens the run's page.
        driver.find_element(By.CSS_SELECTOR, f"{row} a").click()
        wait_for(lambda: text_of(driver, "#run-status") == "succeeded" and driver.current_url == f"{web.base}/runs/{run_id}",
                 30, "the run page")
        assert not console_errors(driver)


# ---- 2. the run page, live ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_page_grows_live_and_ends_with_every_step(make_cluster, tmp_path: Path) -> None:
    steps = counter_routine(tmp_path / "counter.json", pauses=True)
    assert len(steps) == BRANCHES * BRANCH_STEPS + SEQUENTIAL + len(PAUSES) + 1
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        driver.get(web.base + "/")  # the browser started, the page's files cached
        run_id = cluster.submit(tmp_path / "counter.json")
        driver.get(f"{web.base}/runs/{run_id}")
        mark_page(driver)

        # Every 50 ms until the page says the run ended: what the page shows, while it goes on.
        samples: list[tuple[str | None, int | None, int | None]] = []

        def ended() -> bool:
            status, count, bars = driver.execute_script(  # read at one moment: the page redraws between scripts
                "const l = document.getElementById('timeline').layout;"
                "return [document.getElementById('run-status').textContent, document.getElementById('history-count').textContent,"
                " l ? l.bars.length : null];"
            )
            found = re.fullmatch(r"(\d+) entries", count.strip())
            samples.append((status, int(found.group(1)) if found else None, bars))
            return status in ("succeeded", "failed", "cancelled")

        wait_for(ended, 180, lambda: f"the page to show the run ended; last seen {samples[-3:]}", 0.05)
        assert text_of(driver, "#run-status") == "succeeded", samples[-3:]
        assert not_reloaded(driver), "the page was reloaded"

        running = [(count, bars) for status, count, bars in samples if status == "running" and count is not None]
        counts = sorted({count for count, _ in running})
        assert len(counts) >= 3, f"the history did not grow while the run went on: counts seen while running {counts}"
        assert all(bars == count for count, bars in running if bars is not None), "the timeline lags the history"
        assert len({bars for _, bars in running if bars}) >= 3, "the timeline did not grow while the run went on"

        # At the end: the whole history, every step, the totals, no cancel button.
        history = cli_json(cluster, "history", run_id)
        assert history["status"] == "succeeded"
        total = history["total"]
        wait_for(lambda: history_count(driver) == total, 30, lambda: f"{total} entries on the page (it shows {history_count(driver)})")
        assert timeline_bars(driver) == total, "the timeline does not show every entry"
        lanes = driver.execute_script("return document.getElementById('timeline').layout.lanes;")
        assert {cluster.node_name("n1"), cluster.node_name("n2")} <= set(lanes), f"the timeline's lanes (by worker): {lanes}"
        assert counts[0] < total, "the page never showed a partial history"
        committed = [entry["step_id"] for entry in history["entries"] if entry["kind"] == "step"]
        assert sorted(committed) == sorted(steps), "the run did not commit every step once"
        shown = step_ids_on_every_page(driver)
        assert len(shown) == total
        listed = sorted(step for step in shown if step in set(steps))
        assert listed == sorted(steps), f"steps not (or not once) in the page's history table: {sorted(set(steps) ^ set(listed))}"
        assert shown[-1] == "(created)", "the oldest entry, the root's creation, is last"
        assert text_of(driver, '[data-total="done"] b') == str(len(steps))
        assert not driver.find_element(By.ID, "cancel").is_displayed()
        assert not console_errors(driver), "a script error or a CSP violation on the run page"

        # The run page for the README: a step opened, the context just after it.
        open_step(driver, step_id(SEQUENTIAL))
        travel_after_open_step(driver, step_id(SEQUENTIAL))
        driver.execute_script("window.scrollTo(0, 0);")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))


# ---- 3. the step panel --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_step_panel_shows_the_change_before_and_after(make_cluster, tmp_path: Path) -> None:
    counter_routine(tmp_path / "counter.json", pauses=False)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    result = cluster.run(tmp_path / "counter.json", timeout_s=150)
    assert result["status"] == "succeeded" and result["variables"]["counter"] == counter_after(SEQUENTIAL), result.get("error")
    run_id = result["run_id"]
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        driver.get(f"{web.base}/runs/{run_id}")
        wait_for(lambda: history_count(driver), 30, "the history to load")
        for n in (SEQUENTIAL, 73):  # the newest step (first page) and one a page further
            open_step(driver, step_id(n))
            changes = panel_changes(driver)
            assert changes == {"counter": (str(counter_after(n) - 1), str(counter_after(n)))}, (n, changes)
            attempts = rows(driver, "#step-panel table:not(.changes) tr")
            assert len(attempts) == 1 and attempts[0][:2] == ["done", "1"], f"the step's one attempt: {attempts}"
            assert attempts[0][2].startswith(("n1-", "n2-")), f"the attempt's worker: {attempts}"
        # The API says the same as the panel (the panel is drawn from it).
        detail = web.client().get(f"/api/runs/{run_id}/steps/{step_id(73)}").json()
        assert [(c["name"], c["before"], c["after"]) for c in detail["changed"]] == [("counter", counter_after(72), counter_after(73))]
        assert not console_errors(driver)


# ---- 4. time travel -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_time_travel_shows_the_counter_after_step_50(make_cluster, tmp_path: Path) -> None:
    counter_routine(tmp_path / "counter.json", pauses=False)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    result = cluster.run(tmp_path / "counter.json", timeout_s=150)
    assert result["status"] == "succeeded", result.get("error")
    run_id = result["run_id"]
    expected = counter_after(50)
    assert cli_json(cluster, "context", run_id, "--at", "s050")["variables"]["counter"] == expected
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        driver.get(f"{web.base}/runs/{run_id}")
        wait_for(lambda: history_count(driver) and driver.find_elements(By.CSS_SELECTOR, '#context tr[data-variable="counter"]'),
                 30, "the history and the context now")
        now = driver.find_element(By.CSS_SELECTOR, '#context tr[data-variable="counter"]').find_elements(By.TAG_NAME, "td")
        assert now[1].text == str(counter_after(SEQUENTIAL)), "the context now"

        open_step(driver, "s050")
        at = travel_after_open_step(driver, "s050")
        assert at["counter"][1] == str(expected), f"counter just after s050: {at['counter']}"
        assert at["counter"][2] == str(expected - 1), "the value before the step"
        assert text_of(driver, "#travel-title").startswith("(root) just after s050 (v")
        # Back to now.
        driver.find_element(By.ID, "now").click()
        wait_for(lambda: text_of(driver, "#travel-title") == "now" and not driver.find_elements(By.CSS_SELECTOR, "table#context-at")
                 and driver.find_elements(By.CSS_SELECTOR, '#context tr[data-variable="counter"]'), 15, "the context now again")
        now = driver.find_element(By.CSS_SELECTOR, '#context tr[data-variable="counter"]').find_elements(By.TAG_NAME, "td")
        assert now[1].text == str(counter_after(SEQUENTIAL))
        assert not console_errors(driver)


# ---- 5. cancel ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_from_the_page_ends_the_run_cancelled(make_cluster, tmp_path: Path) -> None:
    last = slow_routine(tmp_path / "slow.json")
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        run_id = cluster.submit(tmp_path / "slow.json")
        driver.get(f"{web.base}/runs/{run_id}")
        mark_page(driver)
        wait_for(lambda: text_of(driver, "#run-status") == "running" and (history_count(driver) or 0) >= 3
                 and "on" in driver.find_element(By.ID, "live").get_attribute("class"), 60, "the run to be under way, live")
        cancel = driver.find_element(By.ID, "cancel")
        assert cancel.is_displayed()
        cancel.click()
        wait_for(lambda: text_of(driver, "#action-result") == "cancel requested", 30,
                 lambda: f"the cancel's answer (shows {text_of(driver, '#action-result')!r})")
        wait_status(driver, "cancelled", 60)
        assert not_reloaded(driver), "the page was reloaded"
        wait_for(lambda: not driver.find_element(By.ID, "cancel").is_displayed(), 10, "the cancel button to go")

        done = cluster.runctx("status", run_id)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0].startswith(f"run {run_id}: cancelled"), done.stdout
        history = cli_json(cluster, "history", run_id)
        assert history["status"] == "cancelled"
        assert last not in {entry["step_id"] for entry in history["entries"] if entry["kind"] == "step"}, "the run went on to its end"
        assert not console_errors(driver)


@pytest.mark.slow
def test_resume_from_the_page_goes_on_with_a_failed_run(make_cluster, tmp_path: Path) -> None:
    counter = tmp_path / "calls"  # the flaky step fails on its first call, succeeds on its second
    (tmp_path / "flaky.json").write_text(json.dumps({
        "name": "web-flaky", "variables": {"counter": 0},
        "steps": [
            {"id": "before", "action": "increment", "args": {"name": "counter"}},
            {"id": "call", "action": "tests.support.language_actions:flaky", "args": {"counter": str(counter), "succeed_on": 2}},
            {"id": "after", "action": "increment", "args": {"name": "counter"}},
        ],
    }))
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        run_id = cluster.submit(tmp_path / "flaky.json")
        assert cluster.wait(run_id)["status"] == "failed"
        driver.get(f"{web.base}/runs/{run_id}")
        mark_page(driver)
        wait_for(lambda: "on" in driver.find_element(By.ID, "live").get_attribute("class"), 30, "the live updates to connect")
        assert not driver.find_element(By.ID, "cancel").is_displayed()
        driver.find_element(By.ID, "resume").click()
        wait_for(lambda: text_of(driver, "#action-result") == "resume requested", 30,
                 lambda: f"the resume's answer (shows {text_of(driver, '#action-result')!r})")
        wait_status(driver, "succeeded", 60)
        assert not_reloaded(driver), "the page was reloaded"
        wait_for(lambda: not driver.find_element(By.ID, "resume").is_displayed(), 10, "the resume button to go")
        result = cluster.wait(run_id)
        assert (result["variables"]["counter"], result["variables"]["calls"]) == (2, 2)  # `before` once, `call` twice
        assert not console_errors(driver)


@pytest.mark.slow
def test_signal_and_fork_from_the_page(make_cluster, tmp_path: Path) -> None:
    """A run waiting for an event shows it, and the page's signal form (its payload a secret)
    sends it; the step panel's fork button starts a new run from just before that step."""
    secret = f"pin-{uuid.uuid4().hex}"
    (tmp_path / "approval.json").write_text(json.dumps({
        "name": "web-approval", "variables": {"counter": 0, "decision": {"sensitivity": "secret"}},
        "steps": [
            {"id": "first", "action": "increment", "args": {"name": "counter"}},
            {"id": "approve", "wait_for": {"event": "approve", "into": "decision"}},
            {"id": "last", "action": "increment", "args": {"name": "counter", "by": 10}},
        ],
    }))
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    with inspector(cluster) as web, chromium(USER, PASSWORD) as driver:
        run_id = cluster.submit(tmp_path / "approval.json")
        driver.get(f"{web.base}/runs/{run_id}")
        mark_page(driver)
        wait_status(driver, "waiting", 60)
        wait_for(lambda: driver.find_element(By.ID, "waiting").is_displayed() and (text_of(driver, "#waiting-events") or "").strip() == "approve",
                 30, lambda: f"the page to name the event (shows {text_of(driver, '#waiting')!r})")
        assert driver.find_element(By.ID, "signal-event").get_attribute("value") == "approve"
        payload = driver.find_element(By.ID, "signal-payload")
        payload.clear()
        payload.send_keys(json.dumps({"pin": secret}))
        driver.find_element(By.ID, "signal").click()
        wait_for(lambda: text_of(driver, "#action-result") == "approve delivered to step approve", 30,
                 lambda: f"the signal's answer (shows {text_of(driver, '#action-result')!r})")
        wait_status(driver, "succeeded", 60)
        assert not_reloaded(driver), "the page was reloaded"
        assert driver.find_element(By.ID, "signal-payload").get_attribute("value") == "{}"  # not kept in the page
        result = cluster.wait(run_id)
        assert result["variables"]["counter"] == 11 and result["variables"]["decision"] == "***"

        wait_for(lambda: click_row(driver, "#steps", 1, "last"), 30, "the last step in the history, clicked")
        wait_for(lambda: text_of(driver, "#panel-step") == "last", 30, "the step panel")
        driver.find_element(By.ID, "fork").click()
        wait_for(lambda: (text_of(driver, "#action-result") or "").startswith("forked from last: run "), 30,
                 lambda: f"the fork's answer (shows {text_of(driver, '#action-result')!r})")
        forked_id = text_of(driver, "#action-result").rsplit(" ", 1)[-1]
        forked = cluster.wait(forked_id)
        assert forked["status"] == "succeeded" and forked["variables"]["counter"] == 11, forked  # 1 before `last`, + 10
        assert cli_json(cluster, "runs")["runs"][0]["forked_from"] == run_id
        assert secret not in driver.page_source and not console_errors(driver)
        with web.client() as http:  # the API refuses a second signal for the event, saying why in one line
            token = http.get("/api/csrf").json()["token"]
            again = http.post(f"/api/runs/{run_id}/signal", json={"event": "approve", "payload": {"pin": secret}}, headers={"X-CSRF-Token": token})
            assert again.status_code == 409 and "has ended" in again.json()["error"] and secret not in again.text


# ---- 6. need-to-know ----------------------------------------------------------------------------------------


def needles(value: str) -> list[str]:
    """A value as it could appear in text: plain, JSON-escaped, base64 (of it and of its JSON)."""
    forms = {value, json.dumps(value), json.dumps(value)[1:-1]}
    for data in (value.encode(), json.dumps(value).encode()):
        forms |= {base64.b64encode(data).decode().rstrip("="), base64.urlsafe_b64encode(data).decode().rstrip("=")}
    return sorted(forms)


def read_events(client: httpx.Client, path: str, count: int, timeout_s: float = 30.0) -> tuple[list[dict[str, Any]], str]:
    """The first ``count`` events of a server-sent event stream, and all of its text read."""
    events, text = [], []
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", path, timeout=httpx.Timeout(timeout_s)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            text.append(line)
            assert time.monotonic() < deadline, f"only {len(events)} of {count} events from {path} in {timeout_s} s: {text}"
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) >= count:
                    break
    return events, "\n".join(text)


SECRET_ROUTINE = """
name: web-secret
variables:
  token: {sensitivity: secret}
  email: {sensitivity: confidential}
  user: dora
steps:
  - {id: use-token, action: copy, args: {from: token, to: token_copy}, reads: [token]}
  - {id: copy-email, action: copy, args: {from: email, to: email_copy}}
  - {id: pause-1, action: sleep, args: {seconds: 1}}
  - id: fan-out
    parallel:
      - [{id: left, action: increment, args: {name: counter}}, {id: left-pause, action: sleep, args: {seconds: 1}}]
      - [{id: right, action: increment, args: {name: counter}}]
  - {id: pause-2, action: sleep, args: {seconds: 1}}
  - {id: pause-3, action: sleep, args: {seconds: 1}}
  - {id: greet, action: set, args: {name: message, value: hello dora}}
"""


@pytest.mark.slow
def test_secret_and_confidential_values_are_in_no_page_answer_or_event(make_cluster, tmp_path: Path) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    email = f"dora.{uuid.uuid4().hex[:10]}@example.com"
    (tmp_path / "secret.yaml").write_text(SECRET_ROUTINE)
    (tmp_path / "vars.yaml").write_text(f"token: {secret}\nemail: {email}\n")
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    seen: list[tuple[str, str]] = []  # (where, text) of everything the inspector said

    with inspector(cluster) as web, web.client() as api:
        run_id = cluster.submit(tmp_path / "secret.yaml", "--var-file", str(tmp_path / "vars.yaml"))
        # The event streams while the run goes on.
        events, text = read_events(api, f"/api/runs/{run_id}/events", 3)
        seen.append(("run events", text))
        assert any(event.get("status") == "running" for event in events), events
        assert len({event["history_total"] for event in events}) >= 2, f"the events did not follow the run: {events}"
        events, text = read_events(api, "/api/events", 1)
        seen.append(("runs events", text))
        assert [run["run_id"] for run in events[0]["runs"]] == [run_id], events

        assert cluster.wait(run_id, 120)["status"] == "succeeded"
        # The values were really used: the final context holds them, and copies of them.
        store = cluster.store()
        try:
            final = store.l3.get_context(run_id)
            assert (final.variables["token_copy"], final.variables["email_copy"]) == (secret, email)
        finally:
            store.close()

        # Every GET of the API, for this run: each path of its OpenAPI description.
        openapi = api.get("/api/openapi.json").json()
        gets = {path for path, methods in openapi["paths"].items() if "get" in methods}
        history = api.get(f"/api/runs/{run_id}/history").json()
        step_ids = sorted({entry["step_id"] for entry in history["entries"] if entry["step_id"]})
        contexts = api.get(f"/api/runs/{run_id}/contexts").json()
        assert {"use-token", "copy-email", "left", "right", "greet"} <= set(step_ids)
        urls = {
            "/api/csrf": ["/api/csrf"],
            "/api/runs": ["/api/runs", "/api/runs?status=succeeded", "/api/runs?routine=web-secret"],
            "/api/runs/{run_id}": [f"/api/runs/{run_id}"],
            "/api/runs/{run_id}/history": [f"/api/runs/{run_id}/history", f"/api/runs/{run_id}/history?brief=true"]
            + [f"/api/runs/{run_id}/history?context={ctx['path']}" for ctx in contexts["contexts"]],
            "/api/runs/{run_id}/steps/{step_id}": [f"/api/runs/{run_id}/steps/{step}" for step in step_ids],
            "/api/runs/{run_id}/contexts": [f"/api/runs/{run_id}/contexts"],
            "/api/runs/{run_id}/context": [f"/api/runs/{run_id}/context?at={step}" for step in step_ids],
            "/api/runs/{run_id}/diff": [f"/api/runs/{run_id}/diff?a={a}&b={b}" for a, b in
                                        [("use-token", "greet"), ("copy-email", "pause-1"), ("left", "right"), ("greet", "use-token")]],
        }
        streams = {"/api/runs/{run_id}/events", "/api/events"}  # read above
        assert gets == set(urls) | streams, f"API paths this test does not fetch: {gets - set(urls) - streams}"
        for path_urls in urls.values():
            for url in path_urls:
                response = api.get(url)
                assert response.status_code == 200, (url, response.status_code, response.text[:300])
                seen.append((url, response.text))
        shown_at = api.get(f"/api/runs/{run_id}/context?at=copy-email").json()
        assert shown_at["variables"]["token_copy"] == "***" and shown_at["variables"]["email_copy"] == "***", shown_at
        seen += [(path, api.get(path).text) for path in ("/", f"/runs/{run_id}")]  # the pages as served

        # The page, with everything opened: each step's panel and the context just after it.
        with chromium(USER, PASSWORD) as driver:
            driver.get(f"{web.base}/runs/{run_id}")
            wait_for(lambda: history_count(driver) == history["total"]
                     and driver.find_elements(By.CSS_SELECTOR, "#context tr[data-variable]"), 30, "the history and the contexts now")
            seen.append(("run page, the contexts now", driver.page_source))
            assert [c[1] for c in rows(driver, '#context tr[data-variable="token"]')] == ['"***"'], "the secret is shown masked"
            for step in ("use-token", "copy-email", "left", "greet"):
                open_step(driver, step)
                seen.append((f"run page, step panel of {step}", driver.page_source))
                at = travel_after_open_step(driver, step)
                seen.append((f"run page, context just after {step}", driver.page_source))
                if step == "use-token":
                    assert panel_changes(driver) == {"token_copy": ("(new)", '"***"')}, panel_changes(driver)
                    assert at["token_copy"][1] == '"***"' and at["token"][1] == '"***"', at
                if step == "copy-email":
                    assert panel_changes(driver) == {"email_copy": ("(new)", '"***"')}, panel_changes(driver)
            driver.get(web.base + "/")
            wait_for(lambda: rows(driver, f'#runs tbody tr[data-run="{run_id}"]'), 30, "the runs list")
            seen.append(("runs list", driver.page_source))

    assert len(seen) > 20
    problems = [
        f"{where} holds {needle[:24]!r}…"
        for value in (secret, email) for needle in needles(value) for where, text in seen if needle in text
    ]
    assert not problems, "\n".join(problems)


# ---- 7. security ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_credentials_csrf_headers_and_no_open_start_without_a_password(make_cluster, tmp_path: Path) -> None:
    slow_routine(tmp_path / "slow.json", steps=30)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)

    # On an address others reach, no start without credentials: one line naming the setting.
    port = free_port()
    done = cluster.runctx("web", "--bind", f"0.0.0.0:{port}", env={"RUNCTX_WEB_PASSWORD": None, "RUNCTX_WEB_TOKEN": None}, timeout_s=60)
    assert done.returncode != 0, f"runctx web started on 0.0.0.0 without credentials:\n{done.stdout}"
    assert len(done.stderr.strip().splitlines()) == 1 and "RUNCTX_WEB_PASSWORD" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    run_id = cluster.submit(tmp_path / "slow.json")
    with inspector(cluster) as web:
        paths = ["/", f"/runs/{run_id}", "/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/history",
                 "/api/openapi.json", "/api/csrf", "/static/inspector.js", f"/api/runs/{run_id}/events", "/api/events"]
        wrong = [
            None,
            httpx.BasicAuth(USER, PASSWORD + "x"),
            httpx.BasicAuth("someone", PASSWORD),
            httpx.BasicAuth(USER, ""),
        ]
        with httpx.Client(base_url=web.base, timeout=10) as anonymous:
            for path in paths:
                for auth in wrong:
                    response = anonymous.get(path, auth=auth)
                    assert response.status_code == 401, (path, auth, response.status_code)
                    assert response.headers["www-authenticate"].startswith("Basic "), path
                    assert response.json() == {"error": "authentication required (basic auth or a bearer token)"}, path
                for header in (f"Bearer {PASSWORD}", "Basic !!!", basic_auth(USER, PASSWORD)[:-2]):
                    assert anonymous.get(path, headers={"Authorization": header}).status_code == 401, (path, header)
            assert anonymous.post(f"/api/runs/{run_id}/cancel").status_code == 401

            def security_headers(response: httpx.Response) -> None:
                csp = response.headers.get("content-security-policy", "")
                assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
                assert response.headers.get("x-frame-options") == "DENY"
                assert response.headers.get("x-content-type-options") == "nosniff"

            security_headers(anonymous.get("/"))

        with web.client() as api:
            for path in paths[:8]:
                response = api.get(path)
                assert response.status_code == 200, (path, response.status_code, response.text[:200])
                security_headers(response)
            page = api.get(f"/runs/{run_id}").text
            assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline script (the CSP forbids it)"
            assert not re.search(r"\son[a-z]+=", page), "an inline event handler (the CSP forbids it)"

            # A POST needs the CSRF token: the page's, the same /api/csrf gives.
            token = api.get("/api/csrf").json()["token"]
            assert re.search(rf'<body data-csrf="{token}"', page), "the page carries the CSRF token"
            cancel = f"/api/runs/{run_id}/cancel"
            for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "0" * len(token)}, {"X-CSRF-Token": token[:-1]}):
                refused = api.post(cancel, headers=headers)
                assert refused.status_code == 403, (headers, refused.status_code, refused.text)
                security_headers(refused)
            assert api.get(f"/api/runs/{run_id}").json()["status"] == "running", "a refused POST cancelled the run"
            accepted = api.post(cancel, headers={"X-CSRF-Token": token})
            assert accepted.status_code == 200, accepted.text
            assert accepted.json() == {"run_id": run_id, "cancelled": True, "status": "cancelled"}, accepted.text
            assert cluster.wait(run_id, 60)["status"] == "cancelled"
