"""Adversarial scenarios for results reuse (jobs/results.py, jobs/claims.py, workers/reuse.py
`reuse`): real Celery workers and the CLI as processes, real Redis, the sandbox over HTTP.

Each test states the money invariant it holds to, under an interleaving that once broke it or
that was tried to break it.
Waits are on conditions with deadlines; the sandbox's fixed delays make the timings repeatable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.claims import root_id
from jobs.results import FOLDER, entry_key
from manifests.images import inspect
from sandbox.server import SandboxProcess
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, read_report, run_id_of

PRICE = 27_000  # seedream-v4 edit, micro-dollars


# -- helpers ------------------------------------------------------------------------------------


def _manifest(tmp: Path, rows: list[tuple[str, int, str]], name: str = "manifest.jsonl") -> Path:
    """rows: (id, photo number, prompt). Same photo and prompt: the same edit (one fingerprint)."""
    for _, n, _ in rows:
        photo = tmp / f"p{n}.png"
        if not photo.exists():
            photo.write_bytes(image_bytes(color=(10 * n % 255, 80, 160)))
    path = tmp / name
    path.write_text("".join(json.dumps({"id": i, "prompt": p, "images": [f"p{n}.png"]}) + "\n" for i, n, p in rows))
    return path


def _r(pipe: Pipeline) -> redis.Redis:
    return redis.Redis.from_url(pipe.redis_url, decode_responses=True)


def _job(pipe: Pipeline, run_id: str, job_id: str) -> dict[str, str]:
    return dict(_r(pipe).hgetall(f"{pipe.prefix}:job:{run_id}:{job_id}"))


def _start(pipe: Pipeline, manifest: Path, out: Path | str, *args: str) -> str:
    done = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_id_of(done.stdout)


def _run(pipe: Pipeline, manifest: Path, out: Path | str, *args: str) -> str:
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait", *args, timeout=180)
    assert done.returncode in (0, 3), done.stdout + done.stderr
    return run_id_of(done.stdout)


def _report(out: Path, run_id: str) -> list[dict[str, str]]:
    return read_report((out / run_id / "report.csv").read_bytes())


def _record(out: Path, run_id: str, job_id: str) -> dict[str, Any]:
    path = out / run_id / "records" / f"{job_id}.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _wait_done(pipe: Pipeline, run_id: str, timeout: float, watch: list[str] | None = None) -> None:
    """wait_done, but on a time-out say what each unfinished job is doing (state, reuse, claim)."""
    runs = pipe.runs()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runs.progress(run_id).done:  # then its report, written by a worker after the last job
            wait_for(lambda: runs.meta(run_id).report_written, timeout=30, what=f"run {run_id}'s report")
            return
        time.sleep(0.2)
    r = _r(pipe)
    jobs = watch or [k.rsplit(":", 1)[-1] for k in r.scan_iter(f"{pipe.prefix}:job:{run_id}:*")]
    dump = {}
    for jid in jobs:
        f = _job(pipe, run_id, jid)
        dump[jid] = {k: f.get(k) for k in ("state", "reuse_look", "store_attempts", "reason", "error")}
    claims = {k: (r.get(k), r.pttl(k)) for k in r.scan_iter(f"{pipe.prefix}:edit:*")}
    raise AssertionError(f"run {run_id} not done after {timeout}s: jobs {dump}; claims (holder, pttl ms) {claims}")


def _delete_run_keys(pipe: Pipeline, run_id: str) -> int:
    """What an operator's cleanup (or a partial loss) does to one run: its run, job and budget keys
    go; everything else (other runs, the claims on edits) stays."""
    r = _r(pipe)
    keys = [
        *r.scan_iter(f"{pipe.prefix}:run:{run_id}*"),
        *r.scan_iter(f"{pipe.prefix}:job:{run_id}:*"),
        *r.scan_iter(f"{pipe.prefix}:budget:{run_id}*"),
    ]
    return int(r.delete(*keys)) if keys else 0


def _claim_key(pipe: Pipeline, out: Path, fp: str) -> str:
    return f"{pipe.prefix}:edit:{root_id(str(out.resolve()))}:{fp}"


def _no_duplicates_beyond(acc: dict[str, Any], allowed: int = 0) -> None:
    assert len(acc["duplicate_fingerprints"]) <= allowed, acc["submissions_by_fingerprint"]


# -- 1. a tampered index entry ------------------------------------------------------------------


def test_tampered_entry_naming_a_non_image_is_not_copied_as_an_output(pipe: Pipeline) -> None:
    """A reused job's outputs are images a job stored: an entry naming any other object under the
    output (here the earlier run's run.json) is no entry, and the row pays for its own edit."""
    pipe.sandbox.configure(delay="fixed:0.2")
    pipe.start_workers(1, concurrency=2)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("sku00", 0, "on white marble")])
    first = _run(pipe, manifest, out)
    fp = _record(out, first, "sku00")["fingerprint"]
    entry_path = out / entry_key(fp)
    entry = json.loads(entry_path.read_text())
    entry["outputs"] = [f"{first}/run.json"]  # under the output, so safe_key alone lets it through
    entry_path.write_text(json.dumps(entry))

    second = _run(pipe, manifest, out)
    assert pipe.sandbox.accounting()["created"] == 2
    row = _report(out, second)[0]
    assert row["status"] == "succeeded" and not row["reused_from"]
    for uri in row["outputs"].split("|"):
        inspect(Path(uri).read_bytes())


def test_a_stored_output_that_is_no_longer_a_file_does_not_stall_the_row(pipe: Pipeline) -> None:
    """No job stuck: an indexed output replaced by a folder cannot be copied; the row pays for its
    own edit at once instead of retrying the copy for hours."""
    pipe.sandbox.configure(delay="fixed:0.2")
    pipe.start_workers(1, concurrency=2)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("sku00", 0, "on white marble")])
    first = _run(pipe, manifest, out)
    [stored] = (out / first / "outputs" / "sku00").iterdir()
    stored.unlink()
    stored.mkdir()  # the same name, now a folder

    second = _start(pipe, manifest, out)
    _wait_done(pipe, second, timeout=40, watch=["sku00"])
    row = _report(out, second)[0]
    assert row["status"] == "succeeded" and not row["reused_from"]
    assert pipe.sandbox.accounting()["created"] == 2


# -- 2. resume from storage after the run's Redis keys are gone ---------------------------------


def test_resume_from_storage_keeps_identical_rows_on_one_prediction(pipe: Pipeline) -> None:
    """Two rows with one fingerprint make one prediction, across a resume from storage. Row `a` is
    submitted (its record holds its fingerprint), its twin `b` waits on the claim. The run's Redis
    keys are deleted (the claims stay) and the run is resumed from storage: `b` never wrote a
    record, so its fingerprint comes from its file, hashed again, and it waits and copies."""
    pipe.sandbox.configure(delay="fixed:4")
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("a", 0, "on white marble"), ("b", 0, "on white marble"), ("c", 1, "on slate")])
    run = _start(pipe, manifest, out)

    def holder_submitted_twin_waiting() -> tuple[str, str] | None:
        for holder, twin in (("a", "b"), ("b", "a")):
            rec = _record(out, run, holder)
            if (
                rec.get("state") == "submitted"
                and rec.get("prediction_id")
                and _job(pipe, run, twin).get("reuse_look") == "1"
            ):
                return holder, twin
        return None

    holder, twin = wait_for(holder_submitted_twin_waiting, timeout=30, what="one twin submitted, the other waiting")
    assert pipe.sandbox.accounting()["prompts_posted"].get("on white marble") == 1
    assert _delete_run_keys(pipe, run) > 0
    resumed = pipe.cli("resume", run, "--output", str(out), "--no-wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _wait_done(pipe, run, timeout=60)
    wait_for(lambda: pipe.sandbox.accounting()["in_flight"] == 0, timeout=30, what="the service idle")
    acc = pipe.sandbox.accounting()
    posted = acc["prompts_posted"].get("on white marble")
    assert (acc["created"], posted) == (2, 1), (
        f"created {acc['created']} predictions for 2 distinct edits; the edit of {holder}/{twin} was POSTed "
        f"{posted} times; duplicates {acc['duplicate_fingerprints']}; twin {twin} now "
        f"{ {k: _job(pipe, run, twin).get(k) for k in ('state', 'prediction_id', 'reused_from', 'cost_micros')} }; "
        f"fingerprint in its record {_record(out, run, twin).get('fingerprint')!r}, in {holder}'s "
        f"{_record(out, run, holder).get('fingerprint')!r}"
    )


def test_a_resumed_holder_without_a_record_does_not_block_another_run(pipe: Pipeline) -> None:
    """No job stuck, one prediction: run A's row x holds the claim while it waits its turn to submit
    (no record yet); run B's identical row waits on it. A's Redis keys are deleted and A is resumed
    from storage: x comes back with its fingerprint, takes its claim again (or finds it taken over
    by B, whose holder Redis no longer knew) and the edit is made once."""
    pipe.extra_env.update(SEEDREAM_SUBMIT_RATE="0.1", SEEDREAM_SUBMIT_BURST="1")
    pipe.sandbox.configure(delay="fixed:1")
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    f_manifest = _manifest(pipe.tmp, [("f", 1, "filler")], "f.jsonl")
    a_manifest = _manifest(pipe.tmp, [("x", 0, "on white marble")], "a.jsonl")
    b_manifest = _manifest(pipe.tmp, [("x", 0, "on white marble")], "b.jsonl")
    _start(pipe, f_manifest, pipe.tmp / "elsewhere")  # takes the one send of the next 10 s
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 1, timeout=20, what="the filler's submit")
    a = _start(pipe, a_manifest, out)
    r = _r(pipe)

    def x_holds() -> bool:
        keys = list(r.scan_iter(f"{pipe.prefix}:edit:*"))
        return any(r.get(k) == f"{a}:x" for k in keys) and _job(pipe, a, "x").get("state") == "pending"

    wait_for(x_holds, timeout=10, what="A's x to hold its claim while it waits to submit")
    b = _start(pipe, b_manifest, out)
    wait_for(lambda: _job(pipe, b, "x").get("reuse_look") == "1", timeout=15, what="B's x to wait on A's claim")
    assert _job(pipe, a, "x").get("state") == "pending" and not _record(out, a, "x")
    _delete_run_keys(pipe, a)
    resumed = pipe.cli("resume", a, "--output", str(out), "--no-wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _wait_done(pipe, a, timeout=40)
    assert _report(out, a)[0]["status"] == "succeeded"
    a_fp = _record(out, a, "x").get("fingerprint")
    entries = sorted(p.name for p in (out / FOLDER).glob("*/*.json"))
    try:
        _wait_done(pipe, b, timeout=20, watch=["x"])
    except AssertionError as exc:
        raise AssertionError(f"{exc}; A's x ended with fingerprint {a_fp!r}; index entries {entries}") from None
    assert pipe.sandbox.accounting()["prompts_posted"].get("on white marble") == 1


# -- 3. a holder that ends overdue --------------------------------------------------------------


def test_an_overdue_holder_lets_its_twin_pay_for_its_own_edit(pipe: Pipeline) -> None:
    """A decision, not a guarantee of one prediction: a holder that ends `overdue` (no verdict by the
    poll deadline) drops its claim like a failure, and its twin submits, so the run ends with an
    edit rather than waiting on a prediction that may never answer. Both rows end; nothing hangs."""
    pipe.extra_env["SEEDREAM_POLL_DEADLINE"] = "2"
    pipe.sandbox.configure(delay="fixed:5")
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("a", 0, "on white marble"), ("b", 0, "on white marble")])
    run = _start(pipe, manifest, out)
    _wait_done(pipe, run, timeout=40)
    wait_for(lambda: pipe.sandbox.accounting()["in_flight"] == 0, timeout=30, what="the service idle")
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 2  # the same edit twice: by decision, see the docstring
    assert {r["status"] for r in _report(out, run)} == {"overdue"}


# -- 4. interleavings that should hold ----------------------------------------------------------


def test_two_runs_sharing_a_campaign_cap_pay_each_edit_once_and_stay_under_it(pipe: Pipeline) -> None:
    """Invariants 2 and 4 with --campaign: two runs of one manifest into one output, a cap that
    pays for 3 of 6 edits: at most 3 predictions, none twice, spent <= cap."""
    pipe.sandbox.configure(delay="fixed:1")
    out = pipe.tmp / "out"
    rows = [(f"sku{i}", i, f"edit #{i}") for i in range(6)]
    manifest = _manifest(pipe.tmp, rows)
    camp = f"camp-{pipe.prefix}"
    args = ("--campaign", camp, "--budget", "0.081", "--allow-partial")
    a = _start(pipe, manifest, out, *args)
    b = _start(pipe, manifest, out, *args)
    pipe.start_workers(2, concurrency=4)
    for run in (a, b):
        _wait_done(pipe, run, timeout=60)
    acc = pipe.sandbox.accounting()
    assert acc["created"] <= 3 and acc["duplicate_fingerprints"] == [], acc["submissions_by_fingerprint"]
    assert acc["billed_micros"] <= 81_000
    reports = [_report(out, run) for run in (a, b)]
    total = sum(round(float(r["cost_usd"]) * 1e6) for rep in reports for r in rep)
    assert total == acc["billed_micros"]
    succeeded = [r for rep in reports for r in rep if r["status"] == "succeeded"]
    assert len(succeeded) == 2 * acc["created"]  # each paid edit is had by both runs


def test_cancelling_the_holding_run_lets_the_other_run_finish_paying_each_edit_once(pipe: Pipeline) -> None:
    """Invariants 2 and 7: runs A and B of one manifest into one output, submits paced so A still
    holds claims on edits it has not sent; A is cancelled. A's unsent holders end skipped (the
    claim dropped), B pays for those; A's sent ones finish and B copies them: six predictions."""
    pipe.extra_env.update(SEEDREAM_SUBMIT_RATE="2", SEEDREAM_SUBMIT_BURST="1")
    pipe.sandbox.configure(delay="fixed:2")
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [(f"sku{i}", i, f"edit #{i}") for i in range(6)])
    a = _start(pipe, manifest, out)
    b = _start(pipe, manifest, out)
    pipe.start_workers(1, concurrency=6)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 2, timeout=30, what="two submits")
    assert pipe.cli("cancel", a).returncode == 0
    for run in (a, b):
        _wait_done(pipe, run, timeout=60)
    acc = pipe.sandbox.accounting()
    assert acc["duplicate_fingerprints"] == [] and acc["created"] <= 6, acc["submissions_by_fingerprint"]
    rb = _report(out, b)
    ra = _report(out, a)
    assert {r["status"] for r in rb} == {"succeeded"}, rb
    assert {r["status"] for r in ra} <= {"succeeded", "skipped"}
    for r in rb:
        for uri in r["outputs"].split("|"):
            inspect(Path(uri).read_bytes())


def test_retry_failed_twins_make_one_new_prediction(pipe: Pipeline) -> None:
    """retry-failed with reuse: two identical rows failed at the service (two predictions, allowed);
    retried once the service is healthy, they make ONE more prediction, the other row copies it."""
    pipe.sandbox.configure(delay="fixed:0.5", faults={"failed": 1.0})
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("a", 0, "on white marble"), ("b", 0, "on white marble")])
    run = _run(pipe, manifest, out)
    assert pipe.sandbox.accounting()["created"] == 2
    pipe.sandbox.configure(faults={"failed": 0.0})
    again = pipe.cli("retry-failed", run)
    assert again.returncode == 0, again.stdout + again.stderr
    wait_for(lambda: pipe.runs().progress(run).counts.get("succeeded", 0) == 2, timeout=60, what="both retried")
    pipe.runs().report(run)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 3, acc["submissions_by_fingerprint"]
    report = _report(out, run)
    assert sorted(bool(r["reused_from"]) for r in report) == [False, True]
    assert sum(round(float(r["cost_usd"]) * 1e6) for r in report) == acc["billed_micros"] == PRICE


def test_outputs_deleted_after_the_run_was_planned_are_paid_once_by_twins(pipe: Pipeline) -> None:
    """Invariants 2 and 3: run 2 is planned against an index that names run 1's outputs (reuse_look,
    claim `done`); the outputs are deleted before any worker copies them. The twins x, x2 pay once;
    y (outputs intact) is copied."""
    pipe.sandbox.configure(delay="fixed:0.5")
    out = pipe.tmp / "out"
    workers = pipe.start_workers(1, concurrency=4)
    first = _run(pipe, _manifest(pipe.tmp, [("x", 0, "on white marble"), ("y", 1, "on slate")], "one.jsonl"), out)
    assert pipe.sandbox.accounting()["created"] == 2
    workers.stop(timeout=20)
    manifest = _manifest(pipe.tmp, [("x", 0, "on white marble"), ("x2", 0, "on white marble"), ("y", 1, "on slate")])
    second = _start(pipe, manifest, out)
    for f in (out / first / "outputs" / "x").iterdir():
        f.unlink()
    pipe.start_workers(1, concurrency=4)
    _wait_done(pipe, second, timeout=60)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 3, acc["submissions_by_fingerprint"]
    report = {r["id"]: r for r in _report(out, second)}
    assert {r["status"] for r in report.values()} == {"succeeded"}
    assert report["y"]["reused_from"] == f"{first}/y"
    assert sorted(bool(report[k]["reused_from"]) for k in ("x", "x2")) == [False, True]
    for r in report.values():
        inspect(Path(r["outputs"]).read_bytes())


def test_a_429_storm_with_four_twins_makes_each_edit_once(pipe: Pipeline) -> None:
    """Invariants 1, 2, 6 under injected 429s on every call kind: four rows of one edit and two
    others: three predictions, costs equal to what was billed, records agree with the report."""
    pipe.sandbox.configure(delay="fixed:0.8", faults={"rate_limited": 0.35})
    pipe.start_workers(2, concurrency=3)
    out = pipe.tmp / "out"
    rows = [(f"t{i}", 0, "on white marble") for i in range(4)] + [("u", 1, "on slate"), ("v", 2, "on sand")]
    run = _start(pipe, _manifest(pipe.tmp, rows), out)
    _wait_done(pipe, run, timeout=90)
    pipe.runs().report(run)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 3 and acc["duplicate_fingerprints"] == [], acc["submissions_by_fingerprint"]
    report = _report(out, run)
    assert {r["status"] for r in report} == {"succeeded"}
    assert sum(round(float(r["cost_usd"]) * 1e6) for r in report) == acc["billed_micros"]
    for r in report:
        rec = _record(out, run, r["id"])
        assert (rec["state"], rec["prediction_id"] or "", rec.get("reused_from") or "") == (
            r["status"],
            r["prediction_id"],
            r["reused_from"],
        )


def test_reuse_from_a_folder_whose_outputs_are_gone_into_s3_pays_once_for_twins(
    pipe: Pipeline, s3_endpoint: str
) -> None:
    """--reuse-from a folder into S3: the folder's index names the edit but its outputs were deleted:
    the twins in the S3 run pay once between them (claims on the S3 root), both end with images."""
    import boto3

    pipe.s3_endpoint = s3_endpoint
    pipe.sandbox.configure(delay="fixed:0.5")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"brk-{pipe.prefix.lower()}"[:60]
    s3.create_bucket(Bucket=bucket)
    pipe.start_workers(1, concurrency=4)
    folder = pipe.tmp / "earlier"
    first = _run(pipe, _manifest(pipe.tmp, [("x", 0, "on white marble")], "one.jsonl"), folder)
    for f in (folder / first / "outputs" / "x").iterdir():
        f.unlink()
    manifest = _manifest(pipe.tmp, [("x", 0, "on white marble"), ("x2", 0, "on white marble")])
    run = _run(pipe, manifest, f"s3://{bucket}/shoots", "--reuse-from", str(folder))
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 2, acc["submissions_by_fingerprint"]
    report = read_report(s3.get_object(Bucket=bucket, Key=f"shoots/{run}/report.csv")["Body"].read())
    assert {r["status"] for r in report} == {"succeeded"}
    assert sorted(bool(r["reused_from"]) for r in report) == [False, True]
    for r in report:
        key = r["outputs"].split(f"s3://{bucket}/", 1)[1]
        inspect(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"shoots/{FOLDER}/")
    assert listed.get("KeyCount") == 1


def test_the_holders_worker_sigkilled_then_the_holders_run_cancelled(pipe: Pipeline) -> None:
    """Invariant 7: run A's holder is submitted, its only worker SIGKILLed, then A is cancelled;
    run B waits on A's claims. A fresh worker takes A's jobs over (cancel does not stop a paid
    prediction) and B copies: each edit once, both runs end."""
    import os
    import signal

    pipe.sandbox.configure(delay="fixed:3")
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [(f"sku{i}", i, f"edit #{i}") for i in range(3)])
    doomed = pipe.start_workers(1, concurrency=4)
    a = _start(pipe, manifest, out)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 3, timeout=30, what="A's submits")
    b = _start(pipe, manifest, out)
    wait_for(lambda: all(_job(pipe, b, f"sku{i}").get("reuse_look") == "1" for i in range(3)), timeout=20,
             what="B's rows waiting")  # fmt: skip
    os.kill(doomed.procs[0].pid, signal.SIGKILL)
    assert pipe.cli("cancel", a).returncode == 0
    pipe.start_workers(1, concurrency=4)
    for run in (a, b):
        _wait_done(pipe, run, timeout=90)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 3 and acc["duplicate_fingerprints"] == []
    assert {r["status"] for r in _report(out, b)} == {"succeeded"}


def test_redis_flushed_then_both_runs_resumed_from_storage_pay_each_edit_once(pipe: Pipeline) -> None:
    """Invariants 2 and 7 after a flush: runs A and B of one manifest into one output; A's rows are
    submitted (records hold their fingerprints), B's identical rows wait on A's claims. Every key of
    the deployment (claims, runs, queue) is flushed; both runs are resumed from storage. Both end
    (nothing waits on a claim), but B's rows come back without fingerprints and reuse_look (they
    never wrote a record): each pays the edit A is still making."""
    pipe.sandbox.configure(delay="fixed:4")
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [(f"sku{i}", i, f"edit #{i}") for i in range(3)])
    pipe.start_workers(1, concurrency=6)
    a = _start(pipe, manifest, out)
    wait_for(lambda: all(_record(out, a, f"sku{i}").get("prediction_id") for i in range(3)), timeout=30,
             what="A's three submits stored")  # fmt: skip
    b = _start(pipe, manifest, out)
    wait_for(lambda: all(_job(pipe, b, f"sku{i}").get("reuse_look") == "1" for i in range(3)), timeout=20,
             what="B's rows waiting")  # fmt: skip
    r = _r(pipe)
    keys = [*r.scan_iter(f"{pipe.prefix}:*"), pipe.prefix]
    r.delete(*keys)
    for run in (a, b):
        resumed = pipe.cli("resume", run, "--output", str(out), "--no-wait")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for run in (a, b):
        _wait_done(pipe, run, timeout=60)
    wait_for(lambda: pipe.sandbox.accounting()["in_flight"] == 0, timeout=30, what="the service idle")
    acc = pipe.sandbox.accounting()
    rb = _report(out, b)
    assert acc["created"] == 3 and acc["duplicate_fingerprints"] == [], (
        f"{acc['created']} predictions for 3 edits; B's rows: "
        f"{[(x['id'], x['status'], x['cost_usd'], x['reused_from']) for x in rb]}"
    )


def test_a_holder_whose_answer_was_dropped_lets_its_twin_go_on(pipe: Pipeline) -> None:
    """Invariants 5 and 7: every submit's answer is dropped (the prediction exists, the client does
    not know): the holder ends uncertain, its twin is not left waiting; it submits (allowed after an
    uncertain first attempt) and ends uncertain too; every uncertain row's POST left."""
    pipe.sandbox.configure(delay="fixed:0.5", faults={"drop_submit": 1.0})
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    manifest = _manifest(pipe.tmp, [("a", 0, "on white marble"), ("b", 0, "on white marble"), ("c", 1, "on slate")])
    run = _start(pipe, manifest, out)
    _wait_done(pipe, run, timeout=60)
    pipe.runs().report(run)
    acc = pipe.sandbox.accounting()
    report = _report(out, run)
    assert {r["status"] for r in report} == {"uncertain"}
    assert acc["prompts_posted"] == {"on white marble": 2, "on slate": 1}
    assert acc["created"] == 3


# -- 5. a holder whose worker died between its final move and letting the claim go ------------


def test_a_claim_left_by_an_ended_holder_is_taken_over_at_once(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Two identical rows, driven step by step in this process (two Contexts, real Redis, the
    sandbox over HTTP). Row a takes the claim and is then failed the way a worker dying right
    after the move leaves it: final, claim still held. Row b takes the claim over at once instead
    of waiting out the lease, submits, and the edit is made once more: one prediction in all."""
    from jobs.config import WorkerSettings
    from jobs.records import FAILED, PENDING, SUBMITTED
    from jobs.start import RunOptions, start_run
    from workers import steps
    from workers.context import Context

    (tmp_path / "a.png").write_bytes(image_bytes())
    rows = [{"id": j, "prompt": "white marble", "images": ["a.png"]} for j in ("a", "b")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = WorkerSettings.from_env(
        {"REDIS_URL": redis_url, "SEEDREAM_PREFIX": prefix, "ATLASCLOUD_API_KEY": "sk-test",
         "ATLASCLOUD_API_BASE": sandbox.api_base, "SEEDREAM_SUBMIT_RATE": "50"}
    )  # fmt: skip
    opts = RunOptions(manifest=tmp_path / "m.jsonl", output=str(tmp_path / "out"), api_base=sandbox.api_base,
                      check_balance=False)  # fmt: skip
    run = start_run(opts, settings, lambda run_id: 0).run_id
    one, two = Context(settings), Context(settings)
    meta = one.meta(run)
    a = one.runs.get(run, "a")
    assert a is not None and a.spec.fingerprint
    assert one.claims.take(meta.reuse_claims, a.spec.fingerprint, f"{run}:a") == "fresh"
    assert one.runs.transition(run, "a", PENDING, FAILED, reason="test") == "ok"  # died before letting go
    assert one.claims.holder(meta.reuse_claims, a.spec.fingerprint) == f"{run}:a"
    steps.advance(two, run, "b", "0", due_at=0.0)
    b = two.runs.get(run, "b")
    assert b is not None and b.state == SUBMITTED and b.prediction_id, b
    assert two.claims.holder(meta.reuse_claims, a.spec.fingerprint) == f"{run}:b"
    assert sandbox.accounting()["created"] == 1


# -- 6. a holder in flight whose run's keys are lost, then resumed ------------------------------


def _posted(pipe: Pipeline, prompt: str) -> int:
    return int(pipe.sandbox.accounting()["prompts_posted"].get(prompt) or 0)


@pytest.mark.parametrize("later", [False, True], ids=["at_once", "later"])
def test_holder_in_flight_whose_run_keys_are_lost_and_resumed_is_not_paid_twice(pipe: Pipeline, later: bool) -> None:
    """Invariant 2: run A's x is SUBMITTED (its prediction in flight, its record holds the id); run
    B's x waits on A's claim. A's run keys are lost (claims stay) and the operator resumes A from
    storage, at once or a second or two later. A's prediction is polled again and finishes: B's x
    should copy it: a holder Redis forgot is waited for, not taken over."""
    pipe.sandbox.configure(delay="fixed:6")
    pipe.start_workers(1, concurrency=4)
    out = pipe.tmp / "out"
    a_manifest = _manifest(pipe.tmp, [("x", 0, "on white marble")], "a.jsonl")
    b_manifest = _manifest(pipe.tmp, [("x", 0, "on white marble")], "b.jsonl")
    a = _start(pipe, a_manifest, out)
    wait_for(lambda: _record(out, a, "x").get("prediction_id"), timeout=20, what="A's x submitted")
    b = _start(pipe, b_manifest, out)
    wait_for(lambda: _job(pipe, b, "x").get("reuse_look") == "1", timeout=15, what="B's x waiting on A")
    assert _posted(pipe, "on white marble") == 1
    lost_at = time.monotonic()
    assert _delete_run_keys(pipe, a) > 0
    if later:  # the operator resumes A once B's x has moved on (or 5 s at most)
        wait_for(lambda: _job(pipe, b, "x").get("state") != "pending" or time.monotonic() - lost_at > 5,
                 timeout=10, what="B's x to move or 5 s")  # fmt: skip
    resumed = pipe.cli("resume", a, "--output", str(out), "--no-wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    resumed_after = time.monotonic() - lost_at
    for run in (a, b):
        _wait_done(pipe, run, timeout=60)
    wait_for(lambda: pipe.sandbox.accounting()["in_flight"] == 0, timeout=30, what="the service idle")
    acc = pipe.sandbox.accounting()
    ra, rb = _report(out, a)[0], _report(out, b)[0]
    assert _posted(pipe, "on white marble") == 1, (
        f"one edit POSTed {_posted(pipe, 'on white marble')} times (created {acc['created']}, billed "
        f"{acc['billed_micros']}); A resumed {resumed_after:.1f}s after its keys were lost; "
        f"A's x {ra['status']} cost {ra['cost_usd']} reused_from {ra['reused_from']!r}; "
        f"B's x {rb['status']} cost {rb['cost_usd']} reused_from {rb['reused_from']!r}"
    )
