"""Prometheus metrics of a worker process, served on SEEDREAM_METRICS_PORT (off by default).

Counters and histograms count what this process did (Prometheus sums them over workers).
Jobs by state, in-flight slots and budget left belong to no process: they are read from
Redis at each scrape, for every active run, so any one worker's endpoint shows the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from jobs.records import RunRecord

log = logging.getLogger("seedream.metrics")

SUBMITS = Counter(
    "seedream_submits", "Submits sent, by model and outcome (accepted, unknown, refused).", ["model", "outcome"]
)
POLLS = Counter("seedream_polls", "Polls of predictions sent.")
RATE_LIMITED = Counter("seedream_http_429", "429 answers from the service, by kind of call.", ["kind"])
RETRIES = Counter("seedream_retries", "Calls and steps tried again after a transient failure, by stage.", ["stage"])
UPLOADS = Counter("seedream_uploads", "Input images uploaded (once per content).")
FINISHED = Counter("seedream_jobs_finished", "Jobs that reached a final state, by state and model.", ["state", "model"])
COST = Counter("seedream_cost_usd", "Cost of finished jobs in USD (the prediction's price, else the list price).",
               ["model"])  # fmt: skip
STEP_SECONDS = Histogram(
    "seedream_step_seconds",
    "Time one step of a job took, by the state it started in (pending: upload and submit; submitted: a poll;"
    " fetching: download and store).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOB_SECONDS = Histogram(
    "seedream_job_seconds",
    "From a job's submit to its end (the service's time plus polling lag and the fetch).",
    buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)


class RedisState(Collector):
    """Gauges read from Redis when scraped: jobs by state per active run, in-flight slots,
    budget left. `context` is the worker's Context (a Redis failure yields no gauges, not an
    error page)."""

    def __init__(self, context: Any) -> None:
        self.ctx = context

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("seedream_run_jobs", "Jobs of an active run, by state.", labels=["run_id", "state"])
        budget = GaugeMetricFamily("seedream_budget_left_usd", "Budget left (no gauge: no cap).", labels=["scope"])
        slots = GaugeMetricFamily("seedream_in_flight_slots", "Predictions in flight for this API key.")
        try:
            for run_id in self.ctx.runs.active_runs():
                run = self.ctx.runs.run_meta(run_id) or RunRecord()
                counts = self.ctx.runs.counts(run_id)
                total = run.total or 0
                for state in ("succeeded", "failed", "skipped", "uncertain"):
                    jobs.add_metric([run_id, state], counts.get(state, 0))
                jobs.add_metric([run_id, "in_progress"], max(0, total - counts.get("finished", 0)))
                scope = run.budget_scope or run_id
                state = self.ctx.budget(scope).state()
                if state.cap_micros is not None:
                    budget.add_metric([scope], state.remaining_micros / 1e6)
            slots.add_metric([], self.ctx.slots.in_use())
        except Exception as exc:  # a scrape must never take the worker down
            log.warning("metrics: Redis state not read: %s", exc)
            return
        yield jobs
        yield budget
        yield slots


def serve(context: Any, port: int, host: str = "127.0.0.1") -> None:
    """Start the endpoint (a daemon thread) with the Redis gauges added."""
    REGISTRY.register(RedisState(context))
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
