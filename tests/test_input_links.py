"""Inputs the service fetches itself: presigned links from the user's bucket, uploadMedia only
where no bucket serves, and no link ever kept. Real Redis, Celery workers, the sandbox (which
fetches every input link) and moto's S3 server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import redis

from jobs.budget import Budget
from tests.helpers import image_bytes
from tests.pipeline import Pipeline, read_report, run_id_of, write_manifest

SIGNED = ("X-Amz-Signature", "X-Amz-Credential")


def _bucket(pipe: Pipeline, s3_endpoint: str) -> tuple[Any, str]:
    pipe.s3_endpoint = s3_endpoint
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"b-{pipe.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def _no_link(where: str, text: str) -> None:
    for marker in SIGNED:
        assert marker not in text, f"a presigned link in {where}: {text[:300]}"


def _redis_text(rconn: redis.Redis, prefix: str) -> str:
    """Every string and hash value under the test's prefix: job records, run meta, caches."""
    out = []
    for key in rconn.scan_iter(f"{prefix}*", count=1000):
        kind = rconn.type(key)
        if kind == "hash":
            out.append(json.dumps(rconn.hgetall(key)))
        elif kind == "string":
            out.append(str(rconn.get(key)))
    return "\n".join(out)


def _bucket_text(s3: Any, bucket: str) -> tuple[list[str], str]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    blobs = []
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        blobs.append(body.decode("latin-1"))
        blobs.append(json.dumps(s3.head_object(Bucket=bucket, Key=key)["Metadata"]))
    return keys, "\n".join(blobs)


def test_s3_output_sends_links_stages_local_files_once_and_keeps_no_link(
    pipe: Pipeline, s3_endpoint: str, rconn: redis.Redis
) -> None:
    s3, bucket = _bucket(pipe, s3_endpoint)
    s3.put_object(Bucket=bucket, Key="src/a.png", Body=image_bytes(40, 40, color=(1, 200, 3)))
    s3.put_object(Bucket=bucket, Key="src/b.jpg", Body=image_bytes(44, 40, "JPEG", color=(200, 2, 3)))
    (pipe.tmp / "shared.png").write_bytes(image_bytes(48, 48, color=(200, 10, 10)))
    (pipe.tmp / "p1.jpg").write_bytes(image_bytes(33, 32, "JPEG", color=(7, 90, 20)))
    (pipe.tmp / "p2.jpg").write_bytes(image_bytes(34, 32, "JPEG", color=(14, 90, 20)))
    images = [
        ["shared.png"],
        ["shared.png", f"s3://{bucket}/src/a.png"],
        ["p1.jpg", "shared.png"],
        [f"s3://{bucket}/src/a.png"],
        ["p2.jpg", f"s3://{bucket}/src/b.jpg"],
        [f"s3://{bucket}/src/b.jpg", "shared.png"],
    ]
    rows = [{"id": f"sku-{i}", "prompt": f"on marble #{i}", "images": im} for i, im in enumerate(images)]
    manifest = write_manifest(pipe.tmp, rows)
    pipe.start_workers(2, loglevel="INFO")
    output = f"s3://{bucket}/catalog"
    first = pipe.cli("run", str(manifest), "--output", output, "--wait")
    assert first.returncode == 0, first.stdout + first.stderr
    run_id = run_id_of(first.stdout)

    acc = pipe.sandbox.accounting()
    n_inputs = sum(len(im) for im in images)
    assert acc["uploads"] == 0 and acc["created"] == 6 and acc["billed_count"] == 6
    # every input reached the service as a presigned link, and it fetched each one
    assert acc["input_fetches"] == acc["input_fetches_signed"] == n_inputs and acc["input_fetch_failures"] == 0
    staged = sorted(k for k in _bucket_text(s3, bucket)[0] if k.startswith("catalog/inputs/"))
    assert len(staged) == 3  # shared.png, p1.jpg, p2.jpg: once each, by content hash
    counts = pipe.runs().store.counts(run_id)
    assert counts.get("inputs_staged") == 3 and not counts.get("inputs_found")

    second = pipe.cli("run", str(manifest), "--output", output, "--no-reuse", "--wait")  # paid again
    assert second.returncode == 0, second.stdout + second.stderr
    again = pipe.runs().store.counts(run_id_of(second.stdout))
    assert not again.get("inputs_staged") and again.get("inputs_found") == 3  # nothing staged again
    assert sorted(k for k in _bucket_text(s3, bucket)[0] if k.startswith("catalog/inputs/")) == staged
    assert pipe.sandbox.accounting()["uploads"] == 0

    # no link anywhere it could be kept: the bucket (records, report, run.json, gallery), Redis,
    # the CLI's output and the workers' log lines
    keys, stored = _bucket_text(s3, bucket)
    assert f"catalog/{run_id}/run.json" in keys and f"catalog/{run_id}/report.csv" in keys
    _no_link("the bucket", stored)
    _no_link("Redis", _redis_text(rconn, pipe.prefix))
    _no_link("the CLI", first.stdout + first.stderr + second.stdout + second.stderr)
    _no_link("the workers' log", (pipe.tmp / "workers.log").read_text())
    report = read_report(s3.get_object(Bucket=bucket, Key=f"catalog/{run_id}/report.csv")["Body"].read())
    assert [r["status"] for r in report] == ["succeeded"] * 6
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"catalog/{run_id}/records/sku-4.json")["Body"].read())
    assert record["images"] == ["p2.jpg", f"s3://{bucket}/src/b.jpg"]  # the record keeps the URI


def test_folder_output_uploads_once_per_hash_and_refuses_a_bulk_upload_unless_told(pipe: Pipeline) -> None:
    (pipe.tmp / "shared.png").write_bytes(image_bytes(48, 48, color=(200, 10, 10)))
    for i in range(3):
        (pipe.tmp / f"p{i}.jpg").write_bytes(image_bytes(32 + i, 32, "JPEG", color=(i * 40, 90, 20)))
    images = [["shared.png"], ["p0.jpg", "shared.png"], ["p1.jpg"], ["p2.jpg", "shared.png"], ["p1.jpg"]]
    rows = [{"id": f"sku-{i}", "prompt": f"on marble #{i}", "images": im} for i, im in enumerate(images)]
    manifest = write_manifest(pipe.tmp, rows)
    out = str(pipe.tmp / "out")

    pipe.extra_env["SEEDREAM_BULK_UPLOAD_THRESHOLD"] = "3"  # 4 distinct files: above it
    refused = pipe.cli("run", str(manifest), "--output", out, "--no-wait")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    for words in ("4 distinct files", "uploadMedia", "API key suspension", "--inputs-bucket", "--allow-bulk-upload"):
        assert words in refused.stderr, refused.stderr
    presign = pipe.cli("run", str(manifest), "--output", out, "--inputs", "presign", "--allow-bulk-upload")
    assert presign.returncode == 2 and "--inputs presign" in presign.stderr, presign.stderr
    for command in ("validate", "estimate"):  # they say it too, and refuse nothing
        checked = pipe.cli(command, str(manifest))
        assert checked.returncode == 0 and "API key suspension" in checked.stderr, checked.stderr
    assert pipe.sandbox.accounting()["submit_calls"] == 0 and pipe.sandbox.accounting()["uploads"] == 0
    assert not Path(out).exists()

    pipe.start_workers(1)
    done = pipe.cli("run", str(manifest), "--output", out, "--allow-bulk-upload", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    acc = pipe.sandbox.accounting()
    assert acc["uploads"] == 4 and all(n == 1 for n in acc["uploads_by_sha"].values())  # once per hash
    assert acc["input_fetches"] == 0  # each input came from the service's own uploads

    pipe.extra_env["SEEDREAM_BULK_UPLOAD_THRESHOLD"] = "100"  # under the threshold: as before, no flag
    under = pipe.cli("run", str(manifest), "--output", out, "--wait")
    assert under.returncode == 0 and "uploadMedia" not in under.stderr, under.stdout + under.stderr


def test_an_input_link_the_service_cannot_fetch_fails_the_job_unbilled(
    pipe: Pipeline, s3_endpoint: str, rconn: redis.Redis
) -> None:
    s3, bucket = _bucket(pipe, s3_endpoint)
    s3.put_object(Bucket=bucket, Key="src/gone.png", Body=image_bytes(40, 40))
    s3.put_object(Bucket=bucket, Key="src/fake.png", Body=b"this is no image at all" * 10)
    rows = [
        {"id": "gone", "prompt": "on marble", "images": [f"s3://{bucket}/src/gone.png"]},
        {"id": "fake", "prompt": "on marble", "images": [f"s3://{bucket}/src/fake.png"]},
    ]
    manifest = write_manifest(pipe.tmp, rows)
    started = pipe.cli("run", str(manifest), "--output", f"s3://{bucket}/out", "--budget", "1", "--no-wait")
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    s3.delete_object(Bucket=bucket, Key="src/gone.png")  # after validation, before the submit
    pipe.start_workers(1, loglevel="INFO")
    progress = pipe.wait_done(run_id, timeout=90)

    assert progress.counts.get("failed") == 2 and progress.cost_micros == 0
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 2 and acc["billed_count"] == 0 and acc["billed_micros"] == 0
    assert acc["input_fetches_signed"] == 2 and acc["input_fetch_failures"] == 2
    runs = pipe.runs()
    meta = runs.meta(run_id)
    budget = Budget(runs.redis, meta.budget_scope, prefix=pipe.prefix).state()
    assert budget.spent_micros == 0 and budget.reserved_micros == 0  # both reservations released
    jobs = {r.id: r for r in runs.store.iter_records(run_id)}
    assert "failed to fetch input image" in jobs["gone"].error and "404" in jobs["gone"].error
    assert f"/{bucket}/src/gone.png" in jobs["gone"].error  # the object is named, its link is not
    assert "not an image" in jobs["fake"].error
    for job in jobs.values():
        assert job.cost_micros == 0 and job.prediction_id
        _no_link("a record's error", job.error)
    report = pipe.cli("report", run_id)
    assert report.returncode == 0, report.stderr
    _no_link("the bucket", _bucket_text(s3, bucket)[1])
    _no_link("Redis", _redis_text(rconn, pipe.prefix))
    _no_link("the workers' log", (pipe.tmp / "workers.log").read_text())


def test_s3_inputs_are_checked_before_anything_is_spent_and_named_at_their_lines(
    s3_endpoint: str, tmp_path: Path
) -> None:
    from jobs.s3check import checked_scan, s3_header
    from manifests.models import ModelTable
    from manifests.validate import Validator

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"b-check-{tmp_path.name.lower()[-12:].strip('_-') or 'x'}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="ok.png", Body=image_bytes())
    s3.put_object(Bucket=bucket, Key="big.png", Body=b"\0" * (10 * 1024 * 1024 + 1))
    uri = f"s3://{bucket}"
    images = [[f"{uri}/ok.png"], [f"{uri}/missing.png"], [f"{uri}/ok.png", f"{uri}/big.png"], [f"{uri}/missing.png"]]
    manifest = write_manifest(tmp_path, [{"id": f"r{i}", "prompt": "p", "images": im} for i, im in enumerate(images)])
    validator = Validator(manifest, ModelTable.load(None))
    result, est, _ = checked_scan(validator, lambda: s3_header(s3_endpoint))
    assert (result.jobs, result.invalid_rows, est.jobs) == (1, 3, 1)  # each bad row counted, none estimated
    lines = result.lines()
    assert f"manifest.jsonl:2: images[1]: '{uri}/missing.png': does not exist" in lines[0]
    assert ":3: images[2]:" in lines[1] and "the service takes at most 10 MB" in lines[1]
    assert ":4: images[1]:" in lines[2] and "does not exist" in lines[2]
    assert [j.id for j in validator.jobs()] == ["r0"]  # a --skip-invalid run enqueues only the good row
