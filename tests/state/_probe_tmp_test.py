import time, json
import psycopg
from state.change_events import libpq_url
from state.history import HistoryEntry, commit_id, event_entry
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.tiers.memory import MemoryL3, MemoryL2
from state.tiers.postgres import PostgresTier
from state.tiers.data import RunRow, CommitRequest
from state.run_history import RunHistory
from state.codec import Codec

def e(run, v, **kw):
    return HistoryEntry(id=commit_id(run, 1, v), run_id=run, context_id=run, kind="edit", version=v, previous=v-1, at=1.0, **kw)

def ctx(cid, epoch=1, **vars):
    c = RunContext.from_init(RunContextInit(run_id=cid.split("/")[0], routine_id="r", context_id=cid, variables=vars or {"n": 1}))
    c.version = 1; c.epoch = epoch
    return c

def test_memory_mark_after_prune():
    l3 = MemoryL3()
    l3.create_run(RunRow("old", "g", 1, "old", "running"), ctx("old"))
    l3.finish_run("old", status="succeeded", error=None, meta={}, contexts=[], exports=[], history=[e("old", 2), e("old", 3)])
    l3.add_history([e("live", 2)])
    got, mark = l3.run_history("live")
    time.sleep(0.02)
    l3.prune_runs(0.001)
    l3.add_history([e("live", 3), e("live", 4)])
    new, _ = l3.run_history("live", after=mark)
    print("memory after prune: mark", mark, "new", [x.id for x in new])
    assert [x.id for x in new] == ["live@1.3", "live@1.4"]

def test_pg_seq_gap(database_url):
    l3 = PostgresTier.from_url(database_url, config=StateCacheConfig())
    with psycopg.connect(libpq_url(database_url)) as slow:
        slow.execute("INSERT INTO step_history (entry_id, run_id, context_id, epoch, version, step_id, kind, at, entry) VALUES (%s,%s,%s,1,2,'','edit',1.0,%s::jsonb)",
                     ("run@1.2", "run", "run", e("run", 2).to_json()))
        l3.add_history([e("run", 3)])  # another worker's flush commits first
        first, mark = l3.run_history("run")
        slow.commit()
    later, _ = l3.run_history("run", after=mark)
    print("pg: first", [x.id for x in first], "mark", mark, "after mark", [x.id for x in later], "all", [x.id for x in l3.run_history("run")[0]])
    assert "run@1.2" in [x.id for x in first + later]

def test_from_json_mutates():
    d = json.loads(e("r", 2).to_json())
    HistoryEntry.from_json(d)
    print("keys after from_json:", "changes" in d)
    assert "changes" in d

def test_concurrent_drain_loses():
    l2 = MemoryL2(prefix="p", config=StateCacheConfig())
    h = RunHistory(l2, MemoryL3(), codec=Codec(), clock=time.time)
    for v in (1, 2):
        h.record(e("run", v))
    _, a = h.waiting(["run"])   # a flush reads 2
    _, b = h.waiting(["run"])   # a finish (or second flush) reads 2
    h.record(e("run", 3))       # pushed meanwhile
    l2.mark_flushed("run", 2, now=1.0, history_taken=a["run"])
    l2.mark_flushed("run", 2, now=1.0, history_taken=b["run"])
    left = l2.history_lists(["run"])["run"]
    print("left after two drains:", left)
    assert len(left) == 1

def test_create_contexts_existing_other_epoch(database_url):
    for l3 in (MemoryL3(), PostgresTier.from_url(database_url, config=StateCacheConfig())):
        l3.create_contexts([ctx("run/item", n=1)])
        l3.create_contexts([ctx("run/item", epoch=2, n=99)])
        print(type(l3).__name__, [(x.id, [c.value for c in x.changes]) for x in l3.run_history("run")[0]])
