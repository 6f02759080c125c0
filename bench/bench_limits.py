"""Rate-limit utilisation: the sandbox enforces R submits/s; how much of R does each approach get?

- project: 4 processes sharing the Redis bucket (rate R, burst 1)
- per-process throttle: 4 processes each throttled to R on their own (what Celery's
  per-worker `rate_limit` gives you): offered 4R, so the service answers 429s
- single process: one process with a local throttle at R (no sharing needed)

Achieved rate is measured over the steady part (the middle 80% of the run), from the
times of accepted submits; the 429 count and peak 1 s window come from the sandbox.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from jobs.config import Limits
from jobs.redisio import connect
from sandbox.server import SandboxProcess
from workers.ratelimit import RateLimiter

RATE = float(os.environ.get("BENCH_RATE", "20"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
V4 = "bytedance/seedream-v4/edit"


def loop(mode: str, api: str, image: str, prefix: str, name: str, start_at: float, out: Any) -> None:
    limiter = RateLimiter(connect(REDIS_URL), "bench", Limits(submit_rate=RATE, submit_burst=1), prefix=prefix)
    accepted: list[float] = []
    rejected = 0
    next_local = start_at
    with httpx.Client(
        headers={"Authorization": "Bearer bench", "User-Agent": "seedream-batch-bench"}, timeout=10
    ) as http:
        time.sleep(max(0.0, start_at - time.time()))
        stop = start_at + SECONDS
        n = 0
        while time.time() < stop:
            if mode == "project":
                grant = limiter.acquire("submit")
                time.sleep(grant.wait)
                if not grant.go:
                    continue
            else:  # a local throttle at RATE in this process only
                next_local = max(next_local + 1.0 / RATE, time.time())
                time.sleep(max(0.0, next_local - time.time()))
            n += 1
            r = http.post(f"{api}/model/generateImage", json={"model": V4, "prompt": f"{name}-{n}", "images": [image]})
            if r.status_code == 429:
                rejected += 1
            else:
                accepted.append(time.time())
    out.put((accepted, rejected))


def run(mode: str, processes: int, sb: SandboxProcess, image: str) -> dict[str, Any]:
    sb.admin("POST", "reset", {"settings": {"submit_rate": RATE, "delay": "lognormal:2:0.4"}})
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # every process starts its loop at the same moment
    prefix = f"bench{os.getpid()}{mode.replace(' ', '')}{time.time_ns()}"
    procs = [
        ctx.Process(target=loop, args=(mode, sb.api_base, image, prefix, f"{mode}{i}", start_at, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(10)
    times = sorted(t for r in results for t in r[0])
    lo, hi = start_at + 0.1 * SECONDS, start_at + 0.9 * SECONDS
    steady = sum(1 for t in times if lo <= t < hi) / (hi - lo)
    acc = sb.accounting()
    return {
        "approach": mode,
        "processes": processes,
        "accepted": len(times),
        "steady_rate": steady,
        "utilisation": steady / RATE,
        "http_429": acc["http_429"],
        "peak_1s_window": acc["peak_submit_rate"],
    }


def main() -> None:
    with SandboxProcess(settings={"submit_rate": RATE}) as sb:
        png = _png()
        with httpx.Client(
            headers={"Authorization": "Bearer bench", "User-Agent": "seedream-batch-bench"}, timeout=10
        ) as c:
            image = c.post(f"{sb.api_base}/model/uploadMedia", files={"file": ("p.png", png, "image/png")}).json()[
                "data"
            ]["download_url"]
        rows = [
            run("project", 4, sb, image),
            run("per-process throttle", 4, sb, image),
            run("single process", 1, sb, image),
        ]
    print(f"sandbox limit R = {RATE:g} submits/s, {SECONDS:g} s per approach")
    print(table(rows))
    print(write_result("limits", {"rate": RATE, "seconds": SECONDS, "rows": rows}))


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
