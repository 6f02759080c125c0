"""An edit already paid for is never paid again: a row whose request fingerprint is in the
output's results index copies the stored outputs; two rows with one fingerprint at the same time
make one prediction. Real parts: the CLI and Celery workers as processes, Redis, the sandbox over
HTTP, a folder as the output (and S3 for the server-side copy)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from jobs.results import FOLDER, Entry, Plan, ResultsIndex, entry_key
from jobs.storage import LocalStorage, open_output
from manifests.fingerprint import fingerprint
from manifests.images import inspect
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, read_report, run_id_of, write_manifest


def _catalogue(tmp: Path, n: int = 6, name: str = "manifest.jsonl", **change: str) -> Path:
    for i in range(n):
        (tmp / f"p{i}.png").write_bytes(image_bytes(color=(10 * i, 80, 160)))
    rows = [
        {"id": f"sku{i:02d}", "prompt": change.get(f"sku{i:02d}", f"on white marble #{i}"), "images": [f"p{i}.png"]}
        for i in range(n)
    ]
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _report(out: Path, run_id: str) -> list[dict[str, str]]:
    return read_report((out / run_id / "report.csv").read_bytes())


def _summary(out: Path, run_id: str) -> dict[str, Any]:
    return dict(json.loads((out / run_id / "summary.json").read_text()))


def _run(pipe: Pipeline, manifest: Path, out: Path | str, *args: str, code: int = 0) -> str:
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait", *args, timeout=180)
    assert done.returncode == code, done.stdout + done.stderr
    return run_id_of(done.stdout)


def test_a_catalogue_run_again_pays_only_for_what_changed(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:0.3")
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    manifest = _catalogue(pipe.tmp)
    first = _run(pipe, manifest, out)
    assert pipe.sandbox.accounting()["created"] == 6
    assert len(ResultsIndex(LocalStorage(out)).fingerprints()) == 6

    est = pipe.cli("estimate", str(manifest), "--output", str(out))
    assert est.returncode == 0 and "6 of 6 rows reuse an edit stored already" in est.stdout, est.stdout

    second = _run(pipe, manifest, out)
    assert pipe.sandbox.accounting()["created"] == 6  # nothing paid again
    report = _report(out, second)
    assert {r["status"] for r in report} == {"succeeded"}
    assert {r["cost_usd"] for r in report} == {"0.00"}
    assert [r["reused_from"] for r in report] == [f"{first}/sku{i:02d}" for i in range(6)]
    for i in range(6):
        stored = out / second / "outputs" / f"sku{i:02d}" / "0.jpg"
        assert inspect(stored.read_bytes()).width > 14  # a real image, its own copy
        assert stored.read_bytes() == (out / first / "outputs" / f"sku{i:02d}" / "0.jpg").read_bytes()
    summary = _summary(out, second)
    assert summary["reused"] == 6 and summary["total_cost_usd"] == "0.00"
    assert float(summary["saved_usd"]) == pytest.approx(6 * 0.027)
    assert "reused from" in (out / second / "report.html").read_text()

    shutil.rmtree(out / first / "outputs" / "sku03")  # a stored edit deleted: paid for again
    third = _run(pipe, _catalogue(pipe.tmp, name="changed.jsonl", sku01="on black slate"), out)
    assert pipe.sandbox.accounting()["created"] == 8  # sku01's new prompt, sku03's lost outputs
    paid = {r["id"] for r in _report(out, third) if not r["reused_from"]}
    assert paid == {"sku01", "sku03"}

    _run(pipe, manifest, out, "--no-reuse")
    assert pipe.sandbox.accounting()["created"] == 14


def test_two_identical_rows_in_one_manifest_make_one_prediction(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:1.0")
    pipe.start_workers(1)
    (pipe.tmp / "p.png").write_bytes(image_bytes())
    rows = [{"id": sku, "prompt": "on white marble", "images": ["p.png"]} for sku in ("a", "b", "c")]
    manifest = write_manifest(pipe.tmp, rows)
    est = pipe.cli("estimate", str(manifest), "--output", str(pipe.tmp / "out"))
    assert "2 of 3 rows reuse" in est.stdout, est.stdout
    run = _run(pipe, manifest, pipe.tmp / "out")
    assert pipe.sandbox.accounting()["created"] == 1
    report = _report(pipe.tmp / "out", run)
    assert {r["status"] for r in report} == {"succeeded"}
    made = [r["id"] for r in report if not r["reused_from"]]
    assert len(made) == 1 and {r["reused_from"] for r in report} == {"", f"{run}/{made[0]}"}


def test_two_runs_of_one_manifest_at_once_make_each_prediction_once(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:1.0")
    out = pipe.tmp / "out"
    manifest = _catalogue(pipe.tmp, 8)
    a = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    b = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pipe.start_workers(2)
    for started in (a, b):
        pipe.wait_done(run_id_of(started.stdout), timeout=120)
    assert pipe.sandbox.accounting()["created"] == 8
    reports = [_report(out, run_id_of(x.stdout)) for x in (a, b)]
    assert all({r["status"] for r in rep} == {"succeeded"} for rep in reports)
    reused = sum(1 for rep in reports for r in rep if r["reused_from"])
    assert reused == 8  # each edit made by one run, copied by the other


def test_a_failed_edit_lets_the_waiting_row_submit(pipe: Pipeline) -> None:
    """The first of two identical rows fails at the service: the second is not left waiting, it
    submits (and the index holds nothing for a failure)."""
    pipe.sandbox.configure(delay="fixed:0.5", faults={"failed": 1.0})
    pipe.start_workers(1)
    (pipe.tmp / "p.png").write_bytes(image_bytes())
    rows = [{"id": sku, "prompt": "on white marble", "images": ["p.png"]} for sku in ("a", "b")]
    run = _run(pipe, write_manifest(pipe.tmp, rows), pipe.tmp / "out", code=3)
    report = _report(pipe.tmp / "out", run)
    assert pipe.sandbox.accounting()["created"] == 2
    assert {r["status"] for r in report} == {"failed"} and not any(r["reused_from"] for r in report)
    assert not list((pipe.tmp / "out").glob(f"{FOLDER}/*/*.json"))


def test_runs_into_s3_copy_server_side_and_reuse_from_another_output(pipe: Pipeline, s3_endpoint: str) -> None:
    import boto3

    pipe.s3_endpoint = s3_endpoint
    pipe.sandbox.configure(delay="fixed:0.3")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"reuse-{pipe.prefix.replace(':', '-').replace('_', '-')}"[:60].lower()
    s3.create_bucket(Bucket=bucket)
    pipe.start_workers(1)
    manifest = _catalogue(pipe.tmp, 3)
    folder = pipe.tmp / "earlier"
    _run(pipe, manifest, folder)
    assert pipe.sandbox.accounting()["created"] == 3
    first = _run(pipe, manifest, f"s3://{bucket}/shoots", "--reuse-from", str(folder))
    assert pipe.sandbox.accounting()["created"] == 3  # copied from the folder's index into S3
    second = _run(pipe, manifest, f"s3://{bucket}/shoots")
    assert pipe.sandbox.accounting()["created"] == 3
    got = s3.head_object(Bucket=bucket, Key=f"shoots/{second}/outputs/sku00/0.jpg")
    assert got["Metadata"]["reused-from"] == f"{first}/sku00"  # copied S3 to S3, told where from
    assert got["ContentType"] == "image/jpeg"
    report = read_report(s3.get_object(Bucket=bucket, Key=f"shoots/{second}/report.csv")["Body"].read())
    assert {r["reused_from"] for r in report} == {f"{first}/sku{i:02d}" for i in range(3)}


# -- the index and the fingerprint alone ------------------------------------------------------


def test_the_fingerprint_covers_every_part_of_the_request() -> None:
    base = fingerprint("m", "p", ["sha256:aa"], "1024*1024", {"seed": 1, "max_images": 1})
    assert base == fingerprint("m", "p", ["sha256:aa"], "1024x1024", {"max_images": 1, "seed": 1})
    changed = [
        fingerprint("m2", "p", ["sha256:aa"], "1024*1024", {"seed": 1, "max_images": 1}),
        fingerprint("m", "p ", ["sha256:aa"], "1024*1024", {"seed": 1, "max_images": 1}),
        fingerprint("m", "p", ["sha256:ab"], "1024*1024", {"seed": 1, "max_images": 1}),
        fingerprint("m", "p", ["sha256:aa", "sha256:aa"], "1024*1024", {"seed": 1, "max_images": 1}),
        fingerprint("m", "p", ["sha256:aa"], "2048*2048", {"seed": 1, "max_images": 1}),
        fingerprint("m", "p", ["sha256:aa"], "1024*1024", {"seed": 2, "max_images": 1}),
        fingerprint("m", "p", ["sha256:aa"], None, {"seed": 1, "max_images": 1}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    assert fingerprint("m", "p", ["sha256:aa", None], None, {}) == ""  # an input unknown: never reused


def test_an_entry_that_was_tampered_with_is_no_entry(tmp_path: Path) -> None:
    index = ResultsIndex(open_output(str(tmp_path)))
    fp = "ab" * 32
    good = {"fingerprint": fp, "run_id": "r1", "job_id": "j", "prediction_id": "p", "model": "m",
            "outputs": ["r1/outputs/j/0.png"], "cost_micros": 27000, "finished_at": 1.0}  # fmt: skip
    for bad in (
        {**good, "fingerprint": "cd" * 32},
        {**good, "outputs": ["../../etc/passwd"]},
        {**good, "outputs": []},
        {**good, "run_id": "../x"},
        "not a dict",
    ):
        (tmp_path / entry_key(fp)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry_key(fp)).write_text(json.dumps(bad))
        assert index.get(fp) is None, bad
    (tmp_path / entry_key(fp)).write_text("{not json")
    assert index.get(fp) is None
    (tmp_path / entry_key(fp)).write_text(json.dumps(good))
    assert index.get(fp) == Entry.from_json(fp, good) and index.fingerprints() == {fp}


def test_the_plan_reuses_indexed_edits_and_repeats_within_the_manifest() -> None:
    plan = Plan({"a" * 64})
    assert [plan.reused(fp) for fp in ("a" * 64, "b" * 64, "b" * 64, "", "")] == [True, False, True, False, False]


def test_reused_rows_take_nothing_from_the_budget(pipe: Pipeline) -> None:
    """Three rows already made and one new one, with a cap that pays for one edit: the run is
    accepted and every row succeeds; only the new one is paid and reserved."""
    pipe.sandbox.configure(delay="fixed:0.3")
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    _run(pipe, _catalogue(pipe.tmp, 3), out)
    run = _run(pipe, _catalogue(pipe.tmp, 4, name="more.jsonl"), out, "--budget", "0.03")
    assert pipe.sandbox.accounting()["created"] == 4
    report = _report(out, run)
    assert {r["status"] for r in report} == {"succeeded"}
    assert [bool(r["reused_from"]) for r in report] == [True, True, True, False]
    assert _summary(out, run)["budget"]["spent_usd"] == "0.027"


def test_an_edit_whose_worker_was_killed_is_finished_once_and_copied_by_its_twin(pipe: Pipeline) -> None:
    """Run A's worker is SIGKILLed while its four predictions run; run B (same rows, same output)
    waits on A's claims. A's jobs are taken over and finish; B copies them: four predictions."""
    pipe.sandbox.configure(delay="fixed:3.0")
    out = pipe.tmp / "out"
    manifest = _catalogue(pipe.tmp, 4)
    doomed = pipe.start_workers(1)
    a = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    assert a.returncode == 0, a.stderr
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 4, timeout=60, what="run A's submits")
    b = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    assert b.returncode == 0, b.stderr
    os.kill(doomed.procs[0].pid, signal.SIGKILL)
    pipe.start_workers(1)
    for started in (a, b):
        pipe.wait_done(run_id_of(started.stdout), timeout=150)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 4 and acc["duplicate_fingerprints"] == []
    ra, rb = (_report(out, run_id_of(x.stdout)) for x in (a, b))
    assert {r["status"] for r in ra + rb} == {"succeeded"}
    assert not any(r["reused_from"] for r in ra) and all(r["reused_from"] for r in rb)


def test_a_big_index_is_listed_whole_page_by_page_then_shard_by_shard(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from jobs import results

    monkeypatch.setattr(results, "SEQUENTIAL", 7)  # past 7 entries, the shards not reached yet
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"index-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=bucket)
    fps = {f"{n:02x}{n:062x}" for n in range(0, 256, 5)}
    for store in (open_output(f"s3://{bucket}/out", endpoint_url=s3_endpoint), open_output(str(tmp_path))):
        index = ResultsIndex(store)
        for fp in fps:
            index.put(Entry(fp, "r", "j", "p", "m", ("r/outputs/j/0.jpg",), 1, 0.0))
        assert index.fingerprints() == fps
