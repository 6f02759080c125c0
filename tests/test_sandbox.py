"""The sandbox itself: the API's shape, limits and the accounting tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from sandbox.server import SandboxProcess, free_port
from sandbox.settings import FAILED, RUNNING, SUCCEEDED, SandboxSettings, draw_delay
from tests.conftest import API_KEY
from tests.helpers import image_bytes, wait_for

UA = {"User-Agent": "seedream-batch-tests/1"}  # the CDN in front of the service refuses a library's default
AUTH = {"Authorization": f"Bearer {API_KEY}", **UA}
V4 = "bytedance/seedream-v4/edit"


def _upload(sandbox: SandboxProcess) -> str:
    return str(
        httpx.post(
            f"{sandbox.api_base}/model/uploadMedia",
            headers=AUTH,
            timeout=5,
            files={"file": ("a.png", image_bytes(), "image/png")},
        ).json()["data"]["download_url"]
    )


def _submit(sandbox: SandboxProcess, **params: Any) -> str:
    up = _upload(sandbox)
    r = httpx.post(
        f"{sandbox.api_base}/model/generateImage",
        headers=AUTH,
        timeout=5,
        json={"model": V4, "prompt": "p", "images": [up], **params},
    )
    return str(r.json()["data"]["id"])


def _poll(sandbox: SandboxProcess, pid: str) -> httpx.Response:
    return httpx.get(f"{sandbox.api_base}/model/prediction/{pid}", headers=AUTH, timeout=5)


def test_models_need_no_auth_and_list_both_edit_models(sandbox: SandboxProcess) -> None:
    r = httpx.get(f"{sandbox.api_base}/models", headers=UA, timeout=5)
    assert r.status_code == 200
    ids = {m["model"] for m in r.json()["data"]}
    assert ids == {"bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"}


@pytest.mark.parametrize("path", ["/model/prediction/x", "/model/history"])
def test_api_needs_a_bearer_key(sandbox: SandboxProcess, path: str) -> None:
    r = httpx.get(f"{sandbox.api_base}{path}", headers=UA, timeout=5)
    assert r.status_code == 401
    assert r.json() == {"code": "401", "msg": "missing or malformed Authorization header", "data": None}


def test_success_code_is_the_string_200_and_the_old_shapes_are_faults(sandbox: SandboxProcess) -> None:
    assert httpx.get(f"{sandbox.api_base}/models", headers=UA, timeout=5).json()["code"] == "200"
    sandbox.configure(faults={"numeric_code": 1.0, "message_errors": 1.0})
    assert httpx.get(f"{sandbox.api_base}/models", headers=UA, timeout=5).json()["code"] == 200
    error = httpx.get(f"{sandbox.api_base}/model/history", headers=UA, timeout=5).json()
    assert error == {"code": 401, "message": "missing or malformed Authorization header", "data": None}


@pytest.mark.parametrize(
    "agent",
    [
        "python-httpx/0.28.1",
        "python-requests/2.32.3",
        "curl/8.5.0",
        "Go-http-client/1.1",
        "Python/3.11 aiohttp/3.9.5",
        "",
    ],
)
def test_a_librarys_user_agent_is_refused_like_cloudflare_does(sandbox: SandboxProcess, agent: str) -> None:
    for url in (
        f"{sandbox.api_base}/models",
        f"{sandbox.api_base}/model/prediction/x",
        f"{sandbox.url}/public/v1/balance",
    ):
        r = httpx.get(url, headers={**AUTH, "User-Agent": agent}, timeout=5)
        assert (r.status_code, r.text, r.headers["content-type"].split(";")[0]) == (
            403,
            "error code: 1010",
            "text/plain",
        )
    assert httpx.get(f"{sandbox.url}/_sandbox/health", headers={"User-Agent": agent}, timeout=5).status_code == 200
    assert sandbox.accounting()["counts"]["refused_user_agent"] == 3
    sandbox.configure(check_user_agent=False)
    assert httpx.get(f"{sandbox.api_base}/models", headers={"User-Agent": agent}, timeout=5).status_code == 200


def test_served_files_do_not_check_the_user_agent(sandbox: SandboxProcess) -> None:
    up = _upload(sandbox)
    assert httpx.get(up, timeout=5).status_code == 200  # httpx's own User-Agent


def test_a_new_prediction_is_404_while_it_warms_up(sandbox: SandboxProcess) -> None:
    sandbox.configure(warmup_seconds=0.8)
    pid = _submit(sandbox)
    early = _poll(sandbox, pid)
    assert early.status_code == 404 and early.json() == {"code": "404", "msg": "prediction not found", "data": None}
    time.sleep(0.9)
    assert _poll(sandbox, pid).status_code == 200
    assert sandbox.accounting()["counts"]["warmup_404"] == 1


def test_a_prediction_passes_through_every_running_spelling_then_one_final(sandbox: SandboxProcess) -> None:
    sandbox.configure(warmup_seconds=0, delay="fixed:1.5")
    pid = _submit(sandbox)
    seen = [_poll(sandbox, pid).json()["data"] for _ in range(len(RUNNING))]
    assert {p["status"] for p in seen} == set(RUNNING) and all(p["outputs"] == [] for p in seen)
    done = wait_for(lambda: (p := _poll(sandbox, pid).json()["data"])["status"] not in RUNNING and p, what="the end")
    assert done["status"] in SUCCEEDED and "price" not in done  # the service sends no price
    assert done["has_nsfw_contents"] == [False]


def test_final_spellings_are_drawn_from_both_sets_and_price_is_a_fault(sandbox: SandboxProcess) -> None:
    sandbox.configure(warmup_seconds=0, seed=5, faults={"failed": 0.5, "send_price": 1.0})
    pids = [_submit(sandbox, prompt=f"p{i}") for i in range(24)]
    ends = [
        wait_for(lambda pid=pid: (p := _poll(sandbox, pid).json()["data"])["status"] not in RUNNING and p)
        for pid in pids
    ]
    spellings = {p["status"] for p in ends}
    assert spellings <= set(SUCCEEDED) | set(FAILED[:-1]) and len(spellings & set(SUCCEEDED)) >= 2
    assert len(spellings & set(FAILED)) >= 2
    assert all(p["price"] == 0.027 for p in ends if p["status"] in SUCCEEDED)


def test_balance_is_unenveloped_money_objects(sandbox: SandboxProcess) -> None:
    sandbox.reset(balance_usd=125.5, warmup_seconds=0)
    r = httpx.get(f"{sandbox.url}/public/v1/balance", headers=AUTH, timeout=5).json()
    assert (r["object"], r["available"], r["frozen"]) == (
        "balance",
        {"value": "125.500000", "currency": "usd"},
        {"value": "0.000000", "currency": "usd"},
    )
    assert {"scope", "account", "cash", "bonus", "request_id"} <= set(r) and "code" not in r
    sandbox.configure(faults={"enveloped_balance": 1.0})
    old = httpx.get(f"{sandbox.url}/public/v1/balance", headers=AUTH, timeout=5).json()
    assert old["code"] == 200 and old["data"]["available"] == 125.5


def test_admin_refuses_unknown_settings_and_faults(sandbox: SandboxProcess) -> None:
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"faults": {"nope": 1}}, timeout=5).status_code == 400
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"wat": 1}, timeout=5).status_code == 400
    assert httpx.post(f"{sandbox.url}/_sandbox/config", json={"delay": "gauss:1"}, timeout=5).status_code == 400


def test_nested_input_shape_is_accepted_by_the_service(sandbox: SandboxProcess) -> None:
    up = _upload(sandbox)
    body = {"model": V4, "input": {"prompt": "p", "images": [up]}}
    r = httpx.post(f"{sandbox.api_base}/model/generateImage", headers=AUTH, timeout=5, json=body)
    assert r.status_code == 200 and r.json()["data"]["id"]


def test_prediction_stays_in_progress_for_its_delay(sandbox: SandboxProcess) -> None:
    sandbox.configure(delay="fixed:0.6", warmup_seconds=0, final_status="completed")
    pid = _submit(sandbox)
    first = _poll(sandbox, pid).json()["data"]
    assert first["status"] in RUNNING and first["outputs"] == []
    wait_for(lambda: _poll(sandbox, pid).json()["data"]["status"] == "completed", what="completion")
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
    with pytest.raises(ValueError):
        SandboxSettings().update({"final_status": "done"})


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
        return httpx.get(url, headers=UA, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_process_helper_reports_a_dead_sandbox() -> None:
    sb = SandboxProcess(settings={"delay": "bogus"})
    with pytest.raises(RuntimeError):
        sb.start(timeout=10)
