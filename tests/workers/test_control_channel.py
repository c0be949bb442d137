"""The control channel on real Redis: invalidations, reconnects that clear L1, relays of L3 events, probes."""

from __future__ import annotations

import json
import os

import psycopg

from state import bus
from state.change_events import ChangeListener, libpq_url
from state.models import RunContextInit
from state.store import TieredStore
from state.tiers.data import ConfigEntry
from tests.support.waiting import wait_for
from workers.control import ControlChannel, probe


def test_commits_by_another_process_evict_older_l1_copies(store: TieredStore, make_store) -> None:
    ctx = store.create_context(RunContextInit(run_id="r1", routine_id="x", variables={"n": 1}))
    reader = make_store()
    reader.get_context(ctx.context_id)
    channel = ControlChannel(reader, reader.l2.client, reader.l2.prefix).start()
    try:
        assert channel.subscribed.wait(5)
        with store.edit(ctx.context_id) as working:  # the commit's Lua script broadcasts version 2
            working.set_variable("n", 2)
        wait_for(lambda: reader.l1.context_version(ctx.context_id) is None, 5, "the older L1 copy evicted", 0.01)
        reader.get_context(ctx.context_id)
        assert reader.l1.context_version(ctx.context_id) == 2
        channel.handle(bus.decode(json.dumps({"type": "context", "id": ctx.context_id, "version": 2})))  # not older: kept
        assert reader.l1.context_version(ctx.context_id) == 2
    finally:
        channel.stop()


def test_a_process_that_resubscribes_clears_its_l1(store: TieredStore) -> None:
    channel = ControlChannel(store, store.l2.client, store.l2.prefix).start()
    try:
        assert channel.subscribed.wait(5)
        store.l1.put_config(ConfigEntry(key="config:bot:a", version=1, data={}))
        channel.subscribed.clear()
        mine = f"runctx-{os.getpid()}"
        for client in store.l2.client.client_list(_type="pubsub"):
            if client["name"] == mine:  # the server drops this process's subscription
                store.l2.client.client_kill_filter(_id=client["id"])
        wait_for(lambda: channel.subscribed.is_set(), 10, "the channel subscribed again", 0.01)
        assert store.l1.get_config("config:bot:a") is None
    finally:
        channel.stop()


def test_l3_events_are_relayed_once_and_reach_every_subscribed_process(store: TieredStore, make_store, database_url: str) -> None:
    store.configs.put_config("bot", "helper", {"model": "small"})
    others = [make_store() for _ in range(3)]
    channels = [ControlChannel(other, other.l2.client, other.l2.prefix, identity=f"process-{i}").start() for i, other in enumerate(others)]
    listeners = [ChangeListener(database_url, channel.relay_change).start() for channel in channels]
    try:
        assert all(channel.subscribed.wait(5) for channel in channels)
        answers = probe(store.l2.client, store.l2.prefix, "config:bot:helper", load=True)
        assert len(answers) == 3 and len({answer["digest"] for answer in answers.values()}) == 1
        old_digest = next(iter(answers.values()))["digest"]
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute("""UPDATE configurations SET data = '{"model": "large"}' WHERE name = 'helper'""")
        wait_for(lambda: all(other.l1.get_config("config:bot:helper") is None for other in others), 1, "every L1 copy evicted", 0.01)
        relayed = list(store.l2.client.scan_iter(match=f"{store.l2.prefix}:ev:*"))
        assert len(relayed) == 1  # three listeners heard it, one relayed it
        answers = probe(store.l2.client, store.l2.prefix, "config:bot:helper", load=True)
        assert {answer["version"] for answer in answers.values()} == {2}
        assert old_digest not in {answer["digest"] for answer in answers.values()}
    finally:
        for listener in listeners:
            listener.stop()
        for channel in channels:
            channel.stop()
