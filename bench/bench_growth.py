"""Worker memory over a long run: the summed RSS of 2 worker processes (8 threads each) sampled
as a run of BENCH_GROWTH_JOBS (20,000) jobs goes by (zero prediction time, no limits, 500
distinct photos).

The figures: RSS after 1,000 jobs against after 20,000, and the growth per job over the second
half of the run, once caches, connection pools and the allocator's arenas are warm. A leak of
even 1 KB per job would show as about 10 MB over that half.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from bench.harness import Project, make_manifest
from sandbox.server import SandboxProcess

JOBS = int(os.environ.get("BENCH_GROWTH_JOBS", "20000"))
POINTS = sorted({min(1000, JOBS // 4), JOBS // 4, JOBS // 2, 3 * JOBS // 4, JOBS})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        manifest = make_manifest(Path(tmp), JOBS, distinct_images=500)
        with Project(sb, workers=2, concurrency=8) as project:
            sb.reset()
            got = project.run(manifest, Path(tmp) / "out", sample_rss_at=tuple(POINTS))
    rss = got["rss_mb_at"]
    half, end, first = POINTS[-3], POINTS[-1], POINTS[0]
    rows = [{"after_jobs": n, "rss_mb": rss[n]} for n in POINTS]
    summary = {
        "jobs": got["jobs"],
        "succeeded": got["counts"].get("succeeded", 0),
        "wall_s": got["seconds"],
        "jobs_per_s": got["jobs"] / got["seconds"],
        f"rss_mb_{first}": rss[first],
        f"rss_mb_{end}": rss[end],
        "end_over_start": rss[end] / rss[first],
        "kb_per_job_second_half": (rss[end] - rss[half]) * 1024 / (end - half),
    }
    print(f"RSS of 2 worker processes (sum) during one run of {JOBS} jobs")
    print(table(rows))
    print(table([summary]))
    write_result("growth", {"jobs": JOBS, "samples": rows, "summary": summary})


if __name__ == "__main__":
    main()
