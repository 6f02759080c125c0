"""The invariants every chaos scenario must leave true, checked against the sandbox's own
accounting and the stored records, and the figures each scenario reports."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.records import FINAL
from jobs.storage import open_storage
from manifests.images import inspect
from sandbox.server import SandboxProcess
from tests.pipeline import Pipeline, read_report

# `make chaos` collects each scenario's figures here (the table in docs/RELIABILITY.md); a plain
# `make test` leaves the committed figures alone.
RESULTS = Path(os.environ["SEEDREAM_CHAOS_RESULTS"]) if os.environ.get("SEEDREAM_CHAOS_RESULTS") else None


@dataclass
class Figures:
    scenario: str
    jobs: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    faults_injected: int = 0
    kills: int = 0
    duplicates: int = 0
    lost: int = 0
    cost_drift_micros: int = 0  # report total minus what the sandbox billed (uncertain jobs count at list price)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        if RESULTS is None:
            return
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.write(json.dumps(self.__dict__) + "\n")


def check(
    pipe: Pipeline,
    run_id: str,
    output: Path | str,
    ids: list[str],
    figures: Figures,
    *,
    budget_micros: int | None = None,
) -> list[dict[str, str]]:
    """Assert every invariant; fill in the figures; return the report rows."""
    sb: SandboxProcess = pipe.sandbox
    acc = sb.accounting()
    storage = open_storage(str(output), run_id, endpoint_url=pipe.s3_endpoint)
    inside = storage.uri("outputs/x")[: -len("x")]

    def read(key: str) -> bytes:
        data = storage.get_bytes(key)
        assert data is not None, f"{key} is missing from storage"
        return data

    report = read_report(read("report.csv"))
    # every manifest row ends in exactly one final status, in manifest order
    assert [r["id"] for r in report] == ids
    assert all(r["status"] in FINAL for r in report), [r for r in report if r["status"] not in FINAL][:3]
    # zero duplicate submissions
    assert acc["duplicate_fingerprints"] == []
    # every succeeded job has all its outputs in storage, as valid images, inside the run's folder
    for r in report:
        if r["status"] == "succeeded":
            uris = r["outputs"].split("|")
            assert uris and all(u.startswith(inside) for u in uris)
            for u in uris:
                inspect(read("outputs/" + u[len(inside) :]))
    # cost: every prediction the service billed is costed, and nothing it did not bill
    billed_ids = {
        r["prediction_id"]
        for r in report
        if r["prediction_id"] and sb.admin("GET", f"predictions/{r['prediction_id']}")["billable"]
    }
    costed = {
        r["prediction_id"]
        for r in report
        if r["prediction_id"] and r["status"] != "uncertain" and r["cost_usd"] not in ("0", "0.00")
    }
    assert costed == billed_ids - {r["prediction_id"] for r in report if r["status"] == "uncertain"}
    total = sum(round(float(r["cost_usd"]) * 1_000_000) for r in report)
    if budget_micros is not None:
        assert total <= budget_micros
    # no job left in flight, at our side or the service's
    assert acc["in_flight"] == 0
    progress = pipe.runs().progress(run_id)
    assert progress.done and progress.finished == len(ids)
    # the report and the durable records agree
    recorded: set[str] = set()
    for r in report:
        rec = json.loads(read(f"records/{r['id']}.json"))
        assert (rec["state"], rec["prediction_id"] or "") == (r["status"], r["prediction_id"]), r["id"]
        recorded |= {rec["prediction_id"]} | {h.get("prediction_id") for h in rec.get("history") or []}
    # "uncertain" only when a POST really left: the service saw a submit of every uncertain row
    # (each row's prompt is its own). The one exception cannot be known from the client's side:
    # a worker SIGKILLed in the instant between the check that marks its POST as leaving and the
    # request reaching the service. Such a job is allowed only as a killed worker's, at most one
    # a kill, and never in a scenario that killed nothing.
    posted = acc["prompts_posted"]
    never_sent = [r for r in report if r["status"] == "uncertain" and not posted.get(r["prompt"])]
    killed_sending = [r for r in never_sent if r["error"].startswith("worker_lost_during_submit")]
    assert killed_sending == never_sent, f"uncertain but never submitted: {[r['id'] for r in never_sent]}"
    assert len(killed_sending) <= figures.kills, f"uncertain but never submitted: {[r['id'] for r in never_sent]}"
    # no paid result lost: every prediction whose id the service answered is in the records (one
    # whose answer was dropped on the way is an uncertain job: its id never reached us)
    unrecorded = sorted(set(acc["answered_prediction_ids"]) - recorded)
    assert unrecorded == [], f"predictions missing from the records: {unrecorded}"
    statuses: dict[str, int] = {}
    for r in report:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    figures.jobs = len(ids)
    figures.statuses = statuses
    figures.duplicates = len(acc["duplicate_fingerprints"])
    figures.lost = len(ids) - sum(statuses.values())
    figures.cost_drift_micros = total - int(acc["billed_micros"])
    figures.extra.update(uncertain_never_sent=len(never_sent), predictions_unrecorded=len(unrecorded))
    figures.faults_injected += sum(v for k, v in acc["counts"].items() if k.startswith("injected_")) + acc[
        "counts"
    ].get("dropped_submit_answers", 0)
    figures.save()
    return report
