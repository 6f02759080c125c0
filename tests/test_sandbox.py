"""The sandbox itself: the API's shape, limits and the accounting tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from sandbox.server import SandboxProcess, free_port
from sandbox.settings import SandboxSettings, draw_delay
from tests.conftest import API_KEY
from tests.helpers import image_bytes, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_models_need_no_auth_and_list_both_edit_models(sandbox: SandboxProcess) -> None:
    r = httpx.get(f"{sandbox.api_base}/models", timeout=5)
    assert r.status_code == 200
    ids = {m["model"] for m in r.json()["data"]}
    assert ids == {"bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"}


@pytest.mark.parametrize("path", ["/model/prediction/x", "/model/history"])
def test_api_needs_a_bearer_key(sandbox: SandboxProcess, path: str) -> None:
    assert httpx.get(f"{sandbox.api_base}{path}", timeout=5).status_code == 401


def test_admin_refuses_unknown_settings_and_faults(sandbox: SandboxProcess) -> None:
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"faults": {"nope": 1}}, timeout=5).status_code == 400
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"wat": 1}, timeout=5).status_code == 400
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"delay": "gauss:1"}, timeout=5).status_code == 400


def test_nested_input_shape_is_accepted_by_the_service(sandbox: SandboxProcess) -> None:
    up = httpx.post(
        f"{sandbox.api_base}/model/uploadMedia",
        headers=AUTH,
        timeout=5,
        files={"file": ("a.png", image_bytes(), "image/png")},
    ).json()["data"]["download_url"]
    r = httpx.post(
        f"{sandbox.api_base}/model/generateImage",
        headers=AUTH,
        timeout=5,
        json={"model": "bytedance/seedream-v4/edit", "input": {"prompt": "p", "images": [up]}},
    )
    assert r.status_code == 200 and r.json()["data"]["id"]


def test_prediction_stays_in_progress_for_its_delay(sandbox: SandboxProcess) -> None:
    sandbox.configure(delay="fixed:0.6")
    up = httpx.post(
        f"{sandbox.api_base}/model/uploadMedia",
        headers=AUTH,
        timeout=5,
        files={"file": ("a.png", image_bytes(), "image/png")},
    ).json()["data"]["download_url"]
    pid = httpx.post(
        f"{sandbox.api_base}/model/generateImage",
        headers=AUTH,
        timeout=5,
        json={"model": "bytedance/seedream-v4/edit", "prompt": "p", "images": [up]},
    ).json()["data"]["id"]
    first = httpx.get(f"{sandbox.api_base}/model/prediction/{pid}", headers=AUTH, timeout=5).json()["data"]
    assert first["status"] in {"created", "queued", "starting", "processing"} and first["outputs"] == []
    wait_for(
        lambda: (
            httpx.get(f"{sandbox.api_base}/model/prediction/{pid}", headers=AUTH, timeout=5).json()["data"]["status"]
            == "completed"
        ),
        what="completion",
    )
    assert sandbox.accounting()["peak_in_flight"] == 1


def test_upload_over_the_limit_is_refused(sandbox: SandboxProcess) -> None:
    sandbox.configure(max_upload_bytes=1000)
    r = httpx.post(
        f"{sandbox.api_base}/model/uploadMedia",
        headers=AUTH,
        timeout=5,
        files={"file": ("big.png", b"x" * 5000, "image/png")},
    )
    assert r.status_code in (400, 413)


def test_lognormal_delay_is_centred_on_its_median() -> None:
    import random
    import statistics

    rng = random.Random(1)
    draws = [draw_delay("lognormal:8:0.4", rng) for _ in range(4000)]
    assert 7.5 < statistics.median(draws) < 8.5


def test_settings_reject_out_of_range_rates() -> None:
    with pytest.raises(ValueError):
        SandboxSettings().update({"faults": {"failed": 1.5}})


def test_console_script_starts_the_sandbox() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "seedream-batch")
    assert os.path.exists(exe), "the console script is installed with the project"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "sandbox", "--port", str(port), "--delay", "fixed:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/v1/models"), what="sandbox to answer")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_process_helper_reports_a_dead_sandbox() -> None:
    sb = SandboxProcess(settings={"delay": "bogus"})
    with pytest.raises(RuntimeError):
        sb.start(timeout=10)
