"""The shared limits, hammered by several OS processes against real Redis and the sandbox."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from decimal import Decimal
from typing import Any

import pytest
import redis

from jobs.budget import Budget
from jobs.config import Limits
from jobs.control import CANCELLED, PAYMENT, RunControl
from jobs.estimate import Estimate
from jobs.preflight import account_balance, check
from jobs.redisio import connect
from manifests.errors import ConfigError, StateError
from sandbox.server import SandboxProcess
from tests import limit_procs
from tests.conftest import make_client
from tests.helpers import image_bytes, wait_for
from workers.ratelimit import RateLimiter
from workers.slots import Slots

CTX = mp.get_context("spawn")
PRICE = 27_000


def upload(sandbox: SandboxProcess) -> str:
    with make_client(sandbox) as c:
        return c.upload("p.png", image_bytes(), "image/png")


def start(target: Any, *args: Any) -> Any:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def join_all(procs: list[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        assert p.exitcode is not None, "a worker process did not finish in time"


# -- rate ------------------------------------------------------------------------------------


def test_four_processes_share_one_submit_rate_without_a_429(
    sandbox: SandboxProcess, redis_url: str, prefix: str
) -> None:
    rate, seconds = 10.0, 4.0
    sandbox.configure(submit_rate=rate, submit_burst=2)
    image = upload(sandbox)
    out = CTX.Queue()
    procs = [
        start(
            limit_procs.submit_through_limiter, redis_url, prefix, sandbox.api_base, image, seconds, rate, f"p{i}", out
        )
        for i in range(4)
    ]
    results = [out.get(timeout=60) for _ in procs]
    join_all(procs)
    sent, rejected = sum(r[0] for r in results), sum(r[1] for r in results)
    acc = sandbox.accounting()
    assert rejected == 0 and acc["rejected_rate"] == 0 and acc["http_429"] == 0
    assert acc["peak_submit_rate"] <= rate + 1  # never more than R in any 1 s window (+1 at the edges)
    assert sent == acc["created"] >= 0.9 * rate * seconds  # and the rate is used


def test_a_429_cools_every_process_down(redis_url: str, rconn: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(rconn, "key", Limits(poll_rate=50), prefix=prefix)
    assert limiter.acquire("poll").go
    out, go = CTX.Queue(), CTX.Event()
    child = start(limit_procs.first_grants, redis_url, prefix, "poll", out, go)
    assert out.get(timeout=30) == "ready"
    limiter.cool_down("poll", 1.5)
    go.set()
    refused = out.get(timeout=30)
    assert not refused[0] and 1.0 < refused[1] <= 1.5  # another process is paused too
    assert out.get(timeout=30) >= 1.0  # and gets its turn only after the pause
    join_all([child])
    assert limiter.acquire("submit").go  # other kinds are not paused


def test_cool_down_without_retry_after_backs_off(rconn: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(rconn, "key", Limits(), prefix=prefix, backoff_initial=0.5, backoff_max=1.5)
    assert [round(limiter.cool_down("upload", None), 2) for _ in range(3)] == [0.5, 1.0, 1.5]


def test_bucket_hands_out_future_slots_then_says_come_back(rconn: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(rconn, "key", Limits(submit_rate=10, submit_burst=1, headroom=0.0), prefix=prefix)
    grants = [limiter.acquire("submit") for _ in range(8)]
    goes = [g for g in grants if g.go]
    assert [round(g.wait, 1) for g in goes] == [0.0, 0.1, 0.2, 0.3, 0.4]  # horizon: 4 intervals
    later = [g.wait for g in grants[len(goes) :]]
    assert all(not g.go for g in grants[len(goes) :])
    # each caller turned away gets its own place in line, one interval after the last, and is
    # told to come back a little before it: no herd retrying all at once
    assert len(later) == 3 and all(abs(w - want) < 0.03 for w, want in zip(later, (0.4, 0.5, 0.6), strict=True))


def test_headroom_spaces_sends_a_little_wider_than_the_rate(rconn: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(rconn, "key", Limits(submit_rate=10, submit_burst=1, headroom=0.2), prefix=prefix)
    waits = [g.wait for g in (limiter.acquire("submit") for _ in range(3))]
    # 1 / (10 x 0.8) apart, not 0.1 (less the few ms that pass between the calls on a busy machine)
    assert waits == pytest.approx([0.0, 0.125, 0.25], abs=0.01)
    with pytest.raises(ConfigError):
        Limits.from_env({"SEEDREAM_RATE_HEADROOM": "0.9"})


def test_pace_spaces_sends_as_they_leave_and_holds_them_in_a_cool_down(rconn: redis.Redis, prefix: str) -> None:
    """Two sends booked apart but reaching the wire together (the first one late) leave 1/rate
    apart; after a 429 elsewhere, a send already booked does not leave until the pause ends."""
    limiter = RateLimiter(rconn, "key", Limits(submit_rate=10, submit_burst=1), prefix=prefix)
    late, on_time = limiter.pace("submit"), limiter.pace("submit")
    assert late.go and on_time.go
    assert late.wait == pytest.approx(0.0, abs=0.01) and on_time.wait == pytest.approx(0.1, abs=0.01)
    limiter.cool_down("submit", 5.0)
    held = limiter.pace("submit")
    assert not held.go and held.wait == pytest.approx(5.0, abs=0.1)


def test_pace_lets_a_configured_burst_leave_back_to_back(rconn: redis.Redis, prefix: str) -> None:
    """SEEDREAM_SUBMIT_BURST holds at the wire too: the last check does not space a burst out."""
    limiter = RateLimiter(rconn, "key", Limits(submit_rate=10, submit_burst=2), prefix=prefix)
    first, second, third = (limiter.pace("submit") for _ in range(3))
    assert first.wait == pytest.approx(0.0, abs=0.01) and second.wait == pytest.approx(0.0, abs=0.01)
    assert third.wait == pytest.approx(0.1, abs=0.01)


# -- budget ----------------------------------------------------------------------------------


def test_budget_of_exactly_n_jobs_pays_n_even_with_workers_killed(
    sandbox: SandboxProcess, redis_url: str, rconn: redis.Redis, prefix: str
) -> None:
    n, total = 25, 80
    image = upload(sandbox)
    Budget(rconn, "campaign", prefix=prefix).set_cap(n * PRICE)
    rconn.rpush(f"{prefix}:jobs", *[f"job-{i:03d}" for i in range(total)])
    args = (redis_url, prefix, sandbox.api_base, image, PRICE)
    procs = [start(limit_procs.budget_worker, *args) for _ in range(4)]
    kills = 0
    for threshold in (5, 12):
        wait_for(lambda t=threshold: sandbox.accounting()["created"] >= t, timeout=60, what="submits")
        victim = next((p for p in procs if p.is_alive()), None)
        if victim is None:
            break
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        kills += 1
        for key in rconn.scan_iter(f"{prefix}:processing:{victim.pid}"):
            while rconn.lmove(key, f"{prefix}:jobs", "LEFT", "RIGHT"):
                pass
        procs.append(start(limit_procs.budget_worker, *args))
    join_all(procs)
    assert kills >= 1
    statuses = rconn.hgetall(f"{prefix}:status")
    assert len(statuses) == total
    counts = {s: list(statuses.values()).count(s) for s in ("submitted", "uncertain", "skipped")}
    acc = sandbox.accounting()
    state = Budget(rconn, "campaign", prefix=prefix).state()
    assert acc["created"] <= n  # never N+1
    assert counts["submitted"] + counts["uncertain"] == n  # the budget is used to the last job
    assert counts["skipped"] == total - n
    assert state.spent_micros == n * PRICE and state.reserved_micros == 0
    assert acc["duplicate_fingerprints"] == []


def test_budget_is_idempotent_per_job_and_releases(rconn: redis.Redis, prefix: str) -> None:
    b = Budget(rconn, "run-1", prefix=prefix)
    b.set_cap(2 * PRICE)
    assert b.reserve("a", PRICE) and b.reserve("a", PRICE)  # a redelivery reserves nothing more
    assert b.reserve("b", PRICE) and not b.reserve("c", PRICE)
    assert b.release("b") and b.reserve("c", PRICE)
    assert b.settle("a", 26_500) and not b.settle("a", 26_500)  # settled with the prediction's own price
    s = b.state()
    assert (s.spent_micros, s.reserved_micros, s.refused, s.remaining_micros) == (26_500, PRICE, 1, 500)


def test_a_campaign_budget_is_shared_by_runs(rconn: redis.Redis, prefix: str) -> None:
    run_a, run_b = Budget(rconn, "spring", prefix=prefix), Budget(rconn, "spring", prefix=prefix)
    run_a.set_cap(3 * PRICE)
    assert run_a.reserve("a-1", PRICE) and run_a.reserve("a-2", PRICE)
    assert run_b.reserve("b-1", PRICE) and not run_b.reserve("b-2", PRICE)


def test_budget_scope_must_be_safe(rconn: redis.Redis) -> None:
    with pytest.raises(ConfigError):
        Budget(rconn, "../x")


# -- slots -----------------------------------------------------------------------------------


def test_slots_of_a_killed_process_come_back_within_the_lease(redis_url: str, rconn: redis.Redis, prefix: str) -> None:
    lease = 1.5
    ready = CTX.Queue()
    holder = start(limit_procs.hold_slots, redis_url, prefix, 3, lease, ["x1", "x2", "x3"], ready)
    assert ready.get(timeout=30)
    slots = Slots(rconn, "key", 3, lease, prefix=prefix)
    assert slots.acquire("me") > 0  # all taken
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: slots.acquire("me") == 0.0, timeout=lease + 2, interval=0.05, what="slot back")
    assert time.monotonic() - killed <= lease + 0.5
    holder.join(5)


def test_slots_never_exceed_capacity_under_churn(redis_url: str, rconn: redis.Redis, prefix: str) -> None:
    out = CTX.Queue()
    procs = [start(limit_procs.churn_slots, redis_url, prefix, 3, 2.0, f"w{i}", out) for i in range(4)]
    taken = sum(out.get(timeout=60) for _ in procs)
    join_all(procs)
    assert taken > 50
    assert 1 <= int(rconn.get(f"{prefix}:max_held") or 0) <= 3


def test_renewing_an_expired_slot_takes_it_back(rconn: redis.Redis, prefix: str) -> None:
    slots = Slots(rconn, "key", 1, 0.2, prefix=prefix)
    assert slots.acquire("a") == 0.0
    wait_for(lambda: slots.in_use() == 0, timeout=2, what="lease to expire")
    slots.renew("a")  # its prediction still runs at the service: count it again
    assert slots.in_use() == 1 and slots.acquire("b") > 0
    slots.release("a")
    assert slots.acquire("b") == 0.0


# -- stops and pre-flight --------------------------------------------------------------------


def test_run_halt_keeps_the_first_reason(rconn: redis.Redis, prefix: str) -> None:
    control = RunControl(rconn, prefix=prefix)
    assert control.halted("r1") is None
    assert control.halt("r1", PAYMENT) == PAYMENT
    assert control.halt("r1", CANCELLED) == PAYMENT
    assert control.halted("r2") is None


def test_preflight_refuses_over_budget_unless_partial() -> None:
    from jobs.budget import BudgetState

    est = Estimate(jobs=10, total_micros=270_000, fit_jobs=7)
    budget = BudgetState(cap_micros=200_000, spent_micros=10_000, reserved_micros=0, refused=0)
    refused = check(est, budget, None, allow_partial=False)
    assert not refused.ok and "$0.27" in refused.messages[0] and "$0.19 left" in refused.messages[0]
    assert "--allow-partial" in refused.messages[0] and "7 of 10 jobs fit" in refused.messages[0]
    assert check(est, budget, None, allow_partial=True).ok
    assert check(est, None, 1000.0, allow_partial=False).ok


def test_preflight_compares_with_the_balance_the_service_reports(sandbox: SandboxProcess) -> None:
    sandbox.reset(balance_usd=0.10)
    with make_client(sandbox) as client:
        balance, note = account_balance(client)
    assert balance == Decimal("0.100000") and note is None  # read exactly, never through a float
    verdict = check(Estimate(jobs=5, total_micros=135_000), None, balance, allow_partial=False)
    assert not verdict.ok and "balance is $0.10" in verdict.messages[0]


def test_limits_from_environment_and_refusals() -> None:
    lim = Limits.from_env({"SEEDREAM_SUBMIT_RATE": "12.5", "SEEDREAM_MAX_IN_FLIGHT": "40"})
    assert (lim.submit_rate, lim.max_in_flight, lim.poll_rate) == (12.5, 40, 20.0)
    with pytest.raises(ConfigError):
        Limits.from_env({"SEEDREAM_SUBMIT_RATE": "fast"})
    with pytest.raises(ConfigError):
        Limits.from_env({"SEEDREAM_SUBMIT_RATE": "0"})


def test_redis_failures_become_state_errors(prefix: str) -> None:
    dead = connect("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(StateError):
        Budget(dead, "x", prefix=prefix).reserve("a", 1)
