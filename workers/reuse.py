"""Reuse: an edit already stored is copied, not paid again.

Rows with the same edit (their fingerprint) share one claim (jobs/claims.py), so of two identical
rows, in one run or in two runs into one output, one pays and the other waits for its outputs;
a copy that keeps failing gives up and pays rather than stall its row.
"""

from __future__ import annotations

import logging

from jobs.claims import DONE, FRESH, HELD, MINE
from jobs.records import PENDING, SUCCEEDED
from jobs.results import Entry, find, new_entry
from jobs.retry import backoff
from manifests.errors import StorageError
from workers import events
from workers.context import Context
from workers.ending import end
from workers.turn import StepResult, Turn, Wait

log = logging.getLogger("seedream.jobs")

REUSE_WAIT = 1.0  # how often a job waiting for another's identical edit looks again
REUSE_TRIES = 20  # storage failures while copying a stored edit (about 8 minutes) before the job pays


def reuse(t: Turn) -> StepResult | None:
    """Take the claim on the job's edit (jobs/claims.py) and, where the edit may be stored, copy
    its outputs: the job then succeeds at no cost, nothing reserved, no slot or send taken. A
    countdown while another job makes the same edit or storage fails; None: this job pays for it."""
    root, fp, me = t.run.reuse_claims, t.job.spec.fingerprint, t.holder
    got = t.ctx.claims.take(root, fp, me)
    if got == HELD:
        holder = t.ctx.claims.holder(root, fp)
        if holder is None or not _holder_gone(t.ctx, holder) or not t.ctx.claims.take_from(root, fp, holder, me):
            if not t.job.reuse_look:  # once it is made, look for it
                t.ctx.runs.update(t.job.run_id, t.job.id, reuse_look="1")
            return Wait(REUSE_WAIT)
        got, t.job.reuse_look = FRESH, True  # the holder may have stored it before it went
    if got != DONE and not t.job.reuse_look:
        return None
    try:
        found = _copy_stored(t)
    except StorageError as exc:  # a few tries, then the edit is paid for: a copy must not stall a row
        k = t.ctx.runs.incr(t.job.run_id, t.job.id, "reuse_attempts")
        events.retry(t.job, "reuse", k, str(exc))
        if k < REUSE_TRIES:
            return Wait(backoff(k, 1.0, 30.0))
        found = None
    if found is not None:
        entry, uris, foreign = found
        if foreign:  # copied in from another output (--reuse-from): later runs into this one find it here
            _index_copy(t, entry, uris)
        return end(t, PENDING, SUCCEEDED, bump="reused", outputs=uris,
                    reused_from=f"{entry.run_id}/{entry.job_id}", saved_micros=str(entry.cost_micros))  # fmt: skip
    t.ctx.runs.update(t.job.run_id, t.job.id, reuse_look="")  # not stored (or its outputs are gone): pay for it
    t.job.reuse_look = False
    if got == DONE and t.ctx.claims.take(root, fp, me, over_done=True) not in (FRESH, MINE):
        return Wait(REUSE_WAIT)
    return None


def _copy_stored(t: Turn) -> tuple[Entry, list[str], bool] | None:
    """The entry copied, the copies, and whether it came from another output than the run's."""
    indexes = t.ctx.indexes(t.job.run_id)
    for index, entry in find(indexes, t.job.spec.fingerprint):
        if entry.run_id == t.job.run_id and entry.job_id == t.job.id:
            continue  # its own earlier edit, whose outputs are its own already: a stale entry
        metadata = {"job-id": t.job.id, "run-id": t.job.run_id, "model": entry.model,
                    "prediction-id": entry.prediction_id, "reused-from": f"{entry.run_id}/{entry.job_id}"}  # fmt: skip
        uris = index.copy_outputs(entry, t.ctx.storage(t.job.run_id), t.job.id, metadata)
        if uris is not None:
            return entry, uris, index is not indexes[0]
    return None


def _index_copy(t: Turn, entry: Entry, uris: list[str]) -> None:
    copy = new_entry(
        entry.fingerprint, t.job.run_id, t.job.id, entry.prediction_id, entry.model, uris, entry.cost_micros
    )
    try:
        t.ctx.indexes(t.job.run_id)[0].put(copy)
    except StorageError as exc:  # the copy stands; a later run may pay for this edit again
        log.warning("results index entry for %s not stored (%s)", t.job.id, exc)


def _holder_gone(ctx: Context, holder: str) -> bool:
    """The job holding a claim has ended (its worker died before ending the claim). A holder Redis
    no longer knows is not taken over: its run may be resumed from storage with its prediction
    still running, and would then hold the claim again; if it never is, the lease runs out."""
    run_id, _, job_id = holder.partition(":")
    held = ctx.runs.get(run_id, job_id) if job_id else None
    return held is not None and held.final


def renew_claim(t: Turn) -> None:
    if t.run.reuse and t.job.spec.fingerprint:
        t.ctx.claims.take(t.run.reuse_claims, t.job.spec.fingerprint, t.holder)
