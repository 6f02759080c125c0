"""`doctor`: every check a first real run needs, without spending; each failure on its own line."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3

from sandbox.server import free_port
from tests.helpers import image_bytes
from tests.pipeline import Pipeline, write_manifest

CHECKS = {"redis", "broker", "clock", "output", "manifest", "api-key", "user-agent", "balance"}


def _manifest(tmp: Path, model: str = "bytedance/seedream-v4/edit", rows: int = 2) -> Path:
    (tmp / "a.png").write_bytes(image_bytes())
    return write_manifest(tmp, [{"id": f"r{i}", "prompt": "white marble", "images": ["a.png"], "model": model}
                                for i in range(rows)])  # fmt: skip


def _doctor(pipe: Pipeline, *args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    done = pipe.cli("doctor", *args, "--json")
    report = json.loads(done.stdout)
    return done.returncode, {c["name"]: c for c in report["checks"]}, report["verdict"]


def _failed(checks: dict[str, dict[str, str]]) -> set[str]:
    return {name for name, c in checks.items() if c["status"] == "FAIL"}


def test_doctor_passes_against_the_sandbox_and_spends_nothing(pipe: Pipeline) -> None:
    manifest = _manifest(pipe.tmp)
    done = pipe.cli("doctor", str(manifest), "--output", str(pipe.tmp / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in CHECKS | {"model bytedance/seedream-v4/edit"}:
        assert any(line.startswith("ok") and f"  {name}  " in line for line in lines), (name, done.stdout)
    assert "live price $0.027" in done.stdout and "its schema answers" in done.stdout
    assert lines[-1] == "ready for a first real run"
    assert list((pipe.tmp / "out").iterdir()) == []  # the probe object was deleted
    code, checks, _ = _doctor(pipe, str(manifest), "--output", str(pipe.tmp / "out"))
    assert code == 0 and set(checks) >= CHECKS and not _failed(checks)
    assert pipe.sandbox.accounting()["submit_calls"] == 0


def test_doctor_fails_when_redis_does_not_answer(pipe: Pipeline) -> None:
    pipe.extra_env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    code, checks, verdict = _doctor(pipe, str(_manifest(pipe.tmp)))
    assert code == 4 and {"redis", "broker"} <= _failed(checks) and verdict.startswith("not ready")
    assert "does not answer" in checks["redis"]["detail"] and checks["clock"]["status"] == "skip"


def test_doctor_fails_on_an_output_it_cannot_write(pipe: Pipeline, s3_endpoint: str) -> None:
    (pipe.tmp / "a-file").write_text("not a folder")
    code, checks, _ = _doctor(pipe, "--output", str(pipe.tmp / "a-file" / "out"))
    assert code == 4 and _failed(checks) == {"output"}, checks
    assert "cannot write" in checks["output"]["detail"]
    pipe.s3_endpoint = s3_endpoint
    code, checks, _ = _doctor(pipe, "--output", f"s3://no-such-bucket-{pipe.prefix.lower()}/runs")
    assert code == 4 and _failed(checks) == {"output"} and "NoSuchBucket" in checks["output"]["detail"]
    bucket = f"b-{pipe.prefix.lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    code, checks, _ = _doctor(pipe, "--output", f"s3://{bucket}/runs")
    assert code == 0 and checks["output"]["status"] == "ok"
    assert "Contents" not in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)


def test_doctor_fails_on_a_refused_key(pipe: Pipeline) -> None:
    pipe.sandbox.configure(api_keys=["sk-another-key-0000000000"])
    code, checks, _ = _doctor(pipe, str(_manifest(pipe.tmp)))
    assert code == 4 and _failed(checks) == {"api-key"}, checks
    assert "refused" in checks["api-key"]["detail"] and checks["balance"]["status"] == "skip"


def test_doctor_fails_on_a_model_the_service_does_not_list(pipe: Pipeline) -> None:
    models = pipe.tmp / "models.json"
    models.write_text(json.dumps({"acme/edit-x": {"price_usd": "0.01", "min_pixels": 1}}))
    pipe.extra_env["SEEDREAM_MODELS_FILE"] = str(models)
    code, checks, _ = _doctor(pipe, str(_manifest(pipe.tmp, model="acme/edit-x")))
    assert code == 4 and _failed(checks) == {"model acme/edit-x"}, checks
    assert "not listed" in checks["model acme/edit-x"]["detail"]


def test_doctor_fails_when_the_balance_is_below_the_estimate(pipe: Pipeline) -> None:
    pipe.sandbox.configure(balance_usd=0.05)
    code, checks, _ = _doctor(pipe, str(_manifest(pipe.tmp, rows=2)))  # 2 x $0.027
    assert code == 4 and _failed(checks) == {"balance"}, checks
    assert "$0.05 available, less than the manifest's $0.054" in checks["balance"]["detail"]


class _Cloudflare(http.server.BaseHTTPRequestHandler):
    """What Cloudflare answers a User-Agent it refuses: 403 and a bare text body."""

    def do_GET(self) -> None:
        body = b"error code: 1010"
        self.send_response(403)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _refusing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Cloudflare)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_doctor_names_the_user_agent_setting_when_cloudflare_refuses(pipe: Pipeline) -> None:
    with _refusing_server() as base:
        pipe.extra_env["ATLASCLOUD_API_BASE"] = base
        code, checks, _ = _doctor(pipe)
    assert code == 4 and _failed(checks) == {"user-agent"}, checks
    assert "error code 1010" in checks["user-agent"]["detail"]
    assert "SEEDREAM_USER_AGENT" in checks["user-agent"]["detail"]
    assert checks["api-key"]["status"] == "skip" and checks["models"]["status"] == "skip"
