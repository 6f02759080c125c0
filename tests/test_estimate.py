"""Estimates against totals computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cli.main import main
from jobs.estimate import estimate
from manifests.models import ModelTable, micros_to_usd, usd_to_micros
from manifests.validate import Validator
from sandbox.server import free_port

V4, V45 = "bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"


def manifest(tmp_path: Path, models: list[str]) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"j{i}", "prompt": "p", "images": ["https://cdn.example.com/a.png"], "model": m}) + "\n"
            for i, m in enumerate(models)
        )
    )
    return path


def test_mixed_models_total_exact(tmp_path: Path) -> None:
    path = manifest(tmp_path, [V4] * 7 + [V45] * 5)
    table = ModelTable.load()
    est = estimate(Validator(path, table).jobs(), table)
    # by hand: 7 x 0.027 = 0.189; 5 x 0.036 = 0.180; total 0.369
    assert est.by_model[V4] == {"jobs": 7, "price_micros": 27_000, "cost_micros": 189_000}
    assert est.by_model[V45] == {"jobs": 5, "price_micros": 36_000, "cost_micros": 180_000}
    assert est.total_micros == 369_000 and micros_to_usd(est.total_micros) == "0.369"


def test_budget_fit_follows_manifest_order(tmp_path: Path) -> None:
    path = manifest(tmp_path, [V45, V45, V4, V45, V4])
    table = ModelTable.load()
    est = estimate(Validator(path, table).jobs(), table, budget_micros=usd_to_micros("0.10"))
    # by hand: .036, .072, .099 fit; .135 and .126 would pass $0.10
    assert (est.fit_jobs, est.fit_micros) == (3, 99_000)


def test_large_batch_sums_without_float_drift(tmp_path: Path) -> None:
    table = ModelTable.load()
    path = manifest(tmp_path, [V4] * 3333 + [V45] * 1111)
    est = estimate(Validator(path, table).jobs(), table, budget_micros=usd_to_micros("100"), rate=2.5)
    # by hand: 3333 x 0.027 = 89.991; 1111 x 0.036 = 39.996; total 129.987
    assert micros_to_usd(est.total_micros) == "129.987"
    assert est.fit_jobs == 3333 + 278  # 100 - 89.991 = 10.009 -> 278 x 0.036 = 10.008
    assert est.min_seconds == 4444 / 2.5


def test_estimate_command_text_and_json(tmp_path: Path) -> None:
    path = manifest(tmp_path, [V4] * 9 + [V45] * 3)
    runner = CliRunner(env={"ATLASCLOUD_API_BASE": f"http://127.0.0.1:{free_port()}/api/v1"})  # built-in prices
    text = runner.invoke(main, ["estimate", str(path), "--budget", "0.30", "--rate", "2"])
    assert text.exit_code == 0, text.output
    assert (
        "$0.351" in text.output and "10 of 12 jobs fit ($0.279)" in text.output
    )  # .243 + .036 and "6.0s" in text.output
    out = runner.invoke(main, ["estimate", str(path), "--budget", "$1", "--rate", "4", "--json"])
    data = json.loads(out.stdout)
    assert data["total_usd"] == "0.351" and data["jobs_within_budget"] == 12 and data["min_seconds"] == 3.0
    assert data["by_model"][V45] == {
        "jobs": 3,
        "price_micros": 36_000,
        "cost_micros": 108_000,
        "price_usd": "0.036",
        "cost_usd": "0.108",
    }


def test_money_text() -> None:
    assert micros_to_usd(12_000_000) == "12.00" and micros_to_usd(81_000) == "0.081"
    assert usd_to_micros("$0.027") == 27_000 and usd_to_micros(0.1) == 100_000
