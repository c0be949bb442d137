"""The transactional outbox on real servers: a step's successor pushed by the step's own commit.

What the commit pushes must be the message ``step.apply_async`` would have published (a worker
cannot tell them apart), and it is pushed only where the broker is L2's own Redis server and
database; elsewhere steps go by ``apply_async`` as before. The commit's push-if-and-only-if-
committed is in the L2 contract suite (tests/state/test_tier_contracts.py), the engine's use of it in
tests/tasks/test_engine.py (every engine test runs with and without it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from runctx.embedded import celery_broker_url
from state.keys import RedisKeys
from state.models import StateCacheConfig
from state.models import RunContextInit
from state.tiers.data import CommitRequest, CommitStatus, CommittedState, StepReport
from state.tiers.redis import RedisTier
from state.tiers.scripts import lua
from state.store import TieredStore
from state.tiers.local import LocalCache
from state.tiers.memory import MemoryL3
from tasks.messages import STATE_HEADER, StepMessage, state_from_header
from workers.dispatcher import CeleryDispatcher
from workers.envelopes import StepEnvelopes
from tests.support.redis_monitor import RedisMonitor, keys_of
from tests.support.servers import Servers


SHA = {name: hashlib.sha1(lua(name).encode()).hexdigest().encode() for name in ("commit", "read", "mark_flushed")}


def app_for(broker_url: str, prefix: str) -> Celery:
    """runctx's Celery configuration with queues of this test's own."""
    import workers.celery_tasks  # noqa: F401  (registers runctx's tasks with every app)

    app = Celery(f"outbox-{prefix}", set_as_current=False)
    app.config_from_object("celeryconfig")
    queue = f"{prefix}.steps"
    app.conf.update(
        broker_url=broker_url,
        task_queues=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)],
        task_default_queue=queue,
        task_routes={"runctx.step": {"queue": queue, "routing_key": queue}},
    )
    return app


def decoded(raw: bytes) -> dict[str, Any]:
    """A message as kombu's Redis transport stores it, with its body decoded and its ids blanked."""
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    ids = {message["headers"]["id"], message["properties"]["delivery_tag"]}
    return json.loads(re.sub("|".join(ids), "<id>", json.dumps(message)))


@pytest.fixture
def l2(servers: Servers, key_prefix: str) -> RedisTier:
    tier = RedisTier.from_url(servers.redis_url, prefix=key_prefix, config=StateCacheConfig())
    yield tier
    tier.close()


def store_on(l2: RedisTier) -> TieredStore:
    """A store whose L2 is ``l2`` (its L3 plays no part in what a commit pushes)."""
    config = StateCacheConfig()
    return TieredStore(LocalCache(config), l2, MemoryL3(), config=config)


@pytest.mark.parametrize("delivery_mode", ["persistent", "transient"])
def test_the_pushed_message_is_the_one_apply_async_publishes(
    servers: Servers, key_prefix: str, l2: RedisTier, delivery_mode: str
) -> None:
    app = app_for(celery_broker_url(servers.redis_url), key_prefix)
    app.conf.task_default_delivery_mode = delivery_mode
    task = app.tasks["runctx.step"]
    envelopes = StepEnvelopes.for_broker(task, store_on(l2))
    assert envelopes is not None and envelopes.queue_key == f"{key_prefix}.steps"
    message = StepMessage("run-1", "greet", 3, 7, {"": 12, "child": 2}, step_id="child/greet", epoch=2)
    try:
        kwargs = message.as_kwargs()
        task.apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs))  # as CeleryDispatcher.step sends it
        published = l2.client.rpop(envelopes.queue_key)
        assert published is not None
        outbox = envelopes.successor(message, "").outbox(12, None)
        assert outbox.queue == envelopes.queue_key
        ours, theirs = decoded(outbox.message), decoded(published)
        assert ours == theirs
        assert ours["headers"]["shadow"] == "greet: child/greet"  # Flower's name for it
        assert ours["body"][1] == kwargs
        # Each message is its own task: new id and delivery tag.
        again = json.loads(envelopes.successor(message, "").outbox(12, None).message)
        assert again["headers"]["id"] != json.loads(outbox.message)["headers"]["id"]
    finally:
        envelopes.close()
        l2.client.delete(f"{key_prefix}.steps")


def test_a_pushed_message_carries_the_state_its_commit_stored_in_a_header_celery_shows_nowhere(
    servers: Servers, key_prefix: str, l2: RedisTier
) -> None:
    app = app_for(celery_broker_url(servers.redis_url), key_prefix)
    task = app.tasks["runctx.step"]
    envelopes = StepEnvelopes.for_broker(task, store_on(l2))
    assert envelopes is not None
    message = StepMessage("run-1", "greet", 3, 7, {"": 12}, step_id="greet", epoch=2)
    state = CommittedState("run-1", 12, 2, ("hello", "before-greet"), b'{"variables":{"greeting":"hi \\"there\\""}}', "k1:" + "0" * 40)
    try:
        kwargs = message.as_kwargs()
        task.apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs))
        theirs = decoded(l2.client.rpop(envelopes.queue_key))
        ours = decoded(envelopes.successor(message, "").outbox(12, state).message)
        carried = ours["headers"].pop(STATE_HEADER)
        assert ours == theirs  # the same message, and one header more
        assert state_from_header(carried) == state
        # Celery hands a message's headers to the task as its request, and puts them in no event.
        assert STATE_HEADER not in json.dumps(ours["properties"]) and carried["d"] not in ours["headers"]["kwargsrepr"]
    finally:
        envelopes.close()
        l2.client.delete(f"{key_prefix}.steps")


@pytest.mark.parametrize(
    "header",
    [None, "text", {}, {"id": "run-1", "v": "12", "e": 1, "s": ["a"], "d": "{}", "c": "k"},
     {"id": "run-1", "v": 12, "e": 1, "s": ["a"], "d": b"{}", "c": "k"}, {"id": "run-1", "v": True, "e": 1, "s": ["a"], "d": "{}", "c": "k"},
     {"id": "run-1", "v": 12, "e": 1, "s": [], "d": "{}", "c": "k"}, {"id": "run-1", "v": 12, "e": 1, "s": "a", "d": "{}", "c": "k"},
     {"id": "run-1", "v": 12, "e": 1, "s": [3], "d": "{}", "c": "k"}],
)
def test_a_malformed_state_header_is_no_state(header: Any) -> None:
    assert state_from_header(header) is None


def test_the_outbox_reaches_a_broker_in_another_database_of_the_same_server(servers: Servers, key_prefix: str) -> None:
    """L2 on database N+1, the broker on N: a commit's script selects the broker's database to push
    the successor, and L2's connection stays on its own (the next commit lands there)."""
    pool = redis.Redis.from_url(servers.redis_url).connection_pool
    home = pool.connection_kwargs.get("db") or 0
    other_db = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": home + 1}))
    broker = redis.Redis.from_url(servers.redis_url)
    tier = RedisTier(other_db, prefix=key_prefix, config=StateCacheConfig())
    store = store_on(tier)
    app = app_for(celery_broker_url(servers.redis_url), key_prefix)
    envelopes = StepEnvelopes.for_broker(app.tasks["runctx.step"], store)
    assert envelopes is not None and envelopes.database == home
    try:
        ctx = store.create_context(RunContextInit(run_id="run-db", routine_id="greet", variables={"n": 0}))
        for version in (1, 2):
            working = ctx.working_copy()
            working.set_variable("n", version)
            working.mark_applied(f"s{version}")
            working.version = version + 1
            outbox = envelopes.successor(StepMessage("run-db", "greet", 1, version, {"": version + 1}, step_id=f"s{version + 1}"), "").outbox(version + 1, None)
            report = StepReport("run-db", f"s{version}", "w", 0.01)
            reply = tier.commit(CommitRequest(working, version, step_id=f"s{version}", report=report, outbox=outbox), now=1.0)
            assert reply.status is CommitStatus.COMMITTED, reply
            ctx = working
        assert broker.llen(envelopes.queue_key) == 2  # both successors, on the broker's database
        assert other_db.llen(envelopes.queue_key) == 0
        assert tier.get_context("run-db").version == 3  # L2's entries stayed on L2's database
        assert broker.exists(tier.keys.context("run-db")) == 0
    finally:
        envelopes.close()
        broker.delete(envelopes.queue_key)
        tier.close()


def test_no_outbox_when_the_broker_is_another_redis_server(servers: Servers, key_prefix: str, own_redis) -> None:
    tier = RedisTier.from_url(servers.redis_url, prefix=key_prefix, config=StateCacheConfig())
    try:
        app = app_for(own_redis.url(0), key_prefix)
        assert StepEnvelopes.for_broker(app.tasks["runctx.step"], store_on(tier)) is None
    finally:
        tier.close()


def test_no_outbox_for_steps_sent_with_a_priority(servers: Servers, key_prefix: str, l2: RedisTier) -> None:
    app = app_for(celery_broker_url(servers.redis_url), key_prefix)
    app.conf.task_default_priority = 5  # kombu keeps such messages on a list of their own
    assert StepEnvelopes.for_broker(app.tasks["runctx.step"], store_on(l2)) is None
    app.conf.task_default_priority = None
    app.conf.task_inherit_parent_priority = True  # a step would take its predecessor's
    assert StepEnvelopes.for_broker(app.tasks["runctx.step"], store_on(l2)) is None


@pytest.mark.skipif(not os.environ.get("RUNCTX_TEST_AMQP_URL"), reason="needs RUNCTX_TEST_AMQP_URL")
def test_no_outbox_with_a_rabbitmq_broker(key_prefix: str, l2: RedisTier) -> None:
    app = app_for(os.environ["RUNCTX_TEST_AMQP_URL"], key_prefix)
    assert StepEnvelopes.for_broker(app.tasks["runctx.step"], store_on(l2)) is None
    assert CeleryDispatcher(app).successor(StepMessage("run-1", "greet", 1, 1), "") is None


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "redis, another database", "redis, RUNCTX_STEP_OUTBOX=false", "amqp"])
def test_a_sequence_runs_on_pushed_messages_when_the_broker_is_l2s_redis(
    make_cluster, servers: Servers, tmp_path: Path, broker: str
) -> None:
    if broker == "amqp" and not os.environ.get("RUNCTX_TEST_AMQP_URL"):
        pytest.skip("needs RUNCTX_TEST_AMQP_URL")
    outbox_off = broker.endswith("=false")
    where = redis.Redis.from_url(servers.redis_url).connection_pool.connection_kwargs
    other_url = f"redis://{where['host']}:{where['port']}/{((where.get('db') or 0) + 9) % 16}"
    other = {"broker_url": other_url} if broker.endswith("another database") else {}
    cluster = make_cluster(broker.split(",")[0], **other, **({"runctx_step_outbox": "false"} if outbox_off else {}))
    cluster.start_nodes("n1", "n2", concurrency=1)
    routine = tmp_path / "seq.yaml"
    steps = "\n".join(f"  - {{id: s{i}, action: increment, args: {{name: counter}}}}" for i in range(40))
    routine.write_text(f"name: outbox-seq\nvariables: {{counter: 0}}\nsteps:\n{steps}\n")
    monitor = RedisMonitor(cluster.redis_url)
    try:
        result = cluster.run(routine)
    finally:
        commands = monitor.stop()
    assert result["status"] == "succeeded", result
    assert result["variables"]["counter"] == 40
    assert all(step["attempts"] == 1 and step["status"] == "succeeded" for step in result["steps"])
    assert {step["worker"].split("-")[0] for step in result["steps"]} == {"n1", "n2"}
    logs = cluster.logs()
    pushing = len(re.findall(r"a step's commit sends its successor \(outbox onto " + re.escape(cluster.prefix), logs))
    sending = logs.count("a step's successor is sent after its commit")
    assert (pushing, sending) == ((2, 0) if broker.startswith("redis") and not outbox_off else (0, 2))
    if outbox_off:
        assert logs.count("RUNCTX_STEP_OUTBOX is off") == 2
    # Each step's one round trip is its commit; with the outbox, each step's message carries what
    # the step before committed, so each worker process reads the context from Redis at most once
    # (before the first state it is carried follows one it holds). The other reads: one for each
    # write-behind flush (each ends in mark_flushed, as the finalize does) and the command's own.
    context_key = RedisKeys(cluster.prefix).context(result["run_id"]).encode()
    by_script = Counter(c[1] for c in commands if c[0].upper() == b"EVALSHA" and context_key in keys_of(c))
    assert by_script[SHA["commit"]] == 40
    if not outbox_off and broker != "amqp":
        assert by_script[SHA["read"]] <= 2 + by_script[SHA["mark_flushed"]] + 1, by_script
