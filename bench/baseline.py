"""The script a competent user would write without this project, kept as a yardstick.

One asyncio process with httpx: a semaphore for concurrency, a plain requests-per-second
throttle on submits, and for each row upload -> submit -> poll every 3 s -> download ->
write the outputs to a folder. A 429 is waited out (Retry-After) and the submit sent
again. No durability, no budget, no dedup: just the job.

    python bench/baseline.py MANIFEST.jsonl OUT_DIR --api-base URL --rate 20 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import time
from pathlib import Path
from typing import Any

import httpx


class Throttle:
    """At most `rate` calls per second, spaced evenly."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            self.next = max(self.next + self.interval, now)
            delay = self.next - now
        if delay > 0:
            await asyncio.sleep(delay)


async def one(
    http: httpx.AsyncClient, row: dict[str, Any], base: Path, out: Path, args: argparse.Namespace, stats: dict[str, int]
) -> None:
    urls = []
    for image in row["images"]:
        path = base / image
        files = {"file": (path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png")}
        r = await http.post("/model/uploadMedia", files=files)
        r.raise_for_status()
        urls.append(r.json()["data"]["download_url"])
    body = {"model": row.get("model", "bytedance/seedream-v4/edit"), "prompt": row["prompt"], "images": urls}
    while True:
        await args.throttle.wait()
        r = await http.post("/model/generateImage", json=body)
        if r.status_code == 429:
            stats["http_429"] += 1
            await asyncio.sleep(float(r.headers.get("retry-after") or 1))
            continue
        r.raise_for_status()
        break
    pid = r.json()["data"]["id"]
    while True:
        await asyncio.sleep(args.poll_interval)
        stats["polls"] += 1
        r = await http.get(f"/model/prediction/{pid}")
        r.raise_for_status()
        data = r.json().get("data", r.json())
        status = str(data.get("status", "")).lower()
        if status in ("completed", "succeeded", "success"):  # the service's words for done, as documented
            break
        if status in ("failed", "error", "canceled", "cancelled", "timeout"):
            stats["failed"] += 1
            return
    for i, url in enumerate(data.get("outputs") or []):
        got = await http.get(url)
        got.raise_for_status()
        (out / f"{row['id']}_{i}.jpeg").write_bytes(got.content)
    stats["done"] += 1


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows = [json.loads(line) for line in Path(args.manifest).read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.throttle = Throttle(args.rate)
    stats = {"done": 0, "failed": 0, "polls": 0, "http_429": 0}
    sem = asyncio.Semaphore(args.concurrency)
    headers = {
        "Authorization": f"Bearer {os.environ.get('ATLASCLOUD_API_KEY', 'bench')}",
        "User-Agent": "seedream-baseline",
    }
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.api_base, headers=headers, timeout=30, limits=limits) as http:

        async def guarded(row: dict[str, Any]) -> None:
            async with sem:
                await one(http, row, Path(args.manifest).parent, out, args, stats)

        started = time.monotonic()
        await asyncio.gather(*(guarded(r) for r in rows))
    return {**stats, "jobs": len(rows), "seconds": time.monotonic() - started}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--api-base", required=True)
    p.add_argument("--rate", type=float, default=2.0, help="submits per second (0: no throttle)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--poll-interval", type=float, default=3.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))))
