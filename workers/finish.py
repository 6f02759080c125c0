"""The end of a run: whoever finishes the last job has the report written, once."""

from __future__ import annotations

import logging

from workers.context import Context

log = logging.getLogger("seedream.runs")


def maybe_finalize(ctx: Context, run_id: str, finished: int) -> None:
    """`finished`: the run's count of finished jobs, read when this job's record was stored."""
    meta = ctx.meta(run_id)
    if finished < int(meta.get("total", 0)):
        return
    if ctx.redis.set(ctx.runs.finalized_key(run_id), "1", nx=True):
        from workers.tasks import finalize_run

        finalize_run.apply_async((run_id,), queue=meta.get("queue") or None)
