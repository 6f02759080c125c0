"""The results index at 1,000, 10,000 and 100,000 entries: what learning its fingerprints costs.

A run learns which edits are already paid for with `ResultsIndex(output).fingerprints()`:
a folder's `_results/` is walked once; in S3 `_results/` is paged in key order until SEQUENTIAL
(10,000) entries, and only then are the shards not reached yet (from the shard of the last key
read to `ff`) listed, 16 at a time. Measured for a local folder and for S3 (moto's server on
this machine), each call in a fresh process: wall time, the requests it sent (in S3: how many
were pages of `_results/` one after another and how many shard listings, and from those the
round trips one after another a real bucket would see, an estimate), the peak RSS it added
(the process's high-water mark reset just before the call), its CPU (the client's own work in
every thread: on a real bucket this stays and moto's share goes) and the size of the set it
returns.
Beside it in the same run: plain paging of `_results/` to the end (one request after another,
the same parsing, no shards) and the per-row way it avoids, one GET per row (`index.get(fp)`),
timed on 1,000 rows of the largest index, one at a time and 16 at a time, and extrapolated to
every row. Each figure is the median of 3 calls (plain paging of the largest index in S3: of
1, see ONE_RUN).

The indexes are written the fastest honest way: files straight to the folder, objects straight
into moto's store through its own `put_object` (what its PUT handler calls; PUTs over HTTP
run at about 200 a second here, 8 minutes for 100,000). Every entry is the bytes
`ResultsIndex.put` writes, checked against one entry put the project's way in each store.
moto's server runs in this process, idle but for serving while a child process measures.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from jobs.results import _LIST_THREADS, FOLDER, Entry, ResultsIndex, _fingerprint_of, entry_key
from jobs.storage import S3Storage, Storage, open_output

SIZES = [int(n) for n in os.environ.get("BENCH_INDEX_SIZES", "1000,10000,100000").split(",")]
SAMPLE = 1000  # rows of the per-row GET baseline
REPS = 3
BUCKET = "bench-index"
PREFIX = "out"
# moto scans and sorts every key under the prefix on each page, so paging 100,000 keys costs
# 100 such scans (about 65 s a call here): once, to keep the bench near 10 minutes
ONE_RUN = {("s3", "list", max(SIZES))}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def fingerprint(i: int) -> str:
    return hashlib.sha256(f"bench-index-{i}".encode()).hexdigest()


def entry(i: int) -> Entry:
    run, job = "20261203-bench", f"sku-{i:07d}"
    return Entry(
        fingerprint=fingerprint(i),
        run_id=run,
        job_id=job,
        prediction_id=f"pred-{i:012x}",
        model="bytedance/seedream-v4/edit",
        outputs=(f"{run}/outputs/{job}/0.png",),
        cost_micros=27000,
        finished_at=1_796_000_000.0 + i,
    )


def entry_bytes(i: int) -> bytes:
    """What `ResultsIndex.put` stores (`put_json`'s encoding), checked by `check_encoding`."""
    return json.dumps(entry(i).to_json(), indent=1, sort_keys=True, default=str).encode()


def check_encoding(storage: Storage, read: Callable[[str], bytes]) -> None:
    ResultsIndex(storage).put(entry(0))
    assert read(entry_key(fingerprint(0))) == entry_bytes(0), "entries differ from what the project writes"


def grow_folder(root: Path, start: int, stop: int) -> None:
    for n in range(256):
        (root / FOLDER / f"{n:02x}").mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        (root / entry_key(fingerprint(i))).write_bytes(entry_bytes(i))


def grow_bucket(backend: Any, start: int, stop: int) -> None:
    for i in range(start, stop):
        backend.put_object(BUCKET, f"{PREFIX}/{entry_key(fingerprint(i))}", entry_bytes(i))


# --- in the child: one call, measured -------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    storage = open_output(spec["output"], endpoint_url=spec.get("endpoint"))
    index = ResultsIndex(storage)
    n, method = int(spec["size"]), spec["method"]
    requests: dict[str, int] = {}
    lists = {"pages": 0, "shards": 0}  # ListObjectsV2 calls: pages of `_results/`, shard listings
    pool_full: list[str] = []
    lock = threading.Lock()
    if isinstance(storage, S3Storage):
        client = storage.client

        def count(event_name: str, **_: Any) -> None:
            with lock:
                op = event_name.rsplit(".", 1)[-1]
                requests[op] = requests.get(op, 0) + 1

        client.meta.events.register("before-send.s3", count)
        root = storage._key(FOLDER) + "/"  # the Prefix of a page of `_results/`

        def which(params: dict[str, Any], **_: Any) -> None:
            with lock:
                lists["pages" if params.get("Prefix") == root else "shards"] += 1

        client.meta.events.register("before-parameter-build.s3.ListObjectsV2", which)

        class PoolFull(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "pool is full" in record.getMessage():
                    pool_full.append(record.getMessage())

        logging.getLogger("urllib3.connectionpool").addHandler(PoolFull())
    list(storage.list("_warm"))  # S3: the client's first request (its model, a connection)
    sample = [fingerprint(i) for i in random.Random(0).sample(range(n), min(SAMPLE, n))]

    def gets(threads: int) -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(e is not None for e in pool.map(index.get, sample))

    calls: dict[str, Callable[[], Any]] = {
        "fingerprints": index.fingerprints,
        # plain paging to the end: the same parsing, no shards
        "list": lambda: {fp for key in storage.list(FOLDER) if (fp := _fingerprint_of(key))},
        "get": lambda: sum(index.get(fp) is not None for fp in sample),
        "get16": lambda: gets(16),
    }
    requests.clear()
    lists.update(pages=0, shards=0)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the RSS now
    rss0 = _status("VmRSS")
    cpu0 = time.process_time()  # every thread of this process: the client's own work
    t0 = time.perf_counter()
    result = calls[method]()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    added = _status("VmHWM") - rss0
    if isinstance(result, set):
        assert len(result) == n, (method, len(result), n)
        held = sys.getsizeof(result) + sum(sys.getsizeof(fp) for fp in result)
        rows = n
    else:
        assert result == len(sample), (method, result)
        held, rows = 0, len(sample)
    return {"seconds": seconds, "cpu": cpu, "rows": rows, "rss_added": added, "held": held, "requests": requests,
            "lists": lists, "pool_full": len(pool_full)}  # fmt: skip


def measure(kind: str, output: str, size: int, method: str, endpoint: str | None) -> dict[str, Any]:
    spec = {"output": output, "size": size, "method": method, "endpoint": endpoint}
    reps = 1 if (kind, method, size) in ONE_RUN else REPS
    runs = []
    for _ in range(reps):
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **AWS_ENV})
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        runs.append(json.loads(done.stdout))
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu", "rss_added", "held", "pool_full")}
    return {**med, "rows": runs[0]["rows"], "requests": runs[0]["requests"], "lists": runs[0]["lists"], "runs": runs}


# --- the bench --------------------------------------------------------------------------------


def index_row(kind: str, size: int, method: str, m: dict[str, Any]) -> dict[str, Any]:
    pages, shards = m["lists"]["pages"], m["lists"]["shards"]
    return {
        "store": kind,
        "entries": f"{size:,}",
        "how": {"fingerprints": "fingerprints()", "list": "plain paging"}[method]
        + (" [1 run]" if (kind, method, size) in ONE_RUN else ""),
        "seconds": m["seconds"],
        "ms_per_1000": 1000 * m["seconds"] / (size / 1000),
        "requests": sum(m["requests"].values()) or None,
        "pages_then_shards": f"{pages} + {shards}" if kind == "s3" else None,
        # an estimate for a real bucket, where a LIST costs one round trip whatever the bucket holds:
        # the pages one after another, then the shard listings in waves of 16 (each shard one page)
        "round_trips_in_sequence_est": pages + -(-shards // _LIST_THREADS) if kind == "s3" else None,
        "client_cpu_s": m["cpu"],
        "peak_rss_added_mb": m["rss_added"] / 2**20,
        "rss_bytes_per_entry": round(m["rss_added"] / size),
        "set_bytes_per_entry": round(m["held"] / size),
        "conns_discarded": m["pool_full"] if kind == "s3" else None,  # urllib3: "connection pool is full"
    }


def bench_store(kind: str, output: str, grow: Callable[[int, int], None], endpoint: str | None) -> dict[str, Any]:
    rows, raw, have = [], {}, 1  # entry 0 is there already (check_encoding)
    for size in SIZES:
        t0 = time.monotonic()
        grow(have, size)
        have = size
        print(f"{kind}: {size:,} entries in {time.monotonic() - t0:.1f} s", flush=True)
        for method in ("fingerprints", "list"):
            m = measure(kind, output, size, method, endpoint)
            raw[f"{method}@{size}"] = m
            rows.append(index_row(kind, size, method, m))
            print(table([rows[-1]]), flush=True)
    big = max(SIZES)
    per_row = []
    for method, label in (("get", "one GET per row, one at a time"), ("get16", "one GET per row, 16 at a time")):
        m = measure(kind, output, big, method, endpoint)
        raw[f"{method}@{big}"] = m
        per_row.append(
            {
                "store": kind,
                "how": label,
                "rows_timed": m["rows"],
                "seconds": m["seconds"],
                "ms_per_1000": 1000 * m["seconds"] / (m["rows"] / 1000),
                "client_cpu_s": m["cpu"],
                f"seconds_per_{big}_extrapolated": m["seconds"] * big / m["rows"],
                f"requests_per_{big}": big,
            }
        )
    fp = {s: raw[f"fingerprints@{s}"]["seconds"] for s in SIZES}
    rss = {s: raw[f"fingerprints@{s}"]["rss_added"] for s in SIZES}
    lo, hi = SIZES[-2:] if len(SIZES) > 1 else (0, big)
    ratios = {
        "store": kind,
        f"get_1_at_a_time_vs_fingerprints_{big}": per_row[0][f"seconds_per_{big}_extrapolated"] / fp[big],
        f"get_16_at_a_time_vs_fingerprints_{big}": per_row[1][f"seconds_per_{big}_extrapolated"] / fp[big],
        **{f"fingerprints_vs_plain_{s}": fp[s] / raw[f"list@{s}"]["seconds"] for s in SIZES},
        **{f"time_{b}_vs_{a}": fp[b] / fp[a] for a, b in itertools.pairwise(SIZES)},
        # what each entry beyond the second-largest index adds: the slope, without the fixed part
        f"marginal_ms_per_1000_{lo}_to_{hi}": 1000 * (fp[hi] - fp.get(lo, 0.0)) / ((hi - lo) / 1000),
        f"marginal_rss_bytes_per_entry_{lo}_to_{hi}": (rss[hi] - rss.get(lo, 0)) / (hi - lo),
    }
    return {"index": rows, "per_row": per_row, "ratios": ratios, "raw": raw}


def main() -> None:
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from sandbox.server import free_port

    os.environ.update(AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    t_all = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        local = open_output(str(folder))
        check_encoding(local, lambda key: (folder / key).read_bytes())
        results["folder"] = bench_store("folder", str(folder), lambda a, b: grow_folder(folder, a, b), None)

    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        output = f"s3://{BUCKET}/{PREFIX}"
        s3 = open_output(output, endpoint_url=endpoint)
        check_encoding(s3, lambda key: bytes(s3.get_bytes(key) or b""))
        results["s3"] = bench_store("s3", output, lambda a, b: grow_bucket(backend, a, b), endpoint)
    finally:
        server.stop()

    print()
    print(table(results["folder"]["index"] + results["s3"]["index"]))
    print(table(results["folder"]["per_row"] + results["s3"]["per_row"]))
    for kind in ("folder", "s3"):
        print(table([results[kind]["ratios"]]))
    print(f"whole bench: {time.monotonic() - t_all:.0f} s")
    print(write_result("index", {"sizes": SIZES, "sample": SAMPLE, "reps": REPS, **results}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main()
