"""What a manifest will cost and how long it must take, before anything is spent.

Sums are integer micro-dollars, so totals are exact. "Fits in the budget" follows
what the runner does: rows in manifest order, each reserved if it still fits,
a more expensive row refused while a cheaper later one may still fit.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from jobs.budget import worst_case
from jobs.results import Plan
from manifests.models import ModelTable, micros_to_usd
from manifests.spec import JobSpec
from manifests.validate import Result, Validator


@dataclass
class Estimate:
    jobs: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> {jobs, price, cost}
    total_micros: int = 0
    budget_micros: int | None = None
    fit_jobs: int | None = None
    fit_micros: int | None = None
    rate: float | None = None
    # each job's price in manifest order (8 bytes a job), so the fit under another budget
    # is derived without reading the manifest again
    prices: array[int] = field(default_factory=lambda: array("q"), repr=False, compare=False)
    # model -> {price_usd, source, read_at?, why_not_live?}: where each price came from
    price_sources: dict[str, Any] = field(default_factory=dict)
    reused_jobs: int = 0  # rows whose edit is already stored (jobs/results.py): copied, not paid
    reused_micros: int = 0  # what those rows would have reserved

    @property
    def paid_jobs(self) -> int:
        return self.jobs - self.reused_jobs

    def with_budget(self, budget_micros: int | None) -> Estimate:
        """The same estimate, with the jobs that fit `budget_micros` in manifest order."""
        if budget_micros is None:
            return replace(self, budget_micros=None, fit_jobs=None, fit_micros=None)
        spent = fit = 0
        for price in self.prices:
            if spent + price <= budget_micros:
                spent += price
                fit += 1
        return replace(self, budget_micros=budget_micros, fit_jobs=fit, fit_micros=spent)

    @property
    def min_seconds(self) -> float | None:
        """The least wall time the submit rate allows (every job waits for a submit token)."""
        return self.paid_jobs / self.rate if self.rate else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "by_model": {
                m: {
                    **v,
                    "price_usd": micros_to_usd(v["price_micros"]),
                    "cost_usd": micros_to_usd(v["cost_micros"]),
                }
                for m, v in self.by_model.items()
            },
            "total_micros": self.total_micros,
            "total_usd": micros_to_usd(self.total_micros),
            "reused_jobs": self.reused_jobs,
            "reused_saved_usd": micros_to_usd(self.reused_micros),
            "budget_usd": None if self.budget_micros is None else micros_to_usd(self.budget_micros),
            "jobs_within_budget": self.fit_jobs,
            "cost_within_budget_usd": None if self.fit_micros is None else micros_to_usd(self.fit_micros),
            "submit_rate_per_s": self.rate,
            "min_seconds": self.min_seconds,
            "prices": self.price_sources,
        }


def estimate(
    jobs: Iterable[JobSpec],
    table: ModelTable,
    *,
    budget_micros: int | None = None,
    rate: float | None = None,
    reuse: Plan | None = None,
) -> Estimate:
    """With `reuse`, the rows it reuses cost nothing here and are counted apart."""
    est = Estimate(rate=rate)
    for job in jobs:
        spec = table.models[job.model]
        most = worst_case(spec.price_micros, job.params)  # what the job reserves: every image it may yield
        row = est.by_model.setdefault(job.model, {"jobs": 0, "price_micros": spec.price_micros, "cost_micros": 0})
        row["jobs"] += 1
        est.jobs += 1
        if reuse is not None and reuse.reused(job.fingerprint):
            row["reused"] = row.get("reused", 0) + 1
            est.reused_jobs += 1
            est.reused_micros += most
            est.prices.append(0)
            continue
        row["cost_micros"] += most
        est.total_micros += most
        est.prices.append(most)
    return est.with_budget(budget_micros)


def scan(
    validator: Validator,
    *,
    budget_micros: int | None = None,
    rate: float | None = None,
    known: set[str] | None = None,
) -> tuple[Result, Estimate, list[str]]:
    """One streaming pass over a manifest: its problems, the estimate of its valid rows, and the
    metadata columns in first-seen order. With `known` (the fingerprints already in the results
    indexes; None: reuse is off) rows that will be reused are counted apart."""
    result = Result()
    columns: dict[str, None] = {}

    def valid_jobs() -> Iterator[JobSpec]:
        for item in validator.results():
            if isinstance(item, JobSpec):
                result.jobs += 1
                result.by_model[item.model] += 1
                if len(columns) < 200:
                    columns.update(dict.fromkeys(str(k) for k in item.metadata))
                yield item
            else:
                result.invalid_rows += 1 if item and item[0].line else 0
                result.add(item)

    plan = Plan(known) if known is not None else None
    est = estimate(valid_jobs(), validator.table, budget_micros=budget_micros, rate=rate, reuse=plan)
    return result, est, list(columns)


def format_duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{seconds:.1f}s")


def render_text(est: Estimate) -> str:
    lines = [f"{'model':34} {'jobs':>8} {'price':>8} {'cost':>12}"]
    for model, row in sorted(est.by_model.items()):
        lines.append(
            f"{model:34} {row['jobs']:>8,} {'$' + micros_to_usd(row['price_micros']):>8} "
            f"{'$' + micros_to_usd(row['cost_micros']):>12}"
        )
    lines.append(f"{'total':34} {est.jobs:>8,} {'':>8} {'$' + micros_to_usd(est.total_micros):>12}")
    if est.reused_jobs:
        lines.append(
            f"{est.reused_jobs:,} of {est.jobs:,} rows reuse an edit stored already or made by an earlier row "
            f"(not paid again: up to ${micros_to_usd(est.reused_micros)}); the total is for the other {est.paid_jobs:,}"
        )
    if est.budget_micros is not None:
        verdict = (
            "the whole batch fits"
            if est.fit_jobs == est.jobs
            else (
                f"{est.fit_jobs:,} of {est.jobs:,} jobs fit (${micros_to_usd(est.fit_micros or 0)}); "
                f"the rest would be skipped"
            )
        )
        lines.append(f"budget ${micros_to_usd(est.budget_micros)}: {verdict}")
    if est.min_seconds is not None:
        lines.append(f"at {est.rate:g} submits/s the batch needs at least {format_duration(est.min_seconds)}")
    return "\n".join(lines)
