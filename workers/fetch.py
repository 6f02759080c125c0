"""The fetch step: a succeeded prediction's outputs are streamed, checked and stored.

The prediction is paid for once it ends, so an output that cannot be had fails the job with its
cost still counted; each output stored is recorded before the next, so a worker that dies
midway leaves only the rest to fetch.
"""

from __future__ import annotations

from jobs.records import FAILED, FETCHING, SUCCEEDED
from jobs.results import new_entry
from jobs.retry import backoff
from jobs.thumbs import store_output_thumbnail
from manifests.errors import BadOutput, BadRequest, ServiceError, StorageError
from manifests.images import NotAnImage, inspect
from workers import events
from workers.ending import end
from workers.reuse import renew_claim
from workers.turn import Next, StepResult, Turn, Wait


def _output_lost(t: Turn, error: str, reason: str, price: int, outputs: list[str]) -> Next:
    """A paid output that cannot be had: the job fails, and its cost still counts."""
    return end(t, FETCHING, FAILED, error=error, reason=reason, cost=price, outputs=outputs)


def fetch(t: Turn) -> StepResult:
    run_id = t.job.run_id
    price = t.job.price_micros if t.job.price_micros is not None else t.run.list_price(t.job.spec.model)
    outputs = list(t.job.outputs)
    client = t.ctx.client(t.run.api_base)
    storage = t.ctx.storage(run_id)
    renew_claim(t)
    for n, url in enumerate(t.job.service_outputs):
        if n < len(outputs):
            continue
        try:
            data = client.download(url).content
            info = inspect(data)
        except (NotAnImage, BadOutput, BadRequest) as exc:
            return _output_lost(t, f"output {n}: {exc}", "bad_output", price, outputs)
        except ServiceError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "fetch_attempts")
            t.ctx.runs.bump(run_id, "retries")
            if k >= t.ctx.settings.max_fetch_attempts:
                return _output_lost(t, f"output {n}: {exc}", "fetch", price, outputs)
            events.retry(t.job, "fetch", k, str(exc))
            return Wait(backoff(k, 1.0, 60.0))
        key = f"outputs/{t.job.id}/{n}.{info.extension}"
        try:
            uri = storage.put_bytes(
                key,
                data,
                info.content_type,
                metadata={
                    "job-id": t.job.id,
                    "model": t.job.spec.model,
                    "prediction-id": t.job.prediction_id,
                    "run-id": run_id,
                },
            )
        except StorageError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_output", k, str(exc))
            return Wait(backoff(k, 1.0, 30.0))
        store_output_thumbnail(storage, t.job.id, n, data)
        outputs.append(uri)
        if len(outputs) < len(t.job.service_outputs):  # the last one is written with the final state
            t.ctx.runs.update(run_id, t.job.id, outputs=outputs)
    if t.job.spec.fingerprint and t.run.reuse_roots:  # every output is stored: later rows may reuse them
        entry = new_entry(
            t.job.spec.fingerprint, run_id, t.job.id, t.job.prediction_id, t.job.spec.model, outputs, price
        )
        try:
            t.ctx.indexes(run_id)[0].put(entry)
        except StorageError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_index", k, str(exc))
            if k < t.ctx.settings.max_store_attempts:
                return Wait(backoff(k, 1.0, 30.0))
    return end(t, FETCHING, SUCCEEDED, cost=price, outputs=outputs)
