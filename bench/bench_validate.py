"""`validate` on 100,000 rows (URL inputs): time and peak memory, against plain baselines.

Baselines in the same run: a process that only reads the CSV with the csv module
(the floor for any validator), and `validate` on 10,000 rows (memory must not grow
with the manifest: the reader streams).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result

ROWS = int(os.environ.get("BENCH_ROWS", "100000"))
EXE = str(Path(sys.executable).with_name("seedream-batch"))


def make_manifest(path: Path, rows: int) -> None:
    with path.open("w") as fh:
        fh.write("id,prompt,images,model,size,sku\n")
        for i in range(rows):
            model = "bytedance/seedream-v4.5/edit" if i % 3 == 0 else "bytedance/seedream-v4/edit"
            size = "2048*2048" if i % 3 == 0 else "1024*1024"
            fh.write(
                f"sku-{i:07d},same product on white marble soft daylight {i},"
                f"https://cdn.example.com/p/{i}.jpg|https://cdn.example.com/bg.png,{model},{size},S{i}\n"
            )


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one child process."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.execv(cmd[0], cmd)  # noqa: S606
    _, status, usage = os.wait4(pid, 0)
    return time.monotonic() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.csv", Path(tmp) / "small.csv"
        make_manifest(big, ROWS)
        make_manifest(small, ROWS // 10)
        floor = [sys.executable, "-c", f"import csv\nfor _ in csv.reader(open({str(big)!r})): pass"]
        rows = []
        for label, cmd in [
            ("csv.reader only (floor)", floor),
            (f"validate {ROWS // 10:,} rows", [EXE, "validate", str(small)]),
            (f"validate {ROWS:,} rows", [EXE, "validate", str(big)]),
        ]:
            best = min((run(cmd) for _ in range(3)), key=lambda r: r[0])
            assert best[2] == 0, f"{label} exited {best[2]}"
            rows.append({"what": label, "seconds": best[0], "peak_rss_mb": best[1]})
    floor_s, small_mb, big_mb = rows[0]["seconds"], rows[1]["peak_rss_mb"], rows[2]["peak_rss_mb"]
    ratios = {
        "validate_vs_floor_time": rows[2]["seconds"] / floor_s,
        "memory_100k_vs_10k": big_mb / small_mb,
        "rows_per_second": ROWS / rows[2]["seconds"],
    }
    print(table(rows))
    print(table([ratios]))
    print(write_result("validate", {"rows": ROWS, "runs": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
