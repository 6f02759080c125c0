"""The before/after gallery (report.html): a real run's page in headless Chromium, 10,000 jobs,
hostile text from the manifest and the service, thumbnails made once, presigned links."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from jobs.gallery import render
from jobs.records import RunRecord
from jobs.report import write_report
from jobs.storage import LocalStorage, S3Storage
from jobs.thumbs import relative
from sandbox.server import SandboxProcess
from tests.browser import chromium_page
from tests.helpers import image_bytes
from tests.pipeline import V4, V45, Pipeline, run_id_of, write_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
INJECTED = "<script>window.__pwned = 1</script> same sneaker on white marble"
HOSTILE_SKU = '<img src=x onerror="window.__pwned = 2">'
PRICE = {V4: 27_000, V45: 36_000}


def _visible(page: Any) -> int:
    return int(page.locator("#cards .card").count())


def _run_with_a_failure_and_a_skip(pipe: Pipeline, sandbox: SandboxProcess) -> tuple[str, Path]:
    """The example catalog (12 products, both models), in order, one job at a time: row 2 carries
    a script in its prompt and its metadata; row 3 asks for an input the service cannot fetch (a
    failure it does not bill); the budget pays for every row but the last, which is skipped."""
    with (EXAMPLES / "catalog.csv").open(newline="") as fh:
        rows: list[dict[str, Any]] = [dict(r) for r in csv.DictReader(fh)]
    for r in rows:
        r["images"] = [str(EXAMPLES / r["images"])]
        r.pop("size")
    rows[1].update(prompt=INJECTED, sku=HOSTILE_SKU)
    rows[2]["images"] = [f"{sandbox.url}/files/uploads/nope/missing.png"]
    manifest = write_manifest(pipe.tmp, rows)
    pipe.extra_env["SEEDREAM_WINDOW"] = "1"
    pipe.start_workers(1, concurrency=2)
    budget = sum(PRICE[r["model"]] for i, r in enumerate(rows) if i not in (2, 11))  # row 3 is refunded
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--budget", f"{budget / 1e6:.3f}",
                    "--allow-partial", "--wait", timeout=180)  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr  # some jobs did not succeed
    run_id = run_id_of(done.stdout)
    return run_id, pipe.tmp / "out" / run_id


def test_the_gallery_of_a_real_run_in_chromium(pipe: Pipeline, sandbox: SandboxProcess) -> None:
    _, folder = _run_with_a_failure_and_a_skip(pipe, sandbox)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["counts"] == {"succeeded": 10, "failed": 1, "skipped": 1}
    assert len(list((folder / "thumbs" / "out").iterdir())) == 10  # made by the workers, one per output
    page_file = folder / "report.html"
    with chromium_page() as page:
        page.goto(page_file.as_uri())
        page.wait_for_selector("#cards .card")
        assert _visible(page) == 12  # one card per job
        assert page.locator("#shown").inner_text() == "12 of 12 jobs"

        page.select_option("#status", "failed")
        assert _visible(page) == 1
        failed = page.locator("#cards .card").first
        assert failed.get_attribute("data-id") == "sku-1003-marble"
        assert "failed to fetch input image" in failed.locator(".error").inner_text()

        page.select_option("#status", "skipped")
        assert _visible(page) == 1
        assert "budget" in page.locator("#cards .card .error").inner_text()

        page.select_option("#status", "")
        page.select_option("#model", V45)
        assert _visible(page) == 3
        page.select_option("#model", "")
        page.fill("#q", "headphones")
        assert _visible(page) == 1 and page.locator("#cards .card").get_attribute("data-id") == "sku-1007-marble"
        page.fill("#q", "SKU-1010")  # metadata is searched too
        assert _visible(page) == 1 and page.locator("#cards .card").get_attribute("data-id") == "sku-1010-marble"
        page.fill("#q", "")
        assert _visible(page) == 12

        # what came from the manifest is shown as text, and none of it ran
        assert page.evaluate("typeof window.__pwned") == "undefined"
        hostile = page.locator('#cards .card[data-id="sku-1002-marble"]')
        assert INJECTED in hostile.locator(".prompt").inner_text()
        assert HOSTILE_SKU in hostile.locator(".meta").inner_text()
        assert page.locator("#cards img[src='x']").count() == 0

        # thumbnails load from the folder (relative links), and a click shows the output itself
        ok = page.locator('#cards .card[data-id="sku-1001-marble"]')
        loaded = "img => img.complete && img.naturalWidth > 0"
        thumbs = ok.locator("img.thumb")
        assert thumbs.count() == 2  # input and output
        assert all(thumbs.nth(i).evaluate(loaded) for i in range(2))
        ok.locator("a.full").click()
        assert page.locator("#viewer").get_attribute("class") == "open"
        full = page.locator("#viewer-img")
        assert re.search(r"outputs/sku-1001-marble/0\.\w+$", full.get_attribute("src") or "")
        page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
        page.locator("#viewer").click()
        assert page.locator("#viewer").get_attribute("class") != "open"

        assert page.problems == []  # no script error, no resource blocked or missing
        shot = pipe.tmp / "gallery.png"
        page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("SEEDREAM_GALLERY_SCREENSHOT"):  # how docs/gallery.png is made
        shutil.copyfile(shot, os.environ["SEEDREAM_GALLERY_SCREENSHOT"])


def _records(n: int) -> list[dict[str, Any]]:
    states = ["succeeded"] * 7 + ["failed", "skipped", "uncertain"]
    return [
        {"id": f"sku-{i:05d}", "line": i + 2, "state": states[i % 10], "model": V45 if i % 3 == 0 else V4,
         "prompt": f"same product on white marble, soft daylight, variant {i}", "images": [f"p{i}.png"],
         "metadata": {"sku": f"S{i:05d}", "campaign": "autumn"}, "outputs": [],
         "cost_micros": 27_000 if states[i % 10] == "succeeded" else 0,
         "error": "the model could not process this request" if states[i % 10] == "failed" else ""}
        for i in range(n)
    ]  # fmt: skip


def test_the_gallery_stays_usable_at_ten_thousand_jobs(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    write_report(storage, iter(_records(10_000)), RunRecord(run_id="big", metadata_columns=("sku", "campaign")))
    page_file = tmp_path / "run" / "report.html"
    assert page_file.stat().st_size < 8 * 1024 * 1024
    with chromium_page() as page:
        page.goto(page_file.as_uri())
        page.wait_for_selector("#cards .card")
        assert page.locator("#shown").inner_text() == "10000 of 10000 jobs"
        assert _visible(page) == 60  # one page of cards in the DOM, not 10,000
        assert page.locator("#page").inner_text() == "page 1 of 167"
        page.click("#next")
        assert page.locator("#cards .card").first.get_attribute("data-id") == "sku-00060"
        page.select_option("#status", "failed")
        assert page.locator("#shown").inner_text() == "1000 of 10000 jobs" and _visible(page) == 60
        page.fill("#q", "S09997")
        assert _visible(page) == 1 and page.locator("#page").inner_text() == "page 1 of 1"
        assert page.problems == []


def test_everything_from_the_manifest_or_the_service_is_text() -> None:
    hostile = "</script><script>alert(1)</script>"
    jobs = [{"id": "a", "line": 2, "status": "failed", "model": "<b>m</b>", "prompt": hostile,
             "metadata": {"<k>": "<!-- x"}, "cost": "0", "error": "</SCRIPT >&", "inputs": ["in.png"]}]  # fmt: skip
    summary = {"run_id": "<i>run</i>", "jobs": 1, "counts": {"failed": 1}, "cost_by_model_usd": {"<b>m</b>": "0"}}
    page = render(summary, jobs)
    data = page.split('<script type="application/json" id="data"', 1)[1].split("</script>", 1)[0]
    assert "<" not in data.split(">", 1)[1]  # the embedded data holds no markup at all
    assert json.loads(data.split(">", 1)[1])["jobs"][0]["prompt"] == hostile
    assert "<i>run</i>" not in page and "&lt;i&gt;run&lt;/i&gt;" in page
    assert "<b>m</b>" not in page
    assert page.count("<script") == 2  # the data block and the page's own code
    nonce = re.search(r"script-src 'nonce-([^']+)'", page)
    assert nonce and f'nonce="{nonce.group(1)}"' in page  # a script without this nonce never runs


def test_links_never_leave_the_run(tmp_path: Path) -> None:
    base = "s3://bucket/out/run1/"
    assert relative("s3://bucket/out/run1/outputs/a/0.png", base) == "outputs/a/0.png"
    assert relative("s3://bucket/out/run2/outputs/a/0.png", base) == ""
    assert relative("s3://bucket/out/run1/../run2/x.png", base) == ""
    assert relative("https://evil.example/x.png", base) == ""


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str, metadata: Any = None) -> str:
        self.puts.append(key)
        return super().put_bytes(key, data, content_type, metadata)


def test_no_report_header_starts_a_formula(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    names = ['=HYPERLINK("http://x","y")', "+1", "-1", "@SUM(A1)", "\tx", "sku"]
    record = {"id": "a", "line": 2, "state": "succeeded", "model": V4, "prompt": "p", "images": ["p.png"],
              "metadata": {n: f"v{i}" for i, n in enumerate(names)}, "outputs": [], "cost_micros": 27_000}  # fmt: skip
    write_report(storage, iter([record]), RunRecord(run_id="r", metadata_columns=tuple(names)))
    raw = (tmp_path / "run" / "report.csv").read_bytes().decode("utf-8")
    assert raw.startswith("id,status,") and ',"\'=HYPERLINK(""http://x"",""y"")",' in raw.split("\n", 1)[0]
    header, row = list(csv.reader(io.StringIO(raw, newline="")))
    assert not [c for c in header if c.startswith(("=", "+", "-", "@", "\t", "\r"))], header
    assert header[-len(names) :] == ["'" + n for n in names[:-1]] + ["sku"]
    assert row[-len(names) :] == [f"v{i}" for i in range(len(names))]  # each value stays under its column


def test_thumbnails_are_made_once(tmp_path: Path) -> None:
    photos = tmp_path / "in"
    photos.mkdir()
    storage = CountingStorage(tmp_path / "run")
    records = []
    for i in range(6):
        (photos / f"p{i % 2}.png").write_bytes(image_bytes(300, 200))  # two photos shared by six rows
        out = storage.put_bytes(f"outputs/sku-{i}/0.png", image_bytes(600, 400), "image/png")
        records.append({"id": f"sku-{i}", "line": i + 2, "state": "succeeded", "model": V4, "prompt": "p",
                        "images": [f"p{i % 2}.png"], "outputs": [out], "cost_micros": 27_000})  # fmt: skip
    meta = RunRecord(run_id="r", manifest=str(photos / "manifest.csv"))

    def read(kind: str, value: str, path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    storage.puts.clear()
    write_report(storage, iter(records), meta, read_input=read)
    thumbs = [k for k in storage.puts if k.startswith("thumbs/")]
    assert len(thumbs) == 6 + 2  # every output, and each distinct photo once
    assert all(max(_size(storage.root / k)) <= 256 for k in thumbs)
    storage.puts.clear()
    write_report(storage, iter(records), meta, read_input=read)
    assert [k for k in storage.puts if k.startswith("thumbs/")] == []  # nothing made twice
    html = (storage.root / "report.html").read_text()
    assert all(k in html for k in thumbs) and str(storage.root) not in html  # relative links only


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def test_a_presigned_gallery_opens_straight_from_s3(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="gallery")
    storage = S3Storage("gallery", "reshoots/r1", endpoint_url=s3_endpoint)
    out = storage.put_bytes("outputs/sku-1/0.png", image_bytes(300, 200), "image/png")
    records = [{"id": "sku-1", "line": 2, "state": "succeeded", "model": V4, "prompt": "p", "images": ["u.png"],
                "outputs": [out], "cost_micros": 27_000}]  # fmt: skip
    summary = write_report(storage, iter(records), RunRecord(run_id="r1"), presign_seconds=600)
    link = summary["gallery_presigned_url"]
    assert "X-Amz-Signature=" in link or "Signature=" in link
    stored = json.loads(storage.get_bytes("summary.json") or b"{}")
    assert "gallery_presigned_url" not in stored  # a link that works without credentials is never stored
    page = httpx.get(link, timeout=10)  # no credentials: the link itself is the permission
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    srcs = re.findall(r'"(http[^"]+)"', page.text.split('id="data"', 1)[1])
    assert srcs and all(httpx.get(u.encode().decode("unicode_escape"), timeout=10).status_code == 200 for u in srcs)
    assert f"img-src 'self' data: {s3_endpoint}" in page.text
    plain = storage.get_bytes("report.html") or b""
    assert b"X-Amz" not in plain and b"thumbs/out/" in plain  # the downloadable page links relatively
    with pytest.raises(Exception, match="s3://"):
        write_report(LocalStorage(tmp_path / "local"), iter(records), RunRecord(run_id="r1"), presign_seconds=600)
