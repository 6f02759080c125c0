"""End to end: real Redis, real Celery worker processes, the sandbox over HTTP, a real S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import boto3
import httpx
import redis

from jobs.report import cell
from manifests.images import inspect
from tests.conftest import API_KEY
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, catalog, read_report, run_id_of, write_manifest

V4, V45 = "bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"
PRICES = {V4: 27_000, V45: 36_000}


def test_mixed_manifest_ends_in_s3_consistent_with_the_service(pipe: Pipeline, s3_endpoint: str) -> None:
    pipe.s3_endpoint = s3_endpoint
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"b-{pipe.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    manifest, distinct_local = catalog(pipe.tmp, pipe.sandbox, 12)
    pipe.sandbox.configure(delay="uniform:0.2:0.8")
    pipe.start_workers(2)
    done = pipe.cli("run", str(manifest), "--output", f"s3://{bucket}/catalog", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 12 and acc["duplicate_fingerprints"] == []
    assert acc["uploads"] == 1  # the test's own URL input: local photos are staged in the bucket instead
    staged = s3.list_objects_v2(Bucket=bucket, Prefix="catalog/inputs/")["Contents"]
    assert len(staged) == distinct_local  # the shared photo was staged once

    def obj(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"catalog/{run_id}/{key}")["Body"].read()

    report = read_report(obj("report.csv"))
    assert [r["id"] for r in report] == [f"sku-{i:03d}" for i in range(12)]  # manifest order
    assert {r["status"] for r in report} == {"succeeded"}
    cost = sum(round(float(r["cost_usd"]) * 1_000_000) for r in report)
    assert cost == acc["billed_micros"] == sum(PRICES[V45 if i % 4 == 0 else V4] for i in range(12))
    assert report[2]["note"].startswith("'=")  # a formula in metadata is defused
    for row in report:
        [uri] = row["outputs"].split("|")
        key = uri.split(f"s3://{bucket}/", 1)[1]
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["Metadata"]["job-id"] == row["id"] and head["Metadata"]["prediction-id"] == row["prediction_id"]
        assert inspect(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).format == "JPEG"
        record = json.loads(obj(f"records/{row['id']}.json"))
        assert record["state"] == "succeeded" and record["prediction_id"] == row["prediction_id"]
    summary = json.loads(obj("summary.json"))
    assert summary["counts"] == {"succeeded": 12} and summary["total_cost_micros"] == cost
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if "/inputs/" not in o["Key"]]
    index = [k for k in listed if k.startswith("catalog/_results/")]  # what later runs may reuse
    assert len(index) == 12 and not any(API_KEY.encode() in s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                                        for k in index)  # fmt: skip
    keys = [k for k in listed if k not in index]
    assert all(k.startswith(f"catalog/{run_id}/") for k in keys)
    for key in keys:  # the API key is nowhere in storage, data or metadata
        head = s3.head_object(Bucket=bucket, Key=key)
        assert API_KEY not in json.dumps(head["Metadata"]) and API_KEY.encode() not in obj(
            key.split(f"{run_id}/", 1)[1]
        )
    assert b"sku-011" in obj("report.html") and sum("/thumbs/out/" in k for k in keys) == 12
    presigned = pipe.cli("report", run_id, "--presign", "--expires", "1h")
    assert presigned.returncode == 0, presigned.stderr
    link = json.loads(presigned.stdout)["gallery_presigned_url"]
    page = httpx.get(link, timeout=10)  # opened straight from S3, no credentials
    assert page.status_code == 200 and b"sku-011" in page.content and "X-Amz-Expires=3600" in page.text
    refused = pipe.cli("report", run_id, "--presign", "--expires", "30d")
    assert refused.returncode == 2 and "7 days" in refused.stderr


def test_invalid_manifest_enqueues_and_spends_nothing(pipe: Pipeline, rconn: redis.Redis) -> None:
    corpus = Path(__file__).parent / "manifests_bad" / "many_problems.csv"
    out = pipe.cli("run", str(corpus), "--output", str(pipe.tmp / "out"), "--no-wait")
    assert out.returncode == 2 and "many_problems.csv:3: id:" in out.stderr
    assert pipe.sandbox.accounting()["submit_calls"] == 0
    assert rconn.llen(pipe.prefix) == 0 and not list(rconn.scan_iter(f"{pipe.prefix}:*"))
    assert not (pipe.tmp / "out").exists()


def test_every_fault_at_once_still_ends_with_the_right_statuses(pipe: Pipeline) -> None:
    pipe.sandbox.configure(
        seed=11,
        delay="uniform:0.1:0.4",
        fault_retry_after=0,
        slow_output_seconds=0.3,
        faults={
            "rate_limited": 0.05,
            "server_error": 0.05,
            "failed": 0.1,
            "failed_5xx": 0.05,
            "timeout_status": 0.05,
            "drop_submit": 0.05,
            "output_404": 0.05,
            "output_slow": 0.05,
            "output_truncated": 0.1,
            "output_corrupt": 0.05,
            "bare_shape": 0.2,
            "succeeded_spelling": 0.3,
            "send_price": 0.2,
            "numeric_code": 0.3,
            "message_errors": 0.3,
        },
    )
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 40)
    pipe.start_workers(2)
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--wait", timeout=180)
    assert done.returncode == 3, done.stdout + done.stderr  # some jobs did not succeed: a distinct exit code
    run_id = run_id_of(done.stdout)
    report = read_report((pipe.tmp / "out" / run_id / "report.csv").read_bytes())
    assert len(report) == 40 and {r["status"] for r in report} <= {"succeeded", "failed", "uncertain"}
    acc = pipe.sandbox.accounting()
    assert acc["duplicate_fingerprints"] == []
    for row in report:
        if not row["prediction_id"]:
            assert row["status"] in ("uncertain", "failed"), row
            continue
        truth = pipe.sandbox.admin("GET", f"predictions/{row['prediction_id']}")
        if truth["outcome"] in ("failed", "failed_5xx", "timeout"):
            assert row["status"] == "failed" and row["cost_usd"] == "0.00" and row["error"], row
        elif any(f in ("output_404", "output_corrupt") for f in truth["output_faults"]):
            assert row["status"] == "failed" and "bad_output" in row["error"] and row["cost_usd"] != "0.00"
        else:
            assert row["status"] == "succeeded", row
            assert inspect(Path(row["outputs"]).read_bytes())
    billed = {
        r["prediction_id"]
        for r in report
        if r["prediction_id"] and pipe.sandbox.admin("GET", f"predictions/{r['prediction_id']}")["billable"]
    }
    paid = {r["prediction_id"] for r in report if r["prediction_id"] and r["cost_usd"] != "0.00"}
    assert billed == paid  # every billed prediction is costed, and nothing unbilled is


def test_sigkilled_worker_is_taken_over_without_a_duplicate(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:1.0")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    doomed = pipe.start_workers(1)
    pipe.start_workers(1)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    assert started.returncode == 0, started.stderr
    run_id = run_id_of(started.stdout)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 8, timeout=60, what="some submits")
    os.kill(doomed.procs[0].pid, signal.SIGKILL)
    progress = pipe.wait_done(run_id, timeout=150)
    acc = pipe.sandbox.accounting()
    assert acc["duplicate_fingerprints"] == [] and acc["created"] <= 30
    counts = progress.counts
    # every job ends; one killed in the middle of its submit is uncertain, never resubmitted
    assert counts.get("succeeded", 0) + counts.get("uncertain", 0) == 30
    assert counts.get("uncertain", 0) <= 4  # at most one per thread of the killed worker
    assert acc["billed_count"] >= counts.get("succeeded", 0)


def test_redis_flushed_mid_run_then_resumed_from_storage(pipe: Pipeline, rconn: redis.Redis) -> None:
    pipe.sandbox.configure(delay="fixed:1.5")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 20)
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "8"
    out = str(pipe.tmp / "out")
    started = pipe.cli("run", str(manifest), "--output", out, "--no-wait")
    run_id = run_id_of(started.stdout)
    pipe.start_workers(2)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 6, timeout=60, what="some submits")
    pipe.stop()  # workers stopped, then Redis loses everything
    for key in rconn.scan_iter(f"{pipe.prefix}*"):
        rconn.delete(key)
    for key in ("unacked", "unacked_index"):
        rconn.delete(key)
    assert rconn.hgetall(f"{pipe.prefix}:run:{run_id}") == {}
    resumed = pipe.cli("resume", run_id, "--output", out)
    assert resumed.returncode == 0 and "resumed from storage" in resumed.stdout, resumed.stderr
    pipe.start_workers(2)
    progress = pipe.wait_done(run_id, timeout=150)
    acc = pipe.sandbox.accounting()
    assert acc["duplicate_fingerprints"] == []  # nothing with a prediction id was submitted again
    assert progress.counts.get("succeeded", 0) + progress.counts.get("uncertain", 0) == 20
    report = read_report((Path(out) / run_id / "report.csv").read_bytes())
    assert len(report) == 20


def test_cancel_submits_nothing_more_and_keeps_paid_results(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:2.0")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "4"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 24)
    pipe.start_workers(1)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    run_id = run_id_of(started.stdout)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 3, timeout=60, what="some submits")
    assert pipe.cli("cancel", run_id).returncode == 0
    at_cancel = pipe.sandbox.accounting()["created"]
    progress = pipe.wait_done(run_id, timeout=90)
    acc = pipe.sandbox.accounting()
    assert acc["created"] <= at_cancel + 1  # at most one submit was already past its last check
    assert progress.counts.get("succeeded", 0) == acc["created"]  # every paid one was fetched
    assert progress.counts.get("skipped", 0) == 24 - acc["created"]


def test_budget_caps_the_run_and_skips_the_rest(pipe: Pipeline) -> None:
    rows = [{"id": f"j{i}", "prompt": f"p{i}", "images": ["shared.png"]} for i in range(10)]
    (pipe.tmp / "shared.png").write_bytes(image_bytes())
    manifest = write_manifest(pipe.tmp, rows)
    pipe.start_workers(2)
    refused = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o"), "--budget", "0.10", "--no-wait")
    assert refused.returncode == 4 and "--allow-partial" in refused.stderr
    done = pipe.cli(
        "run", str(manifest), "--output", str(pipe.tmp / "o"), "--budget", "0.10", "--allow-partial", "--wait"
    )
    assert done.returncode == 3
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 3 and acc["billed_micros"] == 81_000  # 3 x 0.027 <= 0.10 < 4 x 0.027


def test_retry_failed_runs_only_the_failed(pipe: Pipeline) -> None:
    pipe.sandbox.configure(faults={"failed": 1.0})
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 6)
    pipe.start_workers(1)
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--wait")
    assert done.returncode == 3
    run_id = run_id_of(done.stdout)
    pipe.sandbox.configure(faults={"failed": 0.0})
    assert "6 failed jobs" in pipe.cli("retry-failed", run_id).stdout
    progress = pipe.wait_done(run_id)
    assert progress.counts.get("succeeded") == 6 and progress.counts.get("failed", 0) == 0
    assert pipe.sandbox.accounting()["created"] == 12


def test_status_json_is_stable(pipe: Pipeline) -> None:
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 3)
    pipe.start_workers(1)
    run_id = run_id_of(pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o"), "--wait").stdout)
    status = json.loads(pipe.cli("status", run_id, "--json").stdout)
    assert status["done"] and status["counts"]["succeeded"] == 3 and status["cost_usd"] == "0.09"
    assert set(status) >= {"run_id", "total", "finished", "counts", "cost_usd", "jobs_per_second", "eta_seconds"}


def test_report_cells_cannot_start_a_formula() -> None:
    assert [cell(v) for v in ["=1+1", "+x", "-2", "@a", "\tx", "ok", 3]] == [
        "'=1+1",
        "'+x",
        "'-2",
        "'@a",
        "'\tx",
        "ok",
        "3",
    ]


def test_payment_refused_halts_the_run(pipe: Pipeline) -> None:
    pipe.sandbox.reset(balance_usd=0.06, delay="fixed:0.3")  # pays for 2 edits at $0.027
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "2"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 6)
    pipe.start_workers(1)
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o"), "--allow-partial", "--wait")
    assert done.returncode == 3, done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    status = json.loads(pipe.cli("status", run_id, "--json").stdout)
    assert status["halted"] == "payment_required"
    assert status["counts"]["succeeded"] == pipe.sandbox.accounting()["billed_count"] >= 1
    assert status["counts"]["succeeded"] + status["counts"]["skipped"] == 6
    report = read_report((pipe.tmp / "o" / run_id / "report.csv").read_bytes())
    assert any("payment_required" in r["error"] for r in report if r["status"] == "skipped")


def test_an_upload_claimed_by_a_host_that_vanished_is_taken_over(pipe: Pipeline, rconn: redis.Redis) -> None:
    """Rows sharing a photo wait for the one upload in progress; when its claimer is gone (its
    host cut off before it could release the claim), they stop waiting after UPLOAD_WAIT and
    upload it themselves, instead of waiting out the claim's 120 s lease."""
    import hashlib
    import time

    from workers.uploads import UPLOAD_WAIT, UploadCache

    photo = image_bytes(color=(1, 2, 3))
    (pipe.tmp / "shared.png").write_bytes(photo)
    rows = [{"id": f"s{i}", "prompt": "p", "images": ["shared.png"]} for i in range(3)]
    manifest = write_manifest(pipe.tmp, rows)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    run_id = run_id_of(started.stdout)
    claim = UploadCache(rconn, pipe.prefix).key(run_id, hashlib.sha256(photo).hexdigest())
    rconn.set(claim, f"pending:{time.time():.3f}", ex=120)  # a claimer that will never come back
    began = time.monotonic()
    pipe.start_workers(1)
    done = pipe.wait_done(run_id, timeout=60)
    assert done.counts.get("succeeded") == 3
    took = time.monotonic() - began
    assert UPLOAD_WAIT <= took < 60, took
    assert pipe.sandbox.accounting()["uploads"] == 1  # taken over once, then shared again


def _rows(tmp: Path, n: int, model: str = V4) -> Path:
    (tmp / "a.png").write_bytes(image_bytes())
    return write_manifest(tmp, [{"id": f"r{i}", "prompt": f"on white marble {i}", "images": ["a.png"], "model": model}
                                for i in range(n)])  # fmt: skip


def test_the_services_default_contract_with_warm_up_404s_leaves_nothing_uncertain(pipe: Pipeline) -> None:
    """String codes, every status spelling, no price on predictions, an unenveloped balance, the
    User-Agent check, and polls that answer 404 for seconds after each submit: all by default."""
    pipe.sandbox.configure(warmup_seconds=3.0, delay="uniform:0.2:1.0", faults={"nsfw": 0.5})
    defaults = pipe.sandbox.configure()
    assert defaults["check_user_agent"] and defaults["faults"]["send_price"] == 0
    pipe.start_workers(2)
    done = pipe.cli("run", str(_rows(pipe.tmp, 8)), "--output", str(pipe.tmp / "out"), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    acc = pipe.sandbox.accounting()
    assert acc["counts"]["warmup_404"] >= 8 and acc["created"] == acc["billed_count"] == 8
    report = read_report((pipe.tmp / "out" / run_id / "report.csv").read_bytes())
    assert {r["status"] for r in report} == {"succeeded"}  # none uncertain, none overdue
    assert sum(round(float(r["cost_usd"]) * 1_000_000) for r in report) == acc["billed_micros"] == 8 * PRICES[V4]
    for row in report:
        flags = pipe.sandbox.admin("GET", f"predictions/{row['prediction_id']}")["nsfw"]
        assert row["nsfw"] == "|".join(str(i) for i, f in enumerate(flags) if f)
        record = json.loads((pipe.tmp / "out" / run_id / "records" / f"{row['id']}.json").read_text())
        assert record["nsfw"] == flags
    assert any(r["nsfw"] == "0" for r in report) and any(r["nsfw"] == "" for r in report)


def test_a_balance_short_of_the_run_refuses_it_before_any_submit(pipe: Pipeline) -> None:
    pipe.sandbox.reset(balance_usd=0.10)
    headers = {"Authorization": f"Bearer {API_KEY}", "User-Agent": "seedream-batch-tests/1"}
    answer = httpx.get(f"{pipe.sandbox.url}/public/v1/balance", headers=headers, timeout=5)
    assert answer.json()["available"] == {"value": "0.100000", "currency": "usd"}  # the service's shape
    done = pipe.cli("run", str(_rows(pipe.tmp, 9)), "--output", str(pipe.tmp / "out"), "--no-wait")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "the account balance is $0.10, less than the $0.243 this run may spend" in done.stderr
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 0 and acc["submit_calls"] == 0


def test_a_refused_user_agent_is_named_in_the_cli_status_and_report(pipe: Pipeline) -> None:
    manifest = _rows(pipe.tmp, 3)
    pipe.extra_env["SEEDREAM_USER_AGENT"] = "python-requests/2.32.3"
    refused = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o1"), "--no-wait")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        "error: balance: the service's CDN (Cloudflare, error 1010) refused this client's User-Agent " in refused.stderr
    )
    assert "'python-requests/2.32.3'; set SEEDREAM_USER_AGENT to another value" in refused.stderr
    assert "API key" not in refused.stderr
    pipe.start_workers(1)  # workers whose User-Agent the CDN refuses, under a run the CLI could start
    del pipe.extra_env["SEEDREAM_USER_AGENT"]
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "o2"), "--wait")
    assert done.returncode == 3, done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    status = json.loads(pipe.cli("status", run_id, "--json").stdout)
    assert status["halted"] == "user_agent_refused"
    report = read_report((pipe.tmp / "o2" / run_id / "report.csv").read_bytes())
    assert {r["status"] for r in report} <= {"failed", "skipped"}
    assert all("SEEDREAM_USER_AGENT" in r["error"] or r["error"] == "user_agent_refused" for r in report), report
    assert any("Cloudflare, error 1010" in r["error"] for r in report)
    assert pipe.sandbox.accounting()["created"] == 0


def test_the_old_shapes_still_pass_through_their_faults(pipe: Pipeline) -> None:
    """Numeric codes, errors in `message`, a price on each prediction, the enveloped numeric
    balance, no warm-up and any User-Agent: the shapes the sandbox sent before."""
    pipe.sandbox.configure(
        warmup_seconds=0,
        check_user_agent=False,
        delay="uniform:0.1:0.4",
        fault_retry_after=0,
        faults={"numeric_code": 1.0, "message_errors": 1.0, "send_price": 1.0, "enveloped_balance": 1.0,
                "succeeded_spelling": 1.0, "failed": 0.3, "rate_limited": 0.05},
    )  # fmt: skip
    pipe.start_workers(1)
    done = pipe.cli("run", str(_rows(pipe.tmp, 8, V45)), "--output", str(pipe.tmp / "out"), "--wait")
    assert done.returncode in (0, 3), done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    report = read_report((pipe.tmp / "out" / run_id / "report.csv").read_bytes())
    acc = pipe.sandbox.accounting()
    assert acc["by_status"].get("succeeded", 0) == acc["billed_count"] >= 1
    for row in report:
        truth = pipe.sandbox.admin("GET", f"predictions/{row['prediction_id']}")
        if truth["billable"]:
            assert row["status"] == "succeeded" and row["cost_usd"] == "0.036", row
        else:
            assert row["status"] == "failed" and row["cost_usd"] == "0.00" and "could not process" in row["error"]
    assert sum(round(float(r["cost_usd"]) * 1_000_000) for r in report) == acc["billed_micros"]
