"""The Redis key layout is a contract with running deployments and Lua scripts: every key a run
uses, spelled as it always was."""

from __future__ import annotations

import redis

from jobs import keys
from jobs.budget import Budget
from jobs.claims import Claims
from jobs.control import RunControl
from jobs.store import RunStore
from workers.polling import PollTimes
from workers.uploads import UploadCache


def test_a_runs_keys_are_spelled_as_before() -> None:
    k = keys.RunKeys("sb", "R1")
    assert [k.run, k.job("j1"), k.job(""), k.counts, k.jobs, k.backlog, k.due, k.ready] == [
        "sb:run:R1", "sb:job:R1:j1", "sb:job:R1:", "sb:run:R1:counts", "sb:run:R1:jobs",
        "sb:run:R1:backlog", "sb:run:R1:due", "sb:run:R1:ready",
    ]  # fmt: skip
    assert [k.finalized, k.halt, k.resuming, k.upload("ab12"), k.poll_times("m/v4")] == [
        "sb:run:R1:finalized", "sb:run:R1:halt", "sb:run:R1:resuming", "sb:run:R1:upload:ab12",
        "sb:run:R1:ptimes:m/v4",
    ]  # fmt: skip


def test_the_shared_keys_are_spelled_as_before() -> None:
    assert keys.active_runs("sb") == "sb:runs:active"
    assert keys.edit_claim("sb", "root", "fp") == "sb:edit:root:fp"
    assert keys.budget("sb", "C") == ["sb:budget:C", "sb:budget:C:reserved", "sb:budget:C:settled"]
    assert keys.slots("sb", "k") == "sb:slots:k" and keys.rate("sb", "k") == "sb:rate:k"
    assert keys.reaper_lock("sb") == "sb:reaper:lock"


def test_the_stores_use_the_layout(rconn: redis.Redis) -> None:
    store = RunStore(rconn, prefix="sb")
    k = store.keys("R1")
    assert (k.run, k.job("j"), k.counts, k.jobs) == (
        "sb:run:R1", "sb:job:R1:j", "sb:run:R1:counts", "sb:run:R1:jobs",
    )  # fmt: skip
    assert (k.backlog, k.due, k.ready, k.finalized) == (
        "sb:run:R1:backlog", "sb:run:R1:due", "sb:run:R1:ready", "sb:run:R1:finalized",
    )  # fmt: skip
    assert store.active_key == "sb:runs:active"
    assert RunControl(rconn, prefix="sb").key("R1") == "sb:run:R1:halt"
    assert UploadCache(rconn, "sb").key("R1", "s") == "sb:run:R1:upload:s"
    assert PollTimes(rconn, "sb")._key("R1", "m") == "sb:run:R1:ptimes:m"
    assert Claims(rconn, prefix="sb").key("root", "fp") == "sb:edit:root:fp"
    assert Budget(rconn, "C", prefix="sb").keys == ["sb:budget:C", "sb:budget:C:reserved", "sb:budget:C:settled"]


def test_run_ids_are_read_back_from_a_scan_of_their_head() -> None:
    scanned = ["sb:run:R1", "sb:run:R1:counts", "sb:run:R2", "sb:run:R2:halt"]
    assert keys.run_ids("sb", scanned) == {"R1", "R2"}
