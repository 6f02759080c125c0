"""Predictions in flight set by the service: the capacity grows while submits are accepted and
shrinks when the service pushes back, shared in Redis by every worker (workers/slots.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from sandbox.server import SandboxProcess
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, run_id_of, write_manifest
from workers import slots as slots_module
from workers.slots import START, Slots


def fill(slots: Slots, n: int, tag: str = "h") -> list[str]:
    held = [f"{tag}{i}" for i in range(n)]
    for h in held:
        assert slots.acquire(h) == 0.0
    return held


def test_until_a_push_back_the_capacity_follows_the_jobs_that_ask(rconn: redis.Redis, prefix: str) -> None:
    a = Slots(rconn, "key", 1000, 60.0, prefix=prefix)
    b = Slots(rconn, "key", 1000, 60.0, prefix=prefix)  # another worker: one capacity for both
    assert a.capacity(refresh=0) == START
    held = fill(a, 4)
    assert a.accepted(held[0]) == START  # accepted submits alone build nothing
    fill(b, START - 4 + 40, "b")  # every job that asks gets a slot: 40 more than the start
    assert b.capacity(refresh=0) == START + 40 == a.in_use()
    assert not a.scarce(refresh=0)


def test_a_push_back_shrinks_once_then_grows_carefully_and_is_forgotten(
    rconn: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slots_module, "CAREFUL", 3.0)
    s = Slots(rconn, "key", 1000, 60.0, prefix=prefix)
    held = fill(s, 32)
    assert s.in_use() == 32 == s.capacity(refresh=0)
    for h in held[:16]:
        s.accepted(h)
    for h in held[16:28]:
        s.accepted(h)  # 28 accepted by the service; 4 still waiting for their send time
    assert s.capacity(refresh=0) == 32
    cap = s.capacity(refresh=0)
    assert s.pushed_back() == 24  # 7/8 of the 28 the service holds, not of the 32 slots taken
    assert s.pushed_back() == 24  # the submits already on their way are the same event
    assert s.scarce(refresh=0)
    assert cap > 24 and s.acquire("new") > 0
    for h in held[:8]:
        s.release(h)  # 24 in use of 24
    caps = [s.accepted(held[8]) for _ in range(7)]  # below the 28 refused: RECOVER slots per ~24 accepted
    assert 25.0 < caps[-1] < 25.3
    fill(s, 1, "y")  # 25 in use of 25
    caps = [s.accepted(held[8]) for _ in range(300)]
    assert caps[-1] == 28  # held at the 28 refused, not above
    fill(s, 3, "z")
    assert s.acquire("one-too-many") > 0


def test_a_refusal_near_the_level_refused_before_is_the_same_cap_and_one_well_below_cuts(
    rconn: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that caps at K refuses again whenever a probe (or fewer predictions ended and not
    yet polled) reaches it: that holds the capacity at the level refused, without the cut a first
    refusal costs. A refusal well below it means the service has less room: cut again."""
    monkeypatch.setattr(slots_module, "CAREFUL", 3.0)
    monkeypatch.setattr(slots_module, "CALM", 0.0)
    s = Slots(rconn, "key", 1000, 60.0, prefix=prefix)
    held = fill(s, 32)
    for h in held[:28]:
        s.accepted(h)
    assert s.pushed_back() == 24  # the first: 7/8 of the 28 the service held
    for h in held[:2]:
        s.release(h)  # 26 of ours at the service now
    assert s.pushed_back() == 24  # refused at 26, near the 28: the same cap, no cut below 24
    caps = [s.accepted(held[27]) for _ in range(100)]
    assert caps[-1] == 26  # held at the level refused last
    for h in held[2:20]:
        s.release(h)  # 8 of ours at the service, well under 7/8 of 26
    assert s.pushed_back() == 7  # less room than before: cut again
    for h in held[20:]:
        s.release(h)
    wait_for(lambda: not s.scarce(refresh=0), timeout=slots_module.CAREFUL + 5, what="the push-back to be forgotten")
    fill(s, s.capacity(refresh=0) - s.in_use(), "w")  # all taken
    assert s.acquire("after") == 0.0 and s.capacity(refresh=0) == s.in_use()  # the next gets one again


def test_the_ceiling_holds(rconn: redis.Redis, prefix: str) -> None:
    s = Slots(rconn, "key", 5, 60.0, prefix=prefix)
    fill(s, 5)
    assert s.accepted("h0") == 5 and s.acquire("sixth") > 0 and s.capacity(refresh=0) == 5
    assert s.scarce(refresh=0)  # at the user's ceiling and all taken: slots, not the rate, bind


def _photos(tmp: Path, n: int) -> Path:
    (tmp / "p.png").write_bytes(image_bytes(40, 40))
    rows = [{"id": f"sku-{i:03d}", "prompt": f"white marble {i}", "images": ["p.png"]} for i in range(n)]
    return write_manifest(tmp, rows)


def _run_with_defaults(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp: Path, rows: int, threads: int
) -> tuple[str, dict[str, int], dict[str, Any]]:
    """A run of `rows` rows at 20 submits/s with no in-flight ceiling set: (run id, counts, the
    sandbox's accounting)."""
    env = {"SEEDREAM_MAX_IN_FLIGHT": "0", "SEEDREAM_SUBMIT_RATE": "20"}
    pipe = Pipeline(sandbox, redis_url, prefix, tmp, extra_env=env)
    try:
        pipe.start_workers(2, concurrency=threads)
        got = pipe.cli("run", str(_photos(tmp, rows)), "--output", str(tmp / "out"), "--no-wait", "--allow-partial")
        assert got.returncode == 0, got.stderr
        run_id = run_id_of(got.stdout)
        counts = dict(pipe.wait_done(run_id, timeout=240).counts)
        return run_id, counts, sandbox.accounting()
    finally:
        pipe.stop()


def test_with_defaults_a_run_takes_as_many_in_flight_as_its_rate_needs(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """20 submits/s x 4 s predictions need about 80 in flight; a fixed 16 ran at a fifth of the rate."""
    sandbox.reset(delay="fixed:4", submit_rate=25)
    _, counts, acc = _run_with_defaults(sandbox, redis_url, prefix, tmp_path, 160, 16)
    assert counts.get("succeeded") == 160, counts
    assert acc["peak_in_flight"] >= 50, acc["peak_in_flight"]
    assert acc["http_429"] == 0


def test_a_service_that_caps_in_flight_is_met_near_its_cap(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, rconn: redis.Redis
) -> None:
    """The service refuses a 7th prediction at once: the capacity settles near 6 after one
    push-back (and a few submits already on their way), and every job succeeds once."""
    sandbox.reset(delay="fixed:1.5", submit_rate=25, max_in_flight=6)
    run_id, counts, acc = _run_with_defaults(sandbox, redis_url, prefix, tmp_path, 60, 8)
    assert counts.get("succeeded") == 60, counts
    assert acc["created"] == 60 and acc["duplicate_fingerprints"] == []
    assert 1 <= acc["rejected_in_flight"] <= 6, acc["rejected_in_flight"]
    key = next(k for k in rconn.scan_iter(f"{prefix}:slots:*:aimd"))
    # at most the level refused: 6 of ours running, and one that had ended and was not yet polled
    assert 4 <= float(rconn.hget(key, "cap") or 0) <= 7
    report = json.loads((tmp_path / "out" / run_id / "summary.json").read_text())
    assert report["counts"]["succeeded"] == 60
