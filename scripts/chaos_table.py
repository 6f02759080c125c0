"""Print the figures of the last `make chaos` (bench/results/chaos.jsonl) as a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

path = Path(__file__).resolve().parents[1] / "bench" / "results" / "chaos.jsonl"
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
print(
    "| scenario | jobs | final statuses | faults injected | kills | duplicates | lost | cost drift (USD) "
    "| uncertain never sent | prediction ids unrecorded |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items())) or "refused before any spend"
    print(
        f"| {r['scenario']} | {r['jobs']} | {statuses} | {r['faults_injected']} | {r['kills']} | "
        f"{r['duplicates']} | {r['lost']} | {r['cost_drift_micros'] / 1e6:.3f} | "
        f"{r['extra'].get('uncertain_never_sent', '-')} | {r['extra'].get('predictions_unrecorded', '-')} |"
    )
