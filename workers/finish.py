"""The end of a run: whoever finishes the last job has the report written, once."""

from __future__ import annotations

import logging

from workers.context import Context

log = logging.getLogger("seedream.runs")


def maybe_finalize(ctx: Context, run_id: str) -> None:
    meta = ctx.meta(run_id)
    counts = ctx.runs.counts(run_id)
    if counts.get("finished", 0) < int(meta.get("total", 0)):
        return
    if ctx.redis.set(f"{ctx.settings.prefix}:run:{run_id}:finalized", "1", nx=True):
        from workers.tasks import finalize_run

        finalize_run.apply_async((run_id,), queue=meta.get("queue") or None)
