"""The state machine (workers/steps.py and the step modules it drives) one transition at a time,
in seconds: a real RunStore on local Redis (its Lua scripts decide every move), the run's storage
in a local folder, and the service as an in-memory stand-in that answers what each test tells it
to. No Celery, no sandbox: a change to a step is checked here before the end-to-end tests run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jobs.budget import BudgetState
from jobs.control import CANCELLED
from jobs.records import (
    FAILED,
    FETCHING,
    PENDING,
    SKIPPED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNCERTAIN,
    JobRecord,
)
from manifests.errors import BadRequest, OutcomeUnknown, RateLimited, StorageError
from tests.helpers import image_bytes
from tests.pipeline import one_job_at, stored_record
from workers import dispatch, ending, events, steps
from workers.atlas import Downloaded, Submitted
from workers.context import Context
from workers.prediction import Prediction, State
from workers.turn import Done, Stale, Wait

API_BASE = "http://atlas.invalid/api/v1"
JOB, TOKEN = "sku-1", "0"
PRICE = 27_000  # the built-in price of the default model, in micros
OUTPUT = "http://atlas.invalid/files/out-0.png"


@dataclass
class FakeAtlas:
    """The service as the steps see it: each call is counted and answers what the test queued for
    it (a queued exception is raised); with nothing queued, a submit is accepted, a poll says
    `running` and a download is a small PNG."""

    submits: list[Any] = field(default_factory=list)
    polls: list[Any] = field(default_factory=list)
    downloads: list[Any] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: {"submit": 0, "poll": 0, "download": 0, "upload": 0})
    on_submit: Any = None  # called before the answer: what happens elsewhere while the POST is out

    def _answer(self, queue: list[Any], default: Any) -> Any:
        got = queue.pop(0) if queue else default
        if isinstance(got, BaseException):
            raise got
        return got

    def upload(self, filename: str, content: bytes, content_type: str) -> str:
        self.calls["upload"] += 1
        return f"http://atlas.invalid/files/{filename}"

    def submit(self, model: str, params: Any) -> Submitted:
        self.calls["submit"] += 1
        if self.on_submit is not None:
            self.on_submit()
        return self._answer(self.submits, Submitted(id=f"pred-{self.calls['submit']}", status="created"))

    def get_prediction(self, prediction_id: str, **_: Any) -> Prediction:
        self.calls["poll"] += 1
        return self._answer(self.polls, Prediction(id=prediction_id, status="processing", state=State.RUNNING))

    def download(self, url: str, **_: Any) -> Downloaded:
        self.calls["download"] += 1
        return self._answer(self.downloads, Downloaded(content=image_bytes(), content_type="image/png"))


def done(pid: str = "pred-1") -> Prediction:
    return Prediction(id=pid, status="completed", state=State.SUCCEEDED, outputs=(OUTPUT,), price_micros=PRICE)


@dataclass
class Harness:
    ctx: Context
    run_id: str
    folder: Path
    atlas: FakeAtlas
    moves: list[tuple[str, str]]

    def drive(self, token: str = TOKEN) -> str:
        """One message for the job; what it asked for next: 'later' (another message after a
        countdown), 'done' (no more messages) or 'stale' (it does not drive the job)."""
        result = steps.drive(self.ctx, self.run_id, JOB, token, due_at=0.0).result
        if isinstance(result, Done):
            return "done"
        if isinstance(result, Stale):
            return "stale"
        assert isinstance(result, Wait) and result.seconds >= 0, result
        return "later"

    def job(self) -> JobRecord:
        rec = self.ctx.runs.get(self.run_id, JOB)
        assert rec is not None
        return rec

    def budget(self) -> BudgetState:
        return self.ctx.budget(self.ctx.meta(self.run_id).budget_scope).state()

    def counts(self) -> dict[str, int]:
        return self.ctx.runs.counts(self.run_id)

    def reservation(self) -> int:
        return ending.reservation(self.ctx.meta(self.run_id), self.job())


@pytest.fixture
def h(redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    settings, run_id, folder = one_job_at(API_BASE, redis_url, prefix, tmp_path, SEEDREAM_POLL_RATE="1000")
    ctx = Context(settings)
    atlas = FakeAtlas()
    monkeypatch.setattr(ctx, "client", lambda api_base: atlas)
    monkeypatch.setattr(dispatch, "send_finalize", lambda run_id, queue: None)  # no Celery here
    moves: list[tuple[str, str]] = []
    real_moved = events.moved

    def moved(rec: JobRecord, expect: str, to: str, **kw: Any) -> None:
        moves.append((expect, to))
        real_moved(rec, expect, to, **kw)

    monkeypatch.setattr(events, "moved", moved)
    yield Harness(ctx, run_id, folder, atlas, moves)
    ctx.redis.close()


def _job_state_now(h: Harness) -> tuple[str, bool]:
    job = h.job()
    return job.state, job.posted_at is not None


# -- the main line ----------------------------------------------------------------------------------


def test_pending_to_succeeded_one_message_at_a_time(h: Harness) -> None:
    seen: list[tuple[str, bool]] = []
    h.atlas.on_submit = lambda: seen.append(_job_state_now(h))
    assert h.job().state == PENDING

    assert h.drive() == "later"  # submitted: the next message polls
    job = h.job()
    assert seen == [(SUBMITTING, True)]  # the POST left from `submitting`, marked as sent
    assert (job.state, job.prediction_id) == (SUBMITTED, "pred-1")
    assert h.moves == [(PENDING, SUBMITTING), (SUBMITTING, SUBMITTED)]
    assert h.counts().get("submitted") == 1
    assert h.budget().reserved_micros == h.reservation() and h.budget().spent_micros == 0
    assert stored_record(h.folder)["prediction_id"] == "pred-1"  # durable before anything else

    assert h.drive() == "later"  # the poll says running: poll again later
    assert h.job().state == SUBMITTED and h.atlas.calls["poll"] == 1

    h.atlas.polls.append(done())
    assert h.drive() == "done"
    job = h.job()
    assert h.moves[2:] == [(SUBMITTED, FETCHING), (FETCHING, SUCCEEDED)]
    assert job.state == SUCCEEDED and job.cost_micros == PRICE and job.record_written
    assert len(job.outputs) == 1 and (h.folder / "outputs" / JOB / "0.png").read_bytes() == image_bytes()
    assert h.budget().spent_micros == PRICE and h.budget().reserved_micros == 0
    assert h.counts().get("succeeded") == 1 and h.counts().get("cost_micros") == PRICE
    assert stored_record(h.folder)["state"] == SUCCEEDED
    assert h.atlas.calls["submit"] == 1

    assert h.drive() == "done"  # a redelivered copy of the last message changes nothing
    assert h.counts().get("succeeded") == 1 and h.budget().spent_micros == PRICE


# -- submit answers ---------------------------------------------------------------------------------


def test_a_submit_refused_with_a_4xx_fails_unpaid_and_gives_the_reservation_back(h: Harness) -> None:
    h.atlas.submits.append(BadRequest("size is not allowed", status=400))
    assert h.drive() == "done"
    job = h.job()
    assert (job.state, job.reason, job.cost_micros) == (FAILED, "bad_request", 0)
    assert "size is not allowed" in job.error
    assert h.budget().reserved_micros == 0 and h.budget().spent_micros == 0
    assert h.counts().get("failed") == 1 and not h.counts().get("cost_micros")
    assert stored_record(h.folder)["state"] == FAILED


def test_a_429_on_submit_waits_again_and_is_not_counted_as_sent(h: Harness) -> None:
    h.atlas.submits.append(RateLimited("rate limit exceeded", retry_after=3.0))
    out = steps.drive(h.ctx, h.run_id, JOB, TOKEN, due_at=0.0)
    assert out.result == Wait(3.0)  # the service's Retry-After
    job = h.job()
    assert (job.state, job.posted_at, job.attempts) == (PENDING, None, 0)
    assert stored_record(h.folder)["state"] == PENDING  # a resume from storage will not call it sent
    assert h.counts().get("http_429") == 1 and not h.counts().get("submitted")
    assert h.budget().spent_micros == 0

    assert h.drive() == "later"  # a message before the Retry-After has passed waits, unsent
    assert h.job().state == PENDING and h.atlas.calls["submit"] == 1


def test_a_post_whose_answer_is_lost_ends_uncertain_at_its_reservation_and_is_never_sent_again(
    h: Harness,
) -> None:
    h.atlas.submits.append(OutcomeUnknown("read timed out after the request was sent"))
    assert h.drive() == "done"
    job = h.job()
    held = h.reservation()
    assert (job.state, job.reason, job.cost_micros) == (UNCERTAIN, "submit_outcome_unknown", held)
    assert h.budget().spent_micros == held and h.budget().reserved_micros == 0
    assert h.drive() == "done"  # its message again: still uncertain, still one POST
    assert h.job().state == UNCERTAIN and h.atlas.calls["submit"] == 1


def test_a_sender_lost_after_its_post_left_is_uncertain_without_a_second_post(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker died between the POST and its answer: the job is `submitting` with its POST marked
    sent, and storage holds no prediction id. The next message ends it uncertain, never resends."""
    ctx, run_id = h.ctx, h.run_id
    budget = ctx.budget(ctx.meta(run_id).budget_scope)
    assert budget.reserve(ending.entry(h.job()), h.reservation())
    assert ctx.runs.claim(run_id, JOB, TOKEN, "claim") == "ok"
    mark = ctx.runs.mark_posted(
        run_id, JOB, TOKEN, ctx.control.key(run_id), budget.keys[0], claim="claim", posted_at=time.time()
    )
    assert mark == "ok"
    monkeypatch.setattr(steps, "send_settle", lambda ctx: 0.0)  # the sender's time-outs have passed
    assert h.drive() == "done"
    job = h.job()
    assert (job.state, job.reason) == (UNCERTAIN, "worker_lost_during_submit")
    assert h.atlas.calls["submit"] == 0
    assert h.budget().spent_micros == h.reservation()


def test_a_sender_answered_after_its_job_was_ended_uncertain_adopts_the_prediction(h: Harness) -> None:
    """While the POST is out, another message ends the job uncertain; then the answer arrives with
    an id. The prediction exists: the job is taken back to `submitted` and polled, not left final."""
    ctx, run_id = h.ctx, h.run_id

    def ended_meanwhile() -> None:
        cost = str(h.reservation())
        assert ctx.runs.transition(run_id, JOB, SUBMITTING, UNCERTAIN, cost_micros=cost) == "ok"
        ctx.budget(ctx.meta(run_id).budget_scope).settle(ending.entry(h.job()), int(cost))

    h.atlas.on_submit = ended_meanwhile
    assert h.drive() == "later"
    job = h.job()
    assert (job.state, job.prediction_id) == (SUBMITTED, "pred-1")
    assert h.budget().spent_micros == 0 and h.budget().reserved_micros == h.reservation()
    h.atlas.polls.append(done())
    assert h.drive() == "done"
    assert h.job().state == SUCCEEDED and h.budget().spent_micros == PRICE and h.atlas.calls["submit"] == 1


# -- polls, tokens, fetch, cancel -------------------------------------------------------------------


def test_a_poll_that_finds_the_prediction_failed_ends_the_job_failed_unpaid(h: Harness) -> None:
    assert h.drive() == "later"
    h.atlas.polls.append(Prediction(id="pred-1", status="failed", state=State.FAILED, error="content refused"))
    assert h.drive() == "done"
    job = h.job()
    assert (job.state, job.reason, job.error, job.cost_micros) == (FAILED, "failed", "content refused", 0)
    assert h.budget().spent_micros == 0 and h.budget().reserved_micros == 0
    assert h.atlas.calls["download"] == 0


def test_a_message_whose_token_no_longer_drives_the_job_stops(h: Harness) -> None:
    assert h.drive() == "later"
    h.ctx.runs.force_token(h.run_id, JOB, "1")  # the job was taken over (the reaper, a resume)
    h.atlas.polls.append(done())
    assert h.drive(TOKEN) == "stale"
    assert h.job().state == SUBMITTED and h.atlas.calls["poll"] == 0
    assert h.drive("1") == "done" and h.job().state == SUCCEEDED


def test_a_second_message_for_a_pending_job_never_sends_twice(h: Harness) -> None:
    assert h.drive("another") == "stale"
    assert h.job().state == PENDING and h.atlas.calls["submit"] == 0


def test_storage_failing_during_the_fetch_is_retried_and_the_paid_output_kept(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert h.drive() == "later"
    storage = h.ctx.storage(h.run_id)
    real_put = storage.put_bytes
    failures = [StorageError("bucket unreachable")]

    def put_bytes(*args: Any, **kwargs: Any) -> str:
        if failures:
            raise failures.pop()
        return real_put(*args, **kwargs)

    monkeypatch.setattr(storage, "put_bytes", put_bytes)
    h.atlas.polls.append(done())
    assert h.drive() == "later"  # back off, then fetch again
    job = h.job()
    assert job.state == FETCHING and job.service_outputs == [OUTPUT] and job.price_micros == PRICE
    assert h.ctx.redis.hget(h.ctx.runs.keys(h.run_id).job(JOB), "store_attempts") == "1"
    assert h.budget().spent_micros == 0  # nothing settled while the output is not stored
    assert h.drive() == "done"
    job = h.job()
    assert job.state == SUCCEEDED and len(job.outputs) == 1 and job.cost_micros == PRICE
    assert h.atlas.calls["poll"] == 1 and h.atlas.calls["download"] == 2  # fetched again, not polled again
    assert (h.folder / "outputs" / JOB / "0.png").exists()


def test_a_cancelled_run_skips_its_pending_job_and_lets_a_submitted_one_finish(h: Harness) -> None:
    assert h.drive() == "later"
    h.ctx.control.halt(h.run_id, CANCELLED)
    h.atlas.polls.append(done())
    assert h.drive() == "done"
    assert h.job().state == SUCCEEDED  # paid for already: its result is fetched


def test_a_cancelled_run_never_sends_its_pending_job(h: Harness) -> None:
    h.ctx.control.halt(h.run_id, CANCELLED)
    assert h.drive() == "done"
    job = h.job()
    assert (job.state, job.reason) == (SKIPPED, CANCELLED)
    assert h.atlas.calls["submit"] == 0 and h.budget().reserved_micros == 0 and h.budget().spent_micros == 0
