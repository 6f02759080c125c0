"""The admission window: a run's jobs enter the task queue a few at a time, and none is left behind."""

from __future__ import annotations

import threading

import pytest
import redis

from jobs.backlog import Backlog
from jobs.config import Limits
from jobs.records import PENDING, SKIPPED, SUBMITTED, SUBMITTING, SUCCEEDED
from jobs.store import RunStore
from manifests.spec import JobSpec
from tests.pipeline import Pipeline, catalog, run_id_of


def _spec(i: int) -> JobSpec:
    return JobSpec(line=i + 2, id=f"j{i}", prompt="p", model="m", size=None, params={}, metadata={}, images=())


def test_admit_lets_in_up_to_the_window_and_skips_settled_and_duplicates(rconn: redis.Redis, prefix: str) -> None:
    store = RunStore(rconn, prefix=prefix)
    backlog = Backlog(rconn, store)
    store.create_run("r", {"run_id": "r"})
    ids = store.add_jobs("r", [_spec(i) for i in range(6)], "t0")
    assert backlog.waiting("r") == 6 and rconn.zcard(store.keys("r").due) == 0  # created, not yet let in
    store.update("r", "j1", state=SUCCEEDED, record_written="1")  # settled meanwhile: never let in
    store.update("r", "j2", state="failed", record_written="0")  # ended, record not stored: let in to store it

    assert backlog.admit("r", 3, now=100.0) == [("j0", "t0", PENDING), ("j2", "t0", "failed"), ("j3", "t0", PENDING)]
    assert rconn.zrange(store.keys("r").due, 0, -1, withscores=True) == [("j0", 100.0), ("j2", 100.0), ("j3", 100.0)]
    assert backlog.admit("r", 3) == []  # full: nothing more until one leaves

    store.clear_due("r", "j0")
    store.clear_due("r", "j3")
    assert backlog.admit("r", 3) == [("j4", "t0", PENDING), ("j5", "t0", PENDING)]
    backlog.push("r", ["j4", "j0"])  # j4 is out: this second entry is dropped; j0 is not (pushed again)
    assert backlog.admit("r", 3, done="j2") == [("j0", "t0", PENDING)] and backlog.waiting("r") == 0  # j2 out
    assert rconn.zscore(store.keys("r").due, "j2") is None
    assert ids == [f"j{i}" for i in range(6)] and store.get("r", "j5").state == PENDING  # type: ignore[union-attr]


def test_concurrent_admits_never_exceed_the_window(rconn: redis.Redis, prefix: str) -> None:
    store = RunStore(rconn, prefix=prefix)
    store.create_run("r", {"run_id": "r"})
    store.add_jobs("r", [_spec(i) for i in range(200)], "t0")
    got: list[str] = []
    lock = threading.Lock()

    def admit() -> None:
        mine = Backlog(redis.Redis(connection_pool=rconn.connection_pool), store).admit("r", 25)
        with lock:
            got.extend(j for j, _, _ in mine)

    threads = [threading.Thread(target=admit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == len(set(got)) == 25 == rconn.zcard(store.keys("r").due)


def _started(pipe: Pipeline, rconn: redis.Redis, rows: int, delay: str) -> tuple[str, RunStore]:
    """A run of `rows` catalog rows started with --no-wait, before any worker is up."""
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, rows)
    pipe.sandbox.configure(delay=delay)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    assert started.returncode == 0, started.stderr
    return run_id_of(started.stdout), RunStore(rconn, prefix=pipe.prefix)


def test_a_run_keeps_at_most_its_window_queued_and_finishes(pipe: Pipeline, rconn: redis.Redis) -> None:
    pipe.extra_env["SEEDREAM_WINDOW"] = "4"
    run_id, store = _started(pipe, rconn, 30, "uniform:0.05:0.2")
    assert rconn.llen(pipe.prefix) == 4 and rconn.llen(store.keys(run_id).backlog) == 26  # before any worker
    pipe.start_workers(2)
    most = [0]
    runs = pipe.runs()

    def sample() -> bool:
        most[0] = max(most[0], rconn.zcard(store.keys(run_id).due), rconn.llen(pipe.prefix))
        return runs.progress(run_id).done

    from tests.helpers import wait_for

    wait_for(sample, timeout=120, interval=0.02, what="the run to finish")
    acc = pipe.sandbox.accounting()
    assert runs.progress(run_id).counts["succeeded"] == 30 and acc["duplicate_fingerprints"] == []
    assert 1 <= most[0] <= 4


@pytest.mark.parametrize("lost", ["messages", "admission"])
def test_the_watchdog_drives_jobs_nothing_else_will(pipe: Pipeline, rconn: redis.Redis, lost: str) -> None:
    """messages: the publisher died after taking jobs out of the backlog, before publishing them.
    admission: the jobs were created, but whoever should have let them in died first (the CLI
    right after creating them, or a worker after a job ended). Either way the run finishes."""
    pipe.extra_env["SEEDREAM_WINDOW"] = "3"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 9)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    run_id = run_id_of(started.stdout)
    store = RunStore(rconn, prefix=pipe.prefix)
    first = ["sku-000", "sku-001", "sku-002"]
    assert rconn.zrange(store.keys(run_id).due, 0, -1) == first
    rconn.delete(pipe.prefix)  # their messages never reached the broker
    if lost == "messages":
        rconn.zadd(store.keys(run_id).due, dict.fromkeys(first, 0.0))  # and they are long overdue
    else:
        rconn.delete(store.keys(run_id).due)
        rconn.lpush(store.keys(run_id).backlog, *reversed(first))
    pipe.start_workers(1)
    assert pipe.wait_done(run_id, timeout=120).counts["succeeded"] == 9
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 9 and acc["duplicate_fingerprints"] == []
    assert store.counts(run_id).get("redriven", 0) == (3 if lost == "messages" else 0)


def test_the_automatic_window_follows_the_slots_plus_a_bounded_two_seconds_of_submits() -> None:
    """A rate set far above what workers can send ("no limit") must not let a whole run in:
    past its slots, every job let in spins on "no slot yet" and buries the polls that free them.
    The window follows the slots there are now (learned from the service), with room for the
    jobs fetching, so that it never binds before the slots (which grow only while all taken)."""
    assert Limits(submit_rate=2.0).admission_window(16) == 16 + 32 + 8
    assert Limits(submit_rate=20.0).admission_window(16) == 16 + 40 + 8
    assert Limits(submit_rate=10.0).admission_window(200) == 200 + 32 + 25
    assert Limits(submit_rate=10_000.0).admission_window(1000) == 1000 + 256 + 125
    assert Limits(submit_rate=10_000.0, window=5).admission_window(1000) == 5
    assert Limits(submit_rate=20.0, max_in_flight=256).admission_ready == 40
    assert Limits().in_flight_ceiling == 1000 and Limits(max_in_flight=24).in_flight_ceiling == 24


def test_at_most_ready_jobs_are_out_unsubmitted_and_each_submit_or_end_frees_a_place(
    rconn: redis.Redis, prefix: str
) -> None:
    store = RunStore(rconn, prefix=prefix)
    backlog = Backlog(rconn, store)
    store.create_run("r", {"run_id": "r"})
    store.add_jobs("r", [_spec(i) for i in range(10)], "t0")
    store.update("r", "j3", state=SUBMITTED)  # resumed in flight: let in without taking a ready place
    assert [j for j, _, _ in backlog.admit("r", 8, ready=3)] == ["j0", "j1", "j2"]
    assert backlog.admit("r", 8, ready=3) == []  # the window has room, the ready part has none
    assert store.transition("r", "j0", PENDING, SUBMITTING) == "ok"
    assert backlog.admit("r", 8, ready=3) == []  # a submit under way still holds its place
    assert store.transition("r", "j0", SUBMITTING, SUBMITTED) == "ok"
    assert [j for j, _, _ in backlog.admit("r", 8, ready=3)] == ["j3", "j4"]
    assert store.transition("r", "j1", PENDING, SKIPPED) == "ok"  # ended before its submit
    assert [j for j, _, _ in backlog.admit("r", 8, ready=3, done="j1")] == ["j5"]
    store.update("r", "j2", state=SUBMITTED)  # moved without the transition (a hand edit, a bug)
    assert backlog.admit("r", 8, ready=3) == []
    assert backlog.prune_ready("r") == 1  # the watchdog frees the place
    assert [j for j, _, _ in backlog.admit("r", 8, ready=3)] == ["j6"]
    assert rconn.smembers(store.keys("r").ready) == {"j4", "j5", "j6"} and rconn.zcard(store.keys("r").due) == 6


def test_jobs_waiting_for_their_turn_to_submit_are_let_in_as_submits_go(pipe: Pipeline, rconn: redis.Redis) -> None:
    """60 jobs at 10 submits/s with 100 slots: a window of 132, but at most 32 let in unsubmitted;
    the rest come in as jobs are submitted (before any ends), and the run finishes."""
    pipe.extra_env.update({"SEEDREAM_SUBMIT_RATE": "10", "SEEDREAM_MAX_IN_FLIGHT": "100"})
    run_id, store = _started(pipe, rconn, 60, "uniform:3:4")
    assert rconn.scard(store.keys(run_id).ready) == 32 and rconn.llen(store.keys(run_id).backlog) == 28
    pipe.start_workers(2)
    most = {"ready": 0, "out_before_an_end": 0}
    runs = pipe.runs()

    def sample() -> bool:
        most["ready"] = max(most["ready"], rconn.scard(store.keys(run_id).ready))
        p = runs.progress(run_id)
        if p.finished == 0:
            most["out_before_an_end"] = max(most["out_before_an_end"], rconn.zcard(store.keys(run_id).due))
        return p.done

    from tests.helpers import wait_for

    wait_for(sample, timeout=120, interval=0.02, what="the run to finish")
    acc = pipe.sandbox.accounting()
    assert runs.progress(run_id).counts["succeeded"] == 60 and acc["duplicate_fingerprints"] == []
    assert most["ready"] <= 32 < most["out_before_an_end"]
    assert rconn.scard(store.keys(run_id).ready) == 0
