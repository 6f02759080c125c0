"""`make demo`: a real batch, end to end, against the local sandbox.

Starts the sandbox (predictions take about a second, a few faults injected so the
run shows its retries), then runs the example catalog with two local worker
processes into demo-output/, and prints where the outputs, the report and the gallery are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandbox.server import SandboxProcess  # noqa: E402

OUT = ROOT / "demo-output"


def main() -> int:
    settings = {
        "delay": "lognormal:1.0:0.3",
        "seed": 7,
        "fault_retry_after": 1,
        "faults": {"output_truncated": 0.2, "bare_shape": 0.2, "succeeded_spelling": 0.3},
    }
    with SandboxProcess(settings=settings) as sb:
        print(f"sandbox answering at {sb.api_base}")
        env = dict(os.environ)
        env.update(
            {
                "ATLASCLOUD_API_KEY": env.get("ATLASCLOUD_API_KEY") or "demo-key",
                "ATLASCLOUD_API_BASE": sb.api_base,
                "SEEDREAM_PREFIX": "seedream-demo",
                "SEEDREAM_QUEUE": f"seedream-demo-{int(time.time())}",
                "SEEDREAM_SUBMIT_RATE": "4",
            }
        )
        cmd = [
            str(Path(sys.executable).with_name("seedream-batch")),
            "run",
            str(ROOT / "manifests" / "examples" / "catalog.csv"),
            "--output",
            str(OUT),
            "--workers",
            "2",
            "--concurrency",
            "4",
            "--budget",
            "1.00",
            "--wait",
        ]
        print(
            "$ seedream-batch run manifests/examples/catalog.csv --output demo-output --workers 2 --budget 1.00 --wait"
        )
        code = subprocess.call(cmd, env=env, cwd=ROOT)
        acc = sb.accounting()
    runs = sorted(p for p in OUT.iterdir() if (p / "run.json").exists()) if OUT.exists() else []
    if runs:
        latest = max(runs, key=lambda p: p.stat().st_mtime)
        print(f"outputs: {latest / 'outputs'}")
        print(f"summary: {latest / 'summary.json'}")
    print(
        f"the sandbox billed ${acc['billed_usd']} for {acc['billed_count']} predictions; "
        f"duplicate submissions: {len(acc['duplicate_fingerprints'])}"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
