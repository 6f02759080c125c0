"""Live prices from /models and the service's own schema, against the sandbox over HTTP."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.main import main
from manifests.service_schema import SchemaUnusable, ServiceSchema, input_schema
from sandbox.server import SandboxProcess, free_port
from sandbox.service import KNOWN_PARAMS
from tests.helpers import image_bytes
from tests.pipeline import V4, V45, Pipeline, run_id_of, write_manifest
from workers.atlas import AtlasClient

URL = "https://cdn.example.com/a.png"
REF = "#/c/I"


def rows(*models: str) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "prompt": f"white marble {i}", "images": [URL], "model": m} for i, m in enumerate(models)]


def closed_api() -> str:
    return f"http://127.0.0.1:{free_port()}/api/v1"


def cli(api_base: str, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env={"ATLASCLOUD_API_BASE": api_base, "SEEDREAM_MODELS_FILE": None})


def test_costs_reservations_and_run_json_follow_the_live_price(pipe: Pipeline) -> None:
    """Predictions carry no price: the run charges the /models price, not the built-in one."""
    pipe.sandbox.configure(prices={V4: 0.020})  # predictions carry no price by default
    (pipe.tmp / "p.png").write_bytes(image_bytes())
    manifest = write_manifest(
        pipe.tmp,
        [{"id": f"r{i}", "prompt": f"white marble {i}", "images": ["p.png"]} for i in range(3)]
        + [{"id": "r3", "prompt": "white marble 3", "images": ["p.png"], "model": V45}],
    )
    pipe.start_workers(1)
    out = pipe.tmp / "out"
    # 3 x 0.020 + 0.036 = 0.096 fits $0.10; at the built-in 0.027 it would not (0.117)
    done = pipe.cli("run", str(manifest), "--output", str(out), "--budget", "0.10", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"price {V4}: $0.02 from /models" in done.stdout and f"price {V45}: $0.036 from /models" in done.stdout
    run_id = run_id_of(done.stdout)
    with (out / run_id / "report.csv").open(encoding="utf-8") as fh:
        report = {r["id"]: r for r in csv.DictReader(fh)}
    costs = {r["id"]: r["cost_usd"] for r in report.values()}
    assert costs == {"r0": "0.02", "r1": "0.02", "r2": "0.02", "r3": "0.036"}
    acc = pipe.sandbox.accounting()
    assert acc["billed_micros"] == 96_000 and acc["counts"]["created"] == 4
    progress = pipe.runs().progress(run_id)
    assert progress.budget_spent == 96_000 == progress.cost_micros
    saved = json.loads((out / run_id / "run.json").read_text())
    assert saved["prices"][V4] == 20_000 and saved["prices"][V45] == 36_000
    assert saved["price_sources"] == {V4: "models-endpoint", V45: "models-endpoint"}
    assert saved["prices_read_at"].endswith("Z")
    assert pipe.runs().meta(run_id).prices[V4] == 20_000  # what the workers read


def test_estimate_shows_the_live_price_and_falls_back_when_models_fails(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, rows(V4, V4, V45))
    sandbox.configure(prices={V4: 0.020})
    live = cli(sandbox.api_base, "estimate", str(manifest))
    assert live.exit_code == 0, live.output
    assert "$0.076" in live.output  # 2 x 0.020 + 0.036
    assert f"price {V4}: $0.02 from /models, read at " in live.output
    assert f"price {V45}: $0.036 from /models" in live.output
    data = json.loads(cli(sandbox.api_base, "estimate", str(manifest), "--json").stdout)
    assert data["total_usd"] == "0.076" and data["prices"][V4]["source"] == "models-endpoint"

    down = cli(closed_api(), "estimate", str(manifest))
    assert down.exit_code == 0, down.output
    assert "$0.09" in down.output  # 2 x 0.027 + 0.036 from the built-in table
    assert f"price {V4}: $0.027 from the built-in table: /models could not be read" in down.output
    assert "note: /models could not be read" in down.stderr


def test_a_models_file_price_wins_over_the_live_one(sandbox: SandboxProcess, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, rows(V4, V45))
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({V4: {"price_usd": "0.05"}}))
    sandbox.configure(prices={V4: 0.020, V45: 0.030})
    out = cli(sandbox.api_base, "estimate", str(manifest), "--models-file", str(models_file), "--json")
    assert out.exit_code == 0, out.output
    prices = json.loads(out.stdout)["prices"]
    assert prices[V4] == {"price_usd": "0.05", "source": "models file"}
    assert prices[V45]["price_usd"] == "0.03" and prices[V45]["source"] == "models-endpoint"
    text = cli(sandbox.api_base, "estimate", str(manifest), "--models-file", str(models_file))
    assert f"price {V4}: $0.05 from the models file" in text.output


def test_a_row_breaking_the_service_schema_is_refused_before_any_submit(pipe: Pipeline) -> None:
    """`style` passes the project's table (the models file allows it) but not the service's schema."""
    models_file = pipe.tmp / "models.json"
    models_file.write_text(json.dumps({V4: {"params": ["seed", "max_images", "watermark", "style"]}}))
    manifest = write_manifest(pipe.tmp, [*rows(V4), {**rows(V4)[0], "id": "r1", "params": {"style": "x"}}])
    bad = f"{manifest.name}:2: params.style: not accepted by the service's schema"

    checked = cli(pipe.sandbox.api_base, "validate", str(manifest), "--models-file", str(models_file))
    assert checked.exit_code == 2 and bad in checked.output
    assert f"checked against the service's schema for {V4}" in checked.output

    ran = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--models-file", str(models_file))
    assert ran.returncode == 2 and bad in ran.stderr and "nothing was enqueued or spent" in ran.stderr
    assert pipe.sandbox.accounting()["submit_calls"] == 0 and pipe.sandbox.accounting()["created"] == 0

    own = cli(closed_api(), "validate", str(manifest), "--models-file", str(models_file))
    assert own.exit_code == 0, own.output  # the project's own table decides, and says so
    assert f"schema unavailable for {V4} (/models could not be read" in own.output
    assert "checked against the built-in rules only" in own.output


def test_the_sandbox_schema_is_what_the_sandbox_accepts(client: AtlasClient) -> None:
    [entry] = [m for m in client.models() if m["model"] == V4]
    schema = input_schema(client.schema(entry["schema"]))
    assert set(schema["properties"]) == KNOWN_PARAMS and schema["required"] == ["prompt", "images"]
    service = ServiceSchema.from_document(V4, client.schema(entry["schema"]))
    assert list(service.problems({"prompt": "p", "images": [URL], "size": "2048*2048", "seed": 1})) == []
    assert dict(service.problems({"prompt": "p", "images": [URL], "seed": "1"})) == {
        "params.seed": "the service's schema says: '1' is not of type 'integer'"
    }
    assert "images[1]" in dict(service.problems({"prompt": "p", "images": ["a.png"]}))


@pytest.mark.parametrize(
    "document",
    [
        {"components": {"schemas": {"Input": {"type": "object", "properties": {"prompt": {"type": "string"}}}}}},
        {
            "paths": {"/x": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": REF}}}}}}},
            "c": {"I": {"type": "object", "properties": {"prompt": {"type": "string"}}}},
        },
        {"type": "object", "properties": {"prompt": {"type": "string"}}},
    ],
    ids=["components-input", "request-body", "plain-json-schema"],
)
def test_the_input_schema_is_found_in_each_shape(document: dict[str, Any]) -> None:
    service = ServiceSchema.from_document(V4, document)
    assert list(service.problems({"prompt": "p"})) == []
    assert dict(service.problems({"prompt": 3, "style": 1})) == {
        "params.style": "not accepted by the service's schema; its parameters are: none",
        "prompt": "the service's schema says: 3 is not of type 'string'",
    }


def test_model_named_as_required_is_filled_and_an_unusable_document_is_said_so() -> None:
    doc = {"components": {"schemas": {"Input": {"required": ["model", "prompt"], "properties": {"prompt": {}}}}}}
    assert list(ServiceSchema.from_document(V4, doc).problems({"prompt": "p"})) == []
    with pytest.raises(SchemaUnusable):
        ServiceSchema.from_document(V4, {"openapi": "3.0.0", "paths": {}})
