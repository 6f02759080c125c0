"""The money paths under the interleavings that used to pay twice, lose a paid result, pass a cap
or mark a never-sent job uncertain. Each test drives real parts: Redis, the sandbox over HTTP,
storage, and (in the pipeline ones) Celery workers and the CLI as processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.config import WorkerSettings
from jobs.records import PENDING, SUBMITTED, SUCCEEDED, UNCERTAIN
from jobs.restore import Restore, restore_as
from manifests.errors import StateError
from sandbox.server import SandboxProcess
from tests.chaos.redis_server import RedisServer
from tests.conftest import make_client
from tests.helpers import image_bytes, wait_for
from tests.pipeline import EXE, Pipeline, one_job, read_report, run_id_of, stored_record, write_manifest
from workers import steps
from workers.context import Context
from workers.turn import Done, Wait

# -- in-process: two Contexts (two workers) on real Redis and the sandbox over HTTP ---------------


def test_a_second_copy_of_a_message_cannot_end_a_claimed_submit_uncertain(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Two copies of one message (one token): copy A claims the submit and stands still before
    its POST; copy B finds the job `submitting` with no POST sent. B gives the claim back and
    submits once; A's last check then fails, and nothing is uncertain."""
    settings, run_id, folder = one_job(sandbox, redis_url, prefix, tmp_path)
    a, b = Context(settings), Context(settings)
    assert a.runs.claim(run_id, "sku-1", "0", "claim-a") == "ok"  # copy A's claim; A now stands still
    b_wait = steps.advance(b, run_id, "sku-1", "0", due_at=0.0)
    job = b.runs.get(run_id, "sku-1")
    assert job is not None and job.state == SUBMITTED and job.prediction_id, job
    assert isinstance(b_wait, Wait) and b_wait.seconds > 0
    budget_key = a.budget(a.meta(run_id).budget_scope).keys[0]
    a_mark = a.runs.mark_posted(
        run_id, "sku-1", "0", a.control.key(run_id), budget_key, claim="claim-a", posted_at=time.time()
    )
    assert a_mark == "lost"  # A never sends
    assert sandbox.accounting()["created"] == 1
    assert stored_record(folder)["prediction_id"] == job.prediction_id


def test_a_claim_that_did_not_leave_is_pending_again_in_storage_too(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A POST answered 429 proves nothing was created: the job is pending again, and so is its
    durable record, so a resume from storage would not call it uncertain."""
    with make_client(sandbox) as c:  # an input the service already has: the submit is the first call
        url = c.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(faults={"rate_limited": 1.0}, fault_retry_after=1)
    # the sandbox's own files are on 127.0.0.1
    settings, run_id, folder = one_job(
        sandbox, redis_url, prefix, tmp_path, image=url, SEEDREAM_ALLOW_INTERNAL_URLS="1"
    )
    ctx = Context(settings)
    wait = steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
    assert isinstance(wait, Wait) and wait.seconds > 0
    job = ctx.runs.get(run_id, "sku-1")
    assert job is not None and job.state == PENDING and job.posted_at is None
    assert stored_record(folder)["state"] == PENDING
    assert sandbox.accounting()["created"] == 0


class _Died(BaseException):
    """The worker's process ends here (as under SIGKILL: nothing after this line runs)."""


def test_a_worker_that_dies_while_waiting_for_its_send_time_leaves_the_job_pending(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, run_id, _ = one_job(sandbox, redis_url, prefix, tmp_path)
    a, b = Context(settings), Context(settings)

    def die(seconds: float) -> None:
        raise _Died()

    monkeypatch.setattr(steps.time, "sleep", die)  # the wait for its send time is where it dies
    with pytest.raises(_Died):
        steps.advance(a, run_id, "sku-1", "0", due_at=0.0)
    monkeypatch.undo()
    job = a.runs.get(run_id, "sku-1")
    assert job is not None and job.state == PENDING  # not claimed: nothing can take it for sent
    steps.advance(b, run_id, "sku-1", "0", due_at=0.0)  # its message again, on another worker
    job = b.runs.get(run_id, "sku-1")
    assert job is not None and job.state != UNCERTAIN and job.prediction_id
    assert sandbox.accounting()["created"] == 1


def _occupied(sandbox: SandboxProcess) -> None:
    """The service's one place is taken by another client's prediction: a submit is refused (429)."""
    sandbox.reset(delay="fixed:30", max_in_flight=1)
    with make_client(sandbox) as other:
        url = other.upload("x.png", image_bytes(), "image/png")
        other.submit("bytedance/seedream-v4/edit", {"prompt": "occupier", "images": [url]})


def _stop_redis_after_the_post(ctx: Context, run_id: str, server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    client = ctx.client(ctx.meta(run_id).api_base)
    ctx.storage(run_id)  # opened while Redis answers
    real_submit = client.submit

    def submit(*args: Any, **kwargs: Any) -> Any:
        answer = real_submit(*args, **kwargs)  # the real POST: the prediction exists and is billed
        server.stop()  # ... and Redis goes away before the answer is recorded
        return answer

    monkeypatch.setattr(client, "submit", submit)


def test_redis_away_right_after_the_post_keeps_the_prediction_id(
    sandbox: SandboxProcess, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops between the POST's answer and the move to `submitted`, and comes back two
    seconds later: the worker keeps retrying in-process, and the job is submitted with its id."""
    server = RedisServer(tmp_path).start()
    try:
        settings, run_id, folder = one_job(sandbox, server.url, prefix, tmp_path)
        ctx = Context(settings)
        _stop_redis_after_the_post(ctx, run_id, server, monkeypatch)
        restart = threading.Timer(2.0, server.start)
        restart.start()
        wait = steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
        restart.join()
        job = ctx.runs.get(run_id, "sku-1")
        (pid,) = sandbox.accounting()["prediction_ids"]
        assert not isinstance(wait, Done) and job is not None and (job.state, job.prediction_id) == (SUBMITTED, pid)
        assert stored_record(folder)["prediction_id"] == pid
    finally:
        server.stop()


def test_redis_away_right_after_a_refused_post_leaves_the_job_pending_not_uncertain(
    sandbox: SandboxProcess, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service refuses the POST (a 429: its one place is taken; nothing created, nothing
    billed) and Redis stops before the refusal is recorded, for two seconds: the worker keeps
    handing the claim back until Redis answers, so the job is pending, not `submitting` (which
    its next message would end uncertain, never sent again), and it is then sent once and paid once."""
    _occupied(sandbox)
    server = RedisServer(tmp_path).start()
    try:
        settings, run_id, folder = one_job(sandbox, server.url, prefix, tmp_path)
        ctx = Context(settings)
        client = ctx.client(ctx.meta(run_id).api_base)
        ctx.storage(run_id)  # opened while Redis answers
        real_submit = client.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            try:
                return real_submit(*args, **kwargs)  # the real POST, refused by the service
            finally:
                server.stop()  # ... and Redis goes away before the refusal is recorded

        monkeypatch.setattr(client, "submit", submit)
        restart = threading.Timer(2.0, server.start)
        restart.start()
        wait = steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
        restart.join()
        monkeypatch.undo()
        job = ctx.runs.get(run_id, "sku-1")
        acc = sandbox.accounting()
        assert acc["rejected_in_flight"] == 1 and acc["created"] == 1  # the other client's only
        assert isinstance(wait, Wait) and job is not None and job.state == PENDING, job
        assert stored_record(folder)["state"] == PENDING  # a resume from storage would not take it for sent
        sandbox.reset(delay="fixed:0.2")  # the service has room again: the next message sends it
        monkeypatch.setattr(steps, "send_settle", lambda ctx: 0.0)

        def sent() -> bool:  # the job's next messages, once the 429's cool-down is over
            steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
            return ctx.runs.get(run_id, "sku-1").state == SUBMITTED  # type: ignore[union-attr]

        wait_for(sent, timeout=15, what="the job sent once the service has room")
        job = ctx.runs.get(run_id, "sku-1")
        assert job is not None and job.prediction_id, job
        assert sandbox.accounting()["created"] == 1  # this run's one prediction (the reset cleared the other's)
    finally:
        server.stop()


def test_a_copy_of_the_message_that_claims_again_stops_the_first_copys_post(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one message (one token). B claims and stands still in its record write,
    before its last check. C finds the job `submitting` with no POST mark, hands B's claim back and
    claims it again itself. B's last check must fail though its token is the job's: each claim is
    named, and the job is sent once."""
    sandbox.reset(delay="fixed:0.5")
    settings, run_id, folder = one_job(sandbox, redis_url, prefix, tmp_path)
    b, c = Context(settings), Context(settings)
    b_writing, c_claimed, b_checked = threading.Event(), threading.Event(), threading.Event()
    real_write = steps._write_record

    def write_record(ctx: Context, rec: Any, tries: int = 1) -> bool:
        if rec.state == "submitting" and ctx is b and not b_writing.is_set():
            b_writing.set()
            assert c_claimed.wait(30)  # B stands still until C holds the claim
        elif rec.state == "submitting" and ctx is c and not c_claimed.is_set():
            c_claimed.set()
            assert b_checked.wait(30)  # B's last check runs while C holds the claim
        return bool(real_write(ctx, rec, tries))

    monkeypatch.setattr(steps, "_write_record", write_record)
    real_mark_b = b.runs.mark_posted
    marks: list[str] = []

    def mark_b(*args: Any, **kwargs: Any) -> str:
        marks.append(real_mark_b(*args, **kwargs))
        b_checked.set()
        return marks[-1]

    monkeypatch.setattr(b.runs, "mark_posted", mark_b)
    thread_b = threading.Thread(target=lambda: steps.advance(b, run_id, "sku-1", "0", due_at=0.0))
    thread_b.start()
    assert b_writing.wait(30)

    def c_claims() -> bool:
        steps.advance(c, run_id, "sku-1", "0", due_at=0.0)
        return c_claimed.is_set()

    wait_for(c_claims, timeout=30, what="copy C to claim the job again")
    thread_b.join(60)
    monkeypatch.undo()
    assert marks == ["lost"]  # B's claim was handed back and taken again by C: B never POSTs
    token = c.runs.get(run_id, "sku-1").token  # type: ignore[union-attr]

    def ended() -> bool:
        steps.advance(c, run_id, "sku-1", token, due_at=0.0)
        return bool(c.runs.get(run_id, "sku-1").final)  # type: ignore[union-attr]

    wait_for(ended, timeout=60, interval=0.2, what="the job to end")
    acc = sandbox.accounting()
    assert acc["created"] == 1 and acc["duplicate_fingerprints"] == [], acc["created"]
    assert stored_record(folder)["prediction_id"] == acc["prediction_ids"][0]


@pytest.mark.parametrize("second", ["a copy of the message", "a takeover"])
def test_a_hand_back_tried_again_after_its_answer_was_lost_leaves_a_later_sent_claim_alone(
    sandbox: SandboxProcess,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    second: str,
) -> None:
    """Worker A's POST is refused; its hand-back reaches Redis but the answer is lost, so A tries
    again. Meanwhile B (a second copy of the message, or a takeover) claims the job and POSTs.
    A's second try must not hand back B's claim: the job is sent once, its result kept."""
    _occupied(sandbox)
    settings, run_id, folder = one_job(sandbox, redis_url, prefix, tmp_path)
    a, b = Context(settings), Context(settings)
    b_token = "0" if second == "a copy of the message" else "takeover"
    b_posting, a_retried = threading.Event(), threading.Event()
    client_b = b.client(b.meta(run_id).api_base)
    real_submit_b = client_b.submit

    def submit_b(*args: Any, **kwargs: Any) -> Any:  # B's POST is on its way while A tries again
        b_posting.set()
        assert a_retried.wait(30)
        return real_submit_b(*args, **kwargs)

    monkeypatch.setattr(client_b, "submit", submit_b)
    results: dict[str, Any] = {}

    def drive_b() -> None:
        if second == "a takeover":
            b.runs.force_token(run_id, "sku-1", b_token)
        results["b"] = steps.advance(b, run_id, "sku-1", b_token, due_at=0.0)

    real_hand_back = a.runs.hand_back
    answers: list[str] = []
    thread_b = threading.Thread(target=drive_b)

    def hand_back_a(*args: Any, **kwargs: Any) -> str:
        got = real_hand_back(*args, **kwargs)
        answers.append(got)
        if len(answers) == 1:  # it went through in Redis; its answer is lost on the way back
            sandbox.configure(delay="fixed:0.5", max_in_flight=0)  # the service has room again
            thread_b.start()
            assert b_posting.wait(30), "B never reached its POST"
            raise StateError("Redis failed in RunStore.hand_back: connection reset (the answer lost)")
        a_retried.set()
        return got

    monkeypatch.setattr(a.runs, "hand_back", hand_back_a)
    steps.advance(a, run_id, "sku-1", "0", due_at=0.0)
    thread_b.join(60)
    monkeypatch.undo()
    assert answers == ["ok", "kept"]  # the second try left B's sent claim alone
    job = a.runs.get(run_id, "sku-1")
    assert job is not None and job.state == SUBMITTED and job.prediction_id, job
    token = job.token

    def ended() -> bool:  # the job's next messages
        steps.advance(a, run_id, "sku-1", token, due_at=0.0)
        return bool(a.runs.get(run_id, "sku-1").final)  # type: ignore[union-attr]

    wait_for(ended, timeout=60, interval=0.2, what="the job to end")
    job = a.runs.get(run_id, "sku-1")
    acc = sandbox.accounting()
    assert job is not None and job.state == SUCCEEDED, job
    assert acc["prompts_posted"]["white marble"] == 2  # A's refused POST and B's: sent once
    assert acc["duplicate_fingerprints"] == [] and stored_record(folder)["prediction_id"] == job.prediction_id


def test_a_refused_post_whose_job_redis_lost_meanwhile_is_pending_in_its_record(
    sandbox: SandboxProcess, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The POST is refused, and Redis comes back from an outage without its data: the job is gone
    from Redis, and its record says `submitting`, sent. A resume from storage would take it for a
    POST that may have been paid (uncertain, never sent again): the record must say pending."""
    _occupied(sandbox)
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data).start()
    try:
        settings, run_id, folder = one_job(sandbox, server.url, prefix, tmp_path)
        ctx = Context(settings)
        client = ctx.client(ctx.meta(run_id).api_base)
        ctx.storage(run_id)  # opened while Redis answers
        real_submit = client.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            try:
                return real_submit(*args, **kwargs)  # refused: the service's one place is taken
            finally:
                server.stop()
                shutil.rmtree(data)  # ... and its data is lost (a replacement instance, a lost volume)
                data.mkdir()
                threading.Timer(1.0, server.start).start()

        monkeypatch.setattr(client, "submit", submit)
        steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
        wait_for(server.answers, timeout=20, what="Redis back")
        monkeypatch.undo()
        assert ctx.runs.get(run_id, "sku-1") is None  # the run is gone from Redis
        record = stored_record(folder)
        assert record["state"] == PENDING and restore_as(record) is not Restore.MAYBE_SENT, record
        assert sandbox.accounting()["rejected_in_flight"] == 1
    finally:
        server.stop()


def test_redis_away_longer_than_the_worker_holds_on_the_id_is_read_back_from_storage(
    sandbox: SandboxProcess, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stays away longer than the worker retries: the message fails, but the id is in the
    durable record; the next message finds `submitting` with the POST sent, waits for the sender's
    time-outs, reads the id back and polls it: the paid result is fetched, not uncertain."""
    server = RedisServer(tmp_path).start()
    try:
        settings, run_id, folder = one_job(
            sandbox, server.url, prefix, tmp_path, SEEDREAM_HTTP_TIMEOUT="2", SEEDREAM_POLL_RATE="50"
        )
        settings = WorkerSettings(**{**settings.__dict__, "id_hold": 1.0})
        ctx = Context(settings)
        _stop_redis_after_the_post(ctx, run_id, server, monkeypatch)
        with pytest.raises(StateError):
            steps.advance(ctx, run_id, "sku-1", "0", due_at=0.0)
        (pid,) = sandbox.accounting()["prediction_ids"]
        assert stored_record(folder)["prediction_id"] == pid  # the id survived in storage
        server.start()
        monkeypatch.undo()
        later = Context(settings)  # the message again, on any worker

        def drive() -> bool:
            steps.advance(later, run_id, "sku-1", "0", due_at=0.0)
            job = later.runs.get(run_id, "sku-1")
            return job is not None and job.state == SUCCEEDED

        wait_for(drive, timeout=60, interval=0.5, what="the job to be fetched")
        job = later.runs.get(run_id, "sku-1")
        assert job is not None and job.prediction_id == pid and sandbox.accounting()["created"] == 1
    finally:
        server.stop()


# -- with real workers and the CLI -----------------------------------------------------------------


def _rows(tmp: Path, n: int, prompt: str = "on white marble", **extra: Any) -> Path:
    (tmp / "p.png").write_bytes(image_bytes())
    rows = [{"id": f"sku{i:02d}", "prompt": f"{prompt} #{i}", "images": ["p.png"], **extra} for i in range(n)]
    return write_manifest(tmp, rows)


def _report(out: Path, run_id: str) -> list[dict[str, str]]:
    return read_report((out / run_id / "report.csv").read_bytes())


def _never_sent_uncertain(pipe: Pipeline, report: list[dict[str, str]]) -> list[str]:
    posted = pipe.sandbox.accounting()["prompts_posted"]
    return [r["id"] for r in report if r["status"] == UNCERTAIN and not posted.get(r["prompt"])]


def test_campaign_of_two_runs_with_the_same_ids_one_after_the_other(pipe: Pipeline) -> None:
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    first = _rows(pipe.tmp, 7, "this week")
    done = pipe.cli("run", str(first), "--output", str(out), "--campaign", "C", "--budget", "0.19", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    second = pipe.tmp / "next.jsonl"
    second.write_text(first.read_text().replace("this week", "next week"))
    again = pipe.cli(
        "run", str(second), "--output", str(out), "--campaign", "C", "--budget", "0.19", "--allow-partial", "--wait"
    )
    assert again.returncode == 3, again.stdout + again.stderr
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 7 and acc["billed_micros"] <= 190_000
    assert {r["status"] for r in _report(out, run_id_of(again.stdout))} == {"skipped"}


def test_campaign_of_two_runs_with_the_same_ids_at_once(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:0.5")
    out = pipe.tmp / "out"
    first = _rows(pipe.tmp, 7, "this week")
    second = pipe.tmp / "next.jsonl"
    second.write_text(first.read_text().replace("this week", "next week"))
    args = ["--output", str(out), "--campaign", "C", "--budget", "0.19", "--allow-partial", "--no-wait"]
    a = pipe.cli("run", str(first), *args)
    b = pipe.cli("run", str(second), *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pipe.start_workers(2)
    for started in (a, b):
        pipe.wait_done(run_id_of(started.stdout), timeout=120)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 7 and acc["billed_micros"] <= 190_000  # 7 x $0.027 fit the cap, 8 do not


def test_a_row_that_can_yield_several_images_reserves_them_all(pipe: Pipeline) -> None:
    (pipe.tmp / "p.png").write_bytes(image_bytes())
    rows = [
        {"id": "many", "prompt": "four views", "images": ["p.png"], "params": {"max_images": 2}},
        {"id": "one", "prompt": "one view", "images": ["p.png"]},
    ]
    manifest = write_manifest(pipe.tmp, rows)
    est = pipe.cli("estimate", str(manifest))
    assert "0.081" in est.stdout, est.stdout  # 2 x 0.027 + 0.027
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--budget", "0.06", "--allow-partial", "--wait")
    statuses = sorted(r["status"] for r in _report(out, run_id_of(done.stdout)))
    assert statuses == ["skipped", "succeeded"]  # whichever reserved first: both together pass the cap
    assert pipe.sandbox.accounting()["created"] == 1


def test_a_price_above_the_reservation_stops_the_budget_and_says_so(pipe: Pipeline) -> None:
    """The service charges more than the price the run reserved (a price change): the first
    settlement above its reservation stops every further submit of the budget. The charge is
    the one a prediction states: the service sends none by default, its fault does."""
    pipe.sandbox.configure(delay="fixed:0.3", faults={"send_price": 1.0})
    prices = pipe.tmp / "models.json"
    prices.write_text(json.dumps({"bytedance/seedream-v4/edit": {"price_usd": 0.01}}))
    pipe.extra_env.update(
        {"SEEDREAM_MODELS_FILE": str(prices), "SEEDREAM_SUBMIT_RATE": "0.5", "SEEDREAM_SUBMIT_BURST": "1"}
    )
    manifest = _rows(pipe.tmp, 6)
    pipe.start_workers(1, concurrency=1)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--budget", "1.00", "--wait")
    assert done.returncode == 3
    run_id = run_id_of(done.stdout)
    status = json.loads(pipe.cli("status", run_id, "--json").stdout)
    assert status["budget_stopped"] and "above" in status["budget_stopped"]
    report = _report(out, run_id)
    created = pipe.sandbox.accounting()["created"]
    assert created <= 4 and sum(r["status"] == "skipped" for r in report) == 6 - created  # sends 2 s apart
    assert any("above" in r["error"] for r in report if r["status"] == "skipped")
    summary = json.loads((out / run_id / "summary.json").read_text())
    assert "above" in summary["budget"]["stopped"]


def test_retry_failed_does_not_pay_again_unless_asked(pipe: Pipeline) -> None:
    pipe.sandbox.configure(faults={"no_outputs": 1.0})
    manifest = _rows(pipe.tmp, 3)
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait")
    run_id = run_id_of(done.stdout)
    assert {r["status"] for r in _report(out, run_id)} == {"failed"}
    pipe.sandbox.configure(faults={"no_outputs": 0.0})
    held = pipe.cli("retry-failed", run_id)
    assert "0 failed jobs enqueued" in held.stdout and "--pay-again" in held.stdout
    assert pipe.sandbox.accounting()["created"] == 3
    again = pipe.cli("retry-failed", run_id, "--pay-again")
    assert "3 failed jobs enqueued" in again.stdout
    pipe.wait_done(run_id)
    pipe.runs().wait_wrapped_up(run_id, notify=False, timeout=30)
    acc = pipe.sandbox.accounting()
    report = _report(out, run_id)
    assert acc["created"] == 6 and {r["status"] for r in report} == {"succeeded"}
    total = sum(round(float(r["cost_usd"]) * 1e6) for r in report)
    assert total == acc["billed_micros"] == 6 * 27_000  # both attempts of each job are in the report
    assert all(r["history"].startswith("attempt 1: failed (no_outputs) $0.027") for r in report)


def test_a_halt_can_be_lifted_after_a_top_up(pipe: Pipeline) -> None:
    pipe.sandbox.reset(balance_usd=0.06, delay="fixed:0.3")  # pays for 2 edits at $0.027
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "2"
    manifest = _rows(pipe.tmp, 5)
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--allow-partial", "--wait")
    run_id = run_id_of(done.stdout)
    skipped = [r["id"] for r in _report(out, run_id) if r["status"] == "skipped"]
    assert skipped
    pipe.sandbox.configure(balance_usd=10.0)  # the account is topped up
    lifted = pipe.cli("resume", run_id, "--clear-halt")
    assert lifted.returncode == 0 and f"{len(skipped)} skipped jobs enqueued again" in lifted.stdout, lifted.stderr
    progress = pipe.wait_done(run_id)
    assert progress.counts.get("succeeded") == 5 and progress.halted is None
    pipe.runs().wait_wrapped_up(run_id, notify=False, timeout=30)
    report = {r["id"]: r for r in _report(out, run_id)}
    assert all(report[j]["history"].startswith("attempt 1: skipped (payment_required)") for j in skipped)


def test_a_prediction_past_the_poll_deadline_is_overdue_then_reconciled(pipe: Pipeline) -> None:
    """A poll deadline keeps the job open with its prediction id; `reconcile` polls it again,
    fetches the output that arrived later, and settles it once."""
    pipe.sandbox.configure(delay="fixed:6")
    pipe.extra_env["SEEDREAM_POLL_DEADLINE"] = "2"
    manifest = _rows(pipe.tmp, 2)
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait")
    assert done.returncode == 3 and "overdue" in done.stdout, done.stdout
    run_id = run_id_of(done.stdout)
    report = _report(out, run_id)
    assert {r["status"] for r in report} == {"overdue"} and all(r["prediction_id"] for r in report)
    wait_for(lambda: pipe.sandbox.accounting()["finished"] == 2, timeout=20, what="the predictions to end")
    pipe.extra_env["SEEDREAM_POLL_DEADLINE"] = "900"
    pipe.stop()
    pipe.start_workers(1)
    again = pipe.cli("reconcile", run_id)
    assert "2 jobs" in again.stdout, again.stdout + again.stderr
    progress = pipe.wait_done(run_id)
    assert progress.counts.get("succeeded") == 2 and progress.cost_micros == 2 * 27_000
    assert pipe.sandbox.accounting()["created"] == 2


def test_a_wait_longer_than_the_visibility_timeout_is_never_one_message(pipe: Pipeline) -> None:
    """429s with a Retry-After longer than the broker's visibility timeout: no message waits past
    it (a redelivered copy used to end jobs uncertain that were never sent)."""
    pipe.sandbox.configure(faults={"rate_limited": 0.5}, fault_retry_after=14)
    pipe.extra_env.update({"SEEDREAM_VISIBILITY_TIMEOUT": "6", "SEEDREAM_RESTORE_INTERVAL": "1"})
    manifest = _rows(pipe.tmp, 8)
    pipe.start_workers(2)
    out = pipe.tmp / "out"
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait", timeout=240)
    report = _report(out, run_id_of(done.stdout))
    acc = pipe.sandbox.accounting()
    assert acc["counts"].get("injected_429_submit", 0) >= 1
    assert {r["status"] for r in report} == {"succeeded"}, [(r["id"], r["status"], r["error"]) for r in report]
    assert acc["created"] == 8 and acc["duplicate_fingerprints"] == []


def test_a_worker_killed_while_waiting_for_its_send_time_leaves_nothing_uncertain(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:0.5")
    pipe.extra_env.update({"SEEDREAM_SUBMIT_RATE": "2", "SEEDREAM_SUBMIT_BURST": "1"})
    manifest = _rows(pipe.tmp, 16)
    out = pipe.tmp / "out"
    started = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    run_id = run_id_of(started.stdout)
    doomed = pipe.start_workers(1, concurrency=8)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 3, timeout=60, what="some submits")
    os.kill(doomed.procs[0].pid, signal.SIGKILL)  # most of its threads wait for a send time
    pipe.start_workers(1, concurrency=8)
    pipe.wait_done(run_id, timeout=200)
    pipe.runs().wait_wrapped_up(run_id, notify=False, timeout=30)
    report = _report(out, run_id)
    assert _never_sent_uncertain(pipe, report) == []
    assert pipe.sandbox.accounting()["duplicate_fingerprints"] == []


def test_a_resume_under_way_refuses_another(pipe: Pipeline, rconn: redis.Redis) -> None:
    manifest = _rows(pipe.tmp, 2)
    pipe.start_workers(1)
    run_id = run_id_of(pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o"), "--wait").stdout)
    rconn.set(f"{pipe.prefix}:run:{run_id}:resuming", "another", ex=60)  # another resume holds the run
    second = pipe.cli("resume", run_id)
    assert second.returncode == 1 and "being resumed by another command" in second.stderr
    rconn.delete(f"{pipe.prefix}:run:{run_id}:resuming")
    assert pipe.cli("resume", run_id).returncode == 0


def test_resume_is_refused_on_a_live_run_and_two_resumes_never_double_the_report(
    pipe: Pipeline, rconn: redis.Redis
) -> None:
    pipe.sandbox.configure(delay="fixed:1.0")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "5"
    manifest = _rows(pipe.tmp, 12)
    out = pipe.tmp / "out"
    run_id = run_id_of(pipe.cli("run", str(manifest), "--output", str(out), "--no-wait").stdout)
    pipe.start_workers(2)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 3, timeout=60, what="some submits")
    live = pipe.cli("resume", run_id)
    assert live.returncode == 1 and "still driven by workers" in live.stderr, live.stdout + live.stderr
    pipe.stop()  # the workers stop, then Redis loses everything
    for key in rconn.scan_iter(f"{pipe.prefix}*"):
        rconn.delete(key)
    both = [
        subprocess.Popen(
            [EXE, "resume", run_id, "--output", str(out)],
            env=pipe.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(*p.communicate(timeout=120), p.returncode) for p in both]
    # the second either found the first under way (refused) or came after it (the run is in Redis)
    assert all(r[2] == 0 or "resumed by another command" in r[1] or "known to Redis" in r[1] for r in results)
    assert sum(r[2] == 0 for r in results) >= 1, results
    assert rconn.llen(f"{pipe.prefix}:run:{run_id}:jobs") == 12  # each job listed once
    pipe.start_workers(2)
    pipe.wait_done(run_id, timeout=150)
    assert pipe.runs().wait_wrapped_up(run_id, notify=False, timeout=90), "the report was not written"
    report = _report(out, run_id)
    assert [r["id"] for r in report] == [f"sku{i:02d}" for i in range(12)]
    assert _never_sent_uncertain(pipe, report) == []
    assert pipe.sandbox.accounting()["duplicate_fingerprints"] == []
