"""How many polls per second the sandbox answers on one core, with zero delay.

The sandbox runs pinned to CPU 0; the load comes from a separate process pinned
to CPU 1 (raw HTTP/1.1 over asyncio, keep-alive), so the figure is the
sandbox's, bounded below by what one client core can send.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from sandbox.server import SandboxProcess

KEY = {"Authorization": "Bearer bench-key", "User-Agent": "seedream-batch-bench"}
DURATION = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = 32


async def _connection(host: str, port: int, paths: list[str], stop: float) -> tuple[int, int]:
    """One keep-alive connection sending GETs back to back; raw HTTP/1.1 keeps the client cheap."""
    reader, writer = await asyncio.open_connection(host, port)
    done = errors = 0
    n = 0
    while time.monotonic() < stop:
        path = paths[n % len(paths)]
        n += 1
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {KEY['Authorization']}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        if head.startswith(b"HTTP/1.1 200"):
            done += 1
        else:
            errors += 1
    writer.close()
    return done, errors


async def _hammer(api: str, ids: list[str], duration: float) -> tuple[int, int, float]:
    parts = httpx.URL(api)
    paths = [f"{parts.path}/model/prediction/{i}" for i in ids]
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(_connection(parts.host, parts.port or 80, paths[i:] + paths[:i], t0 + duration) for i in range(CONCURRENCY))
    )
    return sum(r[0] for r in results), sum(r[1] for r in results), time.monotonic() - t0


def _client(api: str, ids: list[str], duration: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    out.put(asyncio.run(_hammer(api, ids, duration)))


def main() -> None:
    with SandboxProcess(settings={"delay": "fixed:0"}) as sb:
        assert sb.proc is not None
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(sb.proc.pid, {0})
        with httpx.Client(headers=KEY, timeout=10) as c:
            png = Path(__file__).resolve().parents[1] / "bench" / "tiny.png"
            if not png.exists():
                from PIL import Image

                Image.new("RGB", (32, 32), (1, 2, 3)).save(png)
            url = c.post(
                f"{sb.api_base}/model/uploadMedia", files={"file": ("t.png", png.read_bytes(), "image/png")}
            ).json()["data"]["download_url"]
            ids = [
                c.post(
                    f"{sb.api_base}/model/generateImage",
                    json={"model": "bytedance/seedream-v4/edit", "prompt": f"p{i}", "images": [url]},
                ).json()["data"]["id"]
                for i in range(50)
            ]
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        cpu0 = _cpu_seconds(sb.proc.pid)
        p = mp.Process(target=_client, args=(sb.api_base, ids, DURATION, q))
        p.start()
        done, errors, wall = q.get(timeout=DURATION + 60)
        p.join(timeout=30)
        cpu = _cpu_seconds(sb.proc.pid) - cpu0
    rows = [
        {
            "polls": done,
            "errors": errors,
            "seconds": round(wall, 2),
            "polls_per_s": done / wall,
            "sandbox_cpu_s": round(cpu, 2),
            "polls_per_cpu_s": done / cpu if cpu else 0.0,
        }
    ]
    print(table(rows))
    print(write_result("sandbox", {"duration_s": DURATION, "concurrency": CONCURRENCY, "rows": rows}))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
