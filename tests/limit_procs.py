"""Worker processes for the limit tests: each is a real OS process with its own Redis and HTTP clients."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from jobs.budget import Budget
from jobs.config import Limits
from jobs.redisio import connect
from workers.ratelimit import RateLimiter
from workers.slots import Slots

V4 = "bytedance/seedream-v4/edit"


def submit_through_limiter(
    redis_url: str, prefix: str, api_base: str, image_url: str, seconds: float, rate: float, name: str, out: Any
) -> None:
    """Submit as fast as the shared bucket allows, for `seconds`; report (sent, 429s)."""
    r = connect(redis_url)
    limiter = RateLimiter(r, "key", Limits(submit_rate=rate, submit_burst=1), prefix=prefix)
    sent = rejected = 0
    stop = time.monotonic() + seconds
    with httpx.Client(headers={"Authorization": "Bearer k", "User-Agent": "seedream-batch-tests"}, timeout=10) as http:
        while time.monotonic() < stop:
            grant = limiter.acquire("submit")
            if not grant.go:
                time.sleep(grant.wait)
                continue
            time.sleep(grant.wait)
            resp = http.post(
                f"{api_base}/model/generateImage", json={"model": V4, "prompt": f"{name} {sent}", "images": [image_url]}
            )
            if resp.status_code == 429:
                rejected += 1
            else:
                sent += 1
    out.put((sent, rejected))


def budget_worker(redis_url: str, prefix: str, api_base: str, image_url: str, price: int) -> None:
    """Take jobs from a shared list until it is empty: reserve, claim, submit once, settle."""
    r = connect(redis_url)
    budget = Budget(r, "campaign", prefix=prefix)
    mine = f"{prefix}:processing:{os.getpid()}"
    with httpx.Client(headers={"Authorization": "Bearer k", "User-Agent": "seedream-batch-tests"}, timeout=10) as http:
        while True:
            job = r.lmove(f"{prefix}:jobs", mine, "LEFT", "RIGHT")
            if job is None:
                return
            if not budget.reserve(job, price):
                r.hset(f"{prefix}:status", job, "skipped")
            elif not r.set(f"{prefix}:claim:{job}", "1", nx=True):
                # claimed by a worker that died before recording the outcome: never resubmit
                if r.hget(f"{prefix}:status", job) is None:
                    budget.settle(job, price)
                    r.hset(f"{prefix}:status", job, "uncertain")
            else:
                resp = http.post(
                    f"{api_base}/model/generateImage", json={"model": V4, "prompt": f"job {job}", "images": [image_url]}
                )
                assert resp.status_code == 200, resp.text
                budget.settle(job, price)
                r.hset(f"{prefix}:status", job, "submitted")
            r.lrem(mine, 1, job)


def hold_slots(redis_url: str, prefix: str, capacity: int, lease: float, holders: list[str], ready: Any) -> None:
    """Take slots and then hang, as a worker stuck in a job would, until killed."""
    slots = Slots(connect(redis_url), "key", capacity, lease, prefix=prefix)
    for h in holders:
        assert slots.acquire(h) == 0.0
    ready.put(True)
    time.sleep(3600)


def churn_slots(redis_url: str, prefix: str, capacity: int, seconds: float, name: str, out: Any) -> None:
    """Acquire, hold briefly, release, over and over; track how many are held at once."""
    r = connect(redis_url)
    slots = Slots(r, "key", capacity, 30.0, prefix=prefix)
    taken = 0
    stop = time.monotonic() + seconds
    n = 0
    while time.monotonic() < stop:
        holder = f"{name}-{n}"
        n += 1
        if slots.acquire(holder) > 0:
            continue
        held = r.incr(f"{prefix}:held")
        r.eval(
            "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
            "redis.call('SET', KEYS[1], ARGV[1]) end",
            1,
            f"{prefix}:max_held",
            held,
        )
        taken += 1
        r.decr(f"{prefix}:held")
        slots.release(holder)
    out.put(taken)


def first_grants(redis_url: str, prefix: str, kind: str, out: Any, go: Any) -> None:
    """Once told to, report the first answer (go, wait), then how long until a call of `kind` was allowed."""
    limiter = RateLimiter(connect(redis_url), "key", Limits(poll_rate=50), prefix=prefix)
    out.put("ready")
    go.wait(30)
    t0 = time.monotonic()
    first = limiter.acquire(kind)
    out.put((first.go, first.wait))
    grant = first
    while not grant.go:
        time.sleep(min(grant.wait, 0.05))
        grant = limiter.acquire(kind)
    out.put(time.monotonic() - t0)
