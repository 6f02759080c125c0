"""The Atlas client against the sandbox over real HTTP: every fault the sandbox can inject."""

from __future__ import annotations

import logging
import time
from decimal import Decimal

import pytest

from jobs.config import DEFAULT_USER_AGENT, Timeouts
from manifests.errors import (
    AgentRefused,
    AuthError,
    BadOutput,
    BadRequest,
    NotFound,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    TransientError,
)
from manifests.images import NotAnImage, inspect
from sandbox.server import SandboxProcess
from sandbox.settings import FAILED, RUNNING, SUCCEEDED
from tests.conftest import API_KEY, make_client
from tests.helpers import image_bytes, wait_for
from workers.atlas import AtlasClient
from workers.prediction import Prediction, State

V4 = "bytedance/seedream-v4/edit"
V45 = "bytedance/seedream-v4.5/edit"


def submit_one(client: AtlasClient, prompt: str = "same product on white marble", **params: object) -> str:
    url = client.upload("product.png", image_bytes(), "image/png")
    return client.submit(V4, {"prompt": prompt, "images": [url], **params}).id


_FIRST_404: dict[str, float] = {}


def answered(client: AtlasClient, pid: str, grace: float = 10.0) -> Prediction | None:
    """One poll; None while the service still answers 404 for a prediction it just accepted
    (its warm-up), as the job state machine reads it."""
    try:
        return client.get_prediction(pid)
    except NotFound:
        if time.monotonic() - _FIRST_404.setdefault(pid, time.monotonic()) > grace:
            raise
        return None


def known(client: AtlasClient, pid: str) -> Prediction:
    """The first answer past the warm-up."""
    return wait_for(lambda: answered(client, pid), what=f"prediction {pid} past its warm-up")


def finished(client: AtlasClient, pid: str) -> Prediction:
    return wait_for(lambda: (p := answered(client, pid)) is not None and p.done and p, what=f"prediction {pid}")


def test_round_trip_gives_an_image_of_the_requested_size(client: AtlasClient, sandbox: SandboxProcess) -> None:
    url = client.upload("sku-001.png", image_bytes(80, 60), "image/png")
    assert url.endswith("/sku-001.png")  # the extension is kept: the service classifies by it
    sub = client.submit(V45, {"prompt": "same product on white marble", "images": [url], "size": "2048*2048"})
    pred = finished(client, sub.id)
    assert pred.state is State.SUCCEEDED and pred.status in SUCCEEDED
    assert pred.price_micros is None  # the service sends no price on a prediction
    assert pred.nsfw == (False,)
    assert len(pred.outputs) == 1
    info = inspect(client.download(pred.outputs[0]).content)
    assert (info.format, info.width, info.height) == ("JPEG", 2048, 2048)
    acc = sandbox.accounting()
    assert (acc["created"], acc["billed_micros"], acc["uploads"]) == (1, 36_000, 1)


def test_missing_key_is_an_auth_error(sandbox: SandboxProcess) -> None:
    with make_client(sandbox, api_key="") as c, pytest.raises(AuthError):
        c.submit(V4, {"prompt": "x", "images": ["http://127.0.0.1:1/a.png"]})


def test_wrong_key_is_an_auth_error_and_never_retried(sandbox: SandboxProcess) -> None:
    sandbox.reset(api_keys=["the-only-key"])
    with make_client(sandbox) as c, pytest.raises(AuthError):
        c.get_prediction("abc")
    assert sandbox.accounting()["polls"] == 1


def test_injected_429_on_submit_carries_retry_after_and_creates_nothing(
    client: AtlasClient, sandbox: SandboxProcess
) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(faults={"rate_limited": 1.0}, fault_retry_after=7)
    with pytest.raises(RateLimited) as info:
        client.submit(V4, {"prompt": "x", "images": [url]})
    assert info.value.retry_after == 7
    assert sandbox.accounting()["created"] == 0


def test_submit_rate_limit_is_enforced_with_retry_after(client: AtlasClient, sandbox: SandboxProcess) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(submit_rate=0.5, submit_burst=1)
    client.submit(V4, {"prompt": "first", "images": [url]})
    with pytest.raises(RateLimited) as info:
        client.submit(V4, {"prompt": "second", "images": [url]})
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    acc = sandbox.accounting()
    assert (acc["created"], acc["rejected_rate"]) == (1, 1)


def test_in_flight_limit_is_enforced(client: AtlasClient, sandbox: SandboxProcess) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(max_in_flight=1, delay="fixed:30")
    client.submit(V4, {"prompt": "first", "images": [url]})
    with pytest.raises(RateLimited):
        client.submit(V4, {"prompt": "second", "images": [url]})
    assert sandbox.accounting()["rejected_in_flight"] == 1


def test_plain_5xx_on_submit_is_outcome_unknown_never_retried(client: AtlasClient, sandbox: SandboxProcess) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(faults={"server_error": 1.0})
    with pytest.raises(OutcomeUnknown):
        client.submit(V4, {"prompt": "x", "images": [url]})
    assert sandbox.accounting()["submit_calls"] == 1  # sent exactly once


def test_plain_5xx_on_poll_is_retried_then_transient(client: AtlasClient, sandbox: SandboxProcess) -> None:
    pid = submit_one(client)
    sandbox.configure(faults={"server_error": 1.0})
    with pytest.raises(TransientError):
        client.get_prediction(pid)
    assert sandbox.accounting()["polls"] == 4  # FAST_RETRY.attempts


def test_intermittent_5xx_and_429_on_poll_are_ridden_out(client: AtlasClient, sandbox: SandboxProcess) -> None:
    pid = submit_one(client)
    known(client, pid)
    sandbox.configure(seed=3, faults={"server_error": 0.3, "rate_limited": 0.2}, fault_retry_after=0)
    for _ in range(10):
        assert client.get_prediction(pid).id == pid


def test_failed_prediction_is_final_with_message_and_not_billed(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"failed": 1.0})
    pred = finished(client, submit_one(client))
    assert pred.state is State.FAILED and pred.error and "could not process" in pred.error
    assert sandbox.accounting()["billed_micros"] == 0


def test_5xx_carrying_a_failed_verdict_is_an_answer_not_an_outage(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"failed_5xx": 1.0})
    pid = submit_one(client)
    wait_for(lambda: sandbox.admin("GET", f"predictions/{pid}")["final"], what="final")
    time.sleep(sandbox.configure()["warmup_seconds"])
    polls_before = sandbox.accounting()["polls"]
    pred = client.get_prediction(pid)
    assert pred.state is State.FAILED
    assert pred.error and "could not process" in pred.error  # read from the error object
    assert sandbox.accounting()["polls"] == polls_before + 1  # not retried as a server fault


def test_timeout_status_is_a_final_failure(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"timeout_status": 1.0})
    pred = finished(client, submit_one(client))
    assert (pred.state, pred.status) == (State.FAILED, "timeout")
    assert sandbox.accounting()["billed_count"] == 0


def test_dropped_submit_answer_is_outcome_unknown_and_the_service_billed_it(
    client: AtlasClient, sandbox: SandboxProcess
) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    sandbox.configure(faults={"drop_submit": 1.0})
    with pytest.raises(OutcomeUnknown):
        client.submit(V4, {"prompt": "lost answer", "images": [url]})
    acc = wait_for(lambda: (a := sandbox.accounting())["finished"] == 1 and a, what="prediction to finish")
    assert acc["submit_calls"] == 1 and acc["created"] == 1
    assert acc["billed_count"] == 1 and acc["billed_micros"] == 27_000
    # history is how the lost prediction can be found again
    items = client.history(model=V4)["items"]
    assert len(items) == 1 and items[0]["status"] in SUCCEEDED


def test_output_404_is_not_found(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_404": 1.0})
    pred = finished(client, submit_one(client))
    with pytest.raises(NotFound):
        client.download(pred.outputs[0])


def test_slow_output_times_out_as_transient_within_the_read_timeout(sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_slow": 1.0}, slow_output_seconds=2.0)
    with make_client(sandbox, timeouts=Timeouts(connect=1, read=0.3, write=1, pool=1)) as c:
        pred = finished(c, submit_one(c))
        with pytest.raises(TransientError):
            c.download(pred.outputs[0])


def test_slow_output_arrives_with_a_patient_client(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_slow": 1.0}, slow_output_seconds=0.5)
    pred = finished(client, submit_one(client))
    inspect(client.download(pred.outputs[0]).content)


def test_truncated_output_transfer_is_retried_and_complete(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_truncated": 1.0})
    pred = finished(client, submit_one(client))
    data = client.download(pred.outputs[0]).content
    inspect(data)
    assert sandbox.accounting()["counts"]["output_downloads"] == 2


def test_corrupt_output_is_caught_by_the_image_check(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_corrupt": 1.0})
    pred = finished(client, submit_one(client))
    with pytest.raises(NotAnImage):
        inspect(client.download(pred.outputs[0]).content)


def test_output_at_another_local_address_is_not_fetched(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_internal": 1.0})
    pred = finished(client, submit_one(client))
    assert pred.outputs[0].startswith("http://localhost:")
    with pytest.raises(BadOutput, match="internal address"):
        client.download(pred.outputs[0])
    assert sandbox.accounting()["counts"].get("bait_fetches", 0) == 0


def test_another_port_on_the_service_host_is_not_trusted(client: AtlasClient, sandbox: SandboxProcess) -> None:
    """The sandbox lives on 127.0.0.1: that must not open every local port (Redis on 6379)."""
    with pytest.raises(BadOutput, match="internal address"):
        client.download("http://127.0.0.1:6379/files/outputs/x/0.jpeg")


def test_output_redirect_loop_ends_after_the_cap(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_redirect_loop": 1.0})
    pred = finished(client, submit_one(client))
    with pytest.raises(BadOutput, match="too many redirects"):
        client.download(pred.outputs[0])
    assert sandbox.accounting()["counts"]["redirect_hops"] == client.config.max_redirects + 1


def test_endless_output_stream_is_cut_at_the_cap_over_http(sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"output_endless": 1.0})
    with make_client(sandbox, max_output_bytes=2 * 1024 * 1024) as c:
        pred = finished(c, submit_one(c))
        with pytest.raises(BadOutput, match="cut off"):
            c.download(pred.outputs[0])
    # The server stopped soon after the client hung up: what it handed its socket beyond the cap
    # sits in loopback buffers, several MB on this kind of machine (8.8 MB seen under load).
    sent = sandbox.accounting()["counts"]["endless_bytes"]
    assert 2 * 1024 * 1024 <= sent < 32 * 1024 * 1024


def test_bare_response_shape_everywhere(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"bare_shape": 1.0})
    pred = finished(client, submit_one(client))
    assert pred.state is State.SUCCEEDED and pred.outputs
    assert client.balance().available is not None


def test_succeeded_spelling_is_success(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.configure(faults={"succeeded_spelling": 1.0})
    pred = finished(client, submit_one(client))
    assert (pred.state, pred.status) == (State.SUCCEEDED, "succeeded")


def test_a_price_is_read_only_where_one_is_sent(client: AtlasClient, sandbox: SandboxProcess) -> None:
    assert finished(client, submit_one(client, "no price")).price_micros is None
    sandbox.configure(faults={"send_price": 1.0})
    assert finished(client, submit_one(client, "priced")).price_micros == 27_000


@pytest.mark.parametrize("spelling", RUNNING)
def test_every_running_spelling_is_still_running(client: AtlasClient, sandbox: SandboxProcess, spelling: str) -> None:
    sandbox.configure(delay="fixed:30", running_status=spelling)
    pred = known(client, submit_one(client))
    assert (pred.state, pred.status, pred.done, pred.outputs) == (State.RUNNING, spelling, False, ())


@pytest.mark.parametrize("spelling", SUCCEEDED + FAILED)
def test_every_final_spelling_ends_right(client: AtlasClient, sandbox: SandboxProcess, spelling: str) -> None:
    sandbox.configure(final_status=spelling)
    pred = finished(client, submit_one(client))
    assert pred.status == spelling
    acc = sandbox.accounting()
    if spelling in SUCCEEDED:
        assert pred.state is State.SUCCEEDED and len(pred.outputs) == 1 and acc["billed_count"] == 1
    else:
        assert pred.state is State.FAILED and pred.error and not pred.outputs and acc["billed_count"] == 0


def test_a_poll_404_during_the_warm_up_is_not_found_and_asked_once(
    client: AtlasClient, sandbox: SandboxProcess
) -> None:
    """Not retried here, not read as anything else: the job state machine decides what a 404 this
    soon after the submit means (still starting, within SEEDREAM_WARMUP_GRACE)."""
    sandbox.configure(warmup_seconds=30)
    pid = submit_one(client)
    with pytest.raises(NotFound):
        client.get_prediction(pid)
    assert sandbox.accounting()["polls"] == 1


def test_every_request_names_the_product(client: AtlasClient, sandbox: SandboxProcess) -> None:
    assert DEFAULT_USER_AGENT.startswith("seedream-batch/")
    pred = finished(client, submit_one(client))
    client.download(pred.outputs[0])
    client.balance()
    client.models()
    assert set(sandbox.accounting()["user_agents"]) == {DEFAULT_USER_AGENT}


@pytest.mark.parametrize("agent", ["python-httpx/0.28.1", "curl/8.5.0"])
def test_a_cdn_refusal_of_the_user_agent_says_what_to_set(sandbox: SandboxProcess, agent: str) -> None:
    with make_client(sandbox, user_agent=agent) as c:
        calls = [
            c.balance,
            c.models,
            lambda: c.upload("a.png", image_bytes(), "image/png"),
            lambda: c.submit(V4, {"prompt": "x", "images": [f"{sandbox.url}/files/uploads/x/a.png"]}),
            lambda: c.get_prediction("0123456789abcdef"),
        ]
        for call in calls:
            with pytest.raises(AgentRefused) as info:
                call()
            text = str(info.value)
            assert "Cloudflare, error 1010" in text and f"User-Agent {agent!r}" in text
            assert "set SEEDREAM_USER_AGENT" in text and isinstance(info.value, AuthError)
    acc = sandbox.accounting()
    assert acc["counts"]["refused_user_agent"] == len(calls)  # refusals are not retried
    assert acc["submit_calls"] == 0
    with make_client(sandbox, user_agent="my-shop-pipeline/2.0") as c:
        assert c.balance().available is not None


def test_insufficient_balance_is_payment_required(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.reset(balance_usd=0.03, delay="fixed:30")
    url = client.upload("a.png", image_bytes(), "image/png")
    client.submit(V4, {"prompt": "one", "images": [url]})
    with pytest.raises(PaymentRequired):
        client.submit(V4, {"prompt": "two", "images": [url]})


def test_bad_parameters_carry_the_service_message(client: AtlasClient, sandbox: SandboxProcess) -> None:
    url = client.upload("a.png", image_bytes(), "image/png")
    with pytest.raises(BadRequest, match="outside"):
        client.submit(V45, {"prompt": "x", "images": [url], "size": "1024*1024"})
    with pytest.raises(BadRequest, match="not found"):
        client.submit("bytedance/unknown", {"prompt": "x", "images": [url]})
    with pytest.raises(BadRequest, match="beside"):
        client.submit(V4, {"input": {"prompt": "x", "images": [url]}})
    assert sandbox.accounting()["created"] == 0


def test_unknown_prediction_is_not_found(client: AtlasClient) -> None:
    with pytest.raises(NotFound):
        client.get_prediction("0123456789abcdef")


def test_unfetchable_input_fails_the_prediction(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sub = client.submit(V4, {"prompt": "x", "images": [f"{sandbox.url}/files/uploads/nope/a.png"]})
    pred = finished(client, sub.id)
    assert pred.state is State.FAILED and pred.error and "failed to fetch input" in pred.error
    assert sandbox.accounting()["billed_count"] == 0


def test_download_is_cut_at_the_size_cap(client: AtlasClient) -> None:
    pred = finished(client, submit_one(client, size="1024*1024"))
    with pytest.raises(BadOutput, match="cap"):
        client.download(pred.outputs[0], max_bytes=1000)


def test_models_history_and_balance(client: AtlasClient, sandbox: SandboxProcess) -> None:
    prices = {m["model"]: m["price"]["actual"]["base_price"] for m in client.models()}
    assert prices == {V4: 0.027, V45: 0.036}
    pid = submit_one(client)
    finished(client, pid)
    page = client.history(session_id=pid)
    assert page["total"] == 1 and page["items"][0]["ID"] == pid
    assert client.balance().available == Decimal("9999.973")


def test_balance_reads_the_service_shape_and_the_old_one(client: AtlasClient, sandbox: SandboxProcess) -> None:
    sandbox.reset(balance_usd=0.1)
    balance = client.balance()
    assert balance.available == Decimal("0.100000") and balance.raw["object"] == "balance"
    sandbox.configure(faults={"enveloped_balance": 1.0})
    assert client.balance().available == Decimal("0.1")


def test_api_key_never_appears_in_reprs_errors_or_logs(
    sandbox: SandboxProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox.configure(seed=5, faults={"server_error": 0.5, "rate_limited": 0.3}, fault_retry_after=0)
    texts: list[str] = []
    with make_client(sandbox) as c:
        texts += [repr(c), repr(c.config), str(c.config)]
        for _ in range(6):
            try:
                c.get_prediction("0123456789abcdef")
            except Exception as exc:
                texts += [str(exc), repr(exc)]
        try:
            c.submit(V4, {"prompt": "x", "images": ["http://127.0.0.1:1/a.png"]})
        except Exception as exc:
            texts += [str(exc), repr(exc)]
    texts += [r.getMessage() for r in caplog.records]
    assert len(texts) > 6
    assert not [t for t in texts if API_KEY in t]
