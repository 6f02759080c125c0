"""`run --no-wait` on 100,000 rows: validate, create a record per row, queue every job.

Baseline in the same run: `validate` on the same manifest (the floor: reading and
checking every row). Also: Redis memory per enqueued job (its record, and a task message for
the jobs in the run's admission window or a backlog entry for the rest). The run must hold a
record for every row and every row must be queued, as a message or in the backlog.
Everything is written under a prefix and queue of its own, deleted afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_validate import make_manifest, run
from bench.common import table, write_result
from sandbox.server import SandboxProcess

ROWS = int(os.environ.get("BENCH_ROWS", "100000"))
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
EXE = str(Path(sys.executable).with_name("seedream-batch"))


def main() -> None:
    prefix = f"bench-enq-{int(time.time())}"
    r = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        manifest = Path(tmp) / "big.csv"
        make_manifest(manifest, ROWS)
        os.environ.update(
            {
                "REDIS_URL": REDIS_URL,
                "SEEDREAM_PREFIX": prefix,
                "SEEDREAM_QUEUE": prefix,
                "ATLASCLOUD_API_KEY": "bench",
                "ATLASCLOUD_API_BASE": sb.api_base,
            }
        )
        floor = run([EXE, "validate", str(manifest)])
        before = int(r.info("memory")["used_memory"])
        enq = run([EXE, "run", str(manifest), "--output", str(Path(tmp) / "out"), "--no-wait"])
        after = int(r.info("memory")["used_memory"])
        messages = r.llen(prefix)  # the run's admission window; the rest wait in its backlog
        backlog = sum(r.llen(k) for k in r.scan_iter(f"{prefix}:run:*:backlog"))
        records = sum(1 for _ in r.scan_iter(f"{prefix}:job:*", count=5000))
        for key in r.scan_iter(f"{prefix}*", count=5000):
            r.delete(key)
    assert enq[2] == 0 and records == ROWS and messages + backlog == ROWS, (enq, records, messages, backlog)
    rows = [
        {"what": f"validate {ROWS:,} rows (floor)", "seconds": floor[0], "peak_rss_mb": floor[1]},
        {"what": f"run --no-wait {ROWS:,} rows", "seconds": enq[0], "peak_rss_mb": enq[1]},
    ]
    ratios = {
        "enqueue_vs_validate_time": enq[0] / floor[0],
        "rows_per_second": ROWS / enq[0],
        "redis_bytes_per_queued_job": (after - before) / ROWS,
        "task_messages": messages,
    }
    print(table(rows))
    print(table([ratios]))
    print(write_result("enqueue", {"rows": ROWS, "runs": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
