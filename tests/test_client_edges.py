"""Edge cases of the client alone (httpx.MockTransport): shapes and failures the sandbox rarely sends."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from decimal import Decimal

import httpx
import pytest

from jobs.config import AtlasConfig
from manifests.errors import (
    AgentRefused,
    AuthError,
    BadOutput,
    InvalidResponse,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    TransientError,
)
from tests.conftest import FAST_RETRY
from workers.atlas import AtlasClient, parse_retry_after
from workers.prediction import Prediction, State, classify
from workers.urls import check_fetchable, resolve_host

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler) -> AtlasClient:
    cfg = AtlasConfig(api_key="sk-edge", api_base="https://api.example.test/api/v1", read_retry=FAST_RETRY)
    return AtlasClient(cfg, transport=httpx.MockTransport(handler), sleep=lambda s: None)


def raising(exc: type[Exception]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)  # type: ignore[call-arg]

    return handler


@pytest.mark.parametrize("status", ["completed", "Succeeded", "SUCCESS", " completed "])
def test_success_spellings(status: str) -> None:
    assert classify(status) is State.SUCCEEDED


@pytest.mark.parametrize("status", ["failed", "ERROR", "timeout", "canceled", "cancelled"])
def test_failure_spellings(status: str) -> None:
    assert classify(status) is State.FAILED


@pytest.mark.parametrize("status", ["created", "starting", "queued", "processing", "warming-up", None, 7])
def test_unknown_or_progress_is_running(status: object) -> None:
    assert classify(status) is State.RUNNING


def test_output_shapes_errors_and_price_variants() -> None:
    single = Prediction.from_body(
        {"data": {"id": "a", "status": "completed", "output": "https://x/o.png", "price": "0.036"}}
    )
    assert single.outputs == ("https://x/o.png",) and single.price_micros == 36_000
    objs = Prediction.from_body(
        {"id": "b", "status": "succeeded", "outputs": [{"url": "https://x/1.png"}, {"nope": 1}, 3]}
    )
    assert objs.outputs == ("https://x/1.png",)
    err = Prediction.from_body({"data": {"id": "c", "status": "failed", "error": {"msg": "nsfw"}, "error_code": 1301}})
    assert (err.error, err.error_code) == ("nsfw", "1301")
    junk = Prediction.from_body(["not", "a", "dict"], fallback_id="z")
    assert junk.id == "z" and junk.state is State.RUNNING
    assert Prediction.from_body({"id": "d", "status": "completed", "price": -1}).price_micros is None
    assert Prediction.from_body({"id": "d", "status": "completed", "price": "NaN"}).price_micros is None
    long_err = Prediction.from_body({"id": "e", "status": "failed", "error": "x" * 100_000})
    assert long_err.error is not None and len(long_err.error) < 2100


def test_retry_after_as_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("99999") == 600.0


def test_envelope_code_overrides_http_200() -> None:
    c = client_for(lambda r: httpx.Response(200, json={"code": 401, "message": "token expired", "data": None}))
    with pytest.raises(AuthError, match="token expired"):
        c.get_prediction("p1")


def test_a_string_envelope_code_counts_and_msg_is_read_first() -> None:
    body = {"code": "401", "msg": "token expired", "message": "error", "data": None}
    c = client_for(lambda r: httpx.Response(200, json=body))
    with pytest.raises(AuthError, match="token expired"):
        c.get_prediction("p1")


def test_a_cloudflare_1010_on_a_submit_is_the_user_agent_and_nothing_was_created() -> None:
    page = "error code: 1010"
    c = client_for(lambda r: httpx.Response(403, text=page, headers={"content-type": "text/plain"}))
    with pytest.raises(AgentRefused, match="User-Agent 'seedream-batch/"):
        c.submit("m", {"prompt": "x", "images": ["https://x/a.png"]})
    plain = client_for(lambda r: httpx.Response(403, json={"code": "403", "msg": "forbidden"}))
    with pytest.raises(AuthError, match="forbidden") as info:
        plain.submit("m", {"prompt": "x", "images": ["https://x/a.png"]})
    assert not isinstance(info.value, AgentRefused)  # a plain 403 is the key's


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ({"value": "0.100000", "currency": "usd"}, Decimal("0.1")),
        ({"value": "0.1", "currency": "USD"}, Decimal("0.1")),
        ({"value": "5", "currency": "cny"}, None),
        ({"value": "NaN", "currency": "usd"}, None),
        ({"value": "lots", "currency": "usd"}, None),
        (0.1, Decimal("0.1")),
        (True, None),
    ],
)
def test_balance_amounts_are_read_exactly_or_not_at_all(available: object, expected: Decimal | None) -> None:
    c = client_for(lambda r: httpx.Response(200, json={"object": "balance", "available": available}))
    assert c.balance().available == expected


def test_insufficient_balance_message_on_400_is_payment_required() -> None:
    c = client_for(lambda r: httpx.Response(400, json={"code": 400, "message": "Insufficient balance, please top up"}))
    with pytest.raises(PaymentRequired):
        c.submit("m", {"prompt": "x", "images": ["https://x/a.png"]})


def test_submit_accepted_without_id_is_outcome_unknown() -> None:
    c = client_for(lambda r: httpx.Response(200, json={"code": 200, "data": {"status": "created"}}))
    with pytest.raises(OutcomeUnknown):
        c.submit("m", {"prompt": "x", "images": ["https://x/a.png"]})


def test_submit_with_garbage_body_is_outcome_unknown() -> None:
    c = client_for(lambda r: httpx.Response(200, content=b"<html>gateway</html>"))
    with pytest.raises(OutcomeUnknown):
        c.submit("m", {"prompt": "x", "images": ["https://x/a.png"]})


def test_submit_read_timeout_is_outcome_unknown() -> None:
    with pytest.raises(OutcomeUnknown):
        client_for(raising(httpx.ReadTimeout)).submit("m", {"prompt": "x", "images": []})


def test_submit_that_never_connected_is_transient() -> None:
    with pytest.raises(TransientError):
        client_for(raising(httpx.ConnectError)).submit("m", {"prompt": "x", "images": []})


def test_submit_429_is_rate_limited_not_unknown() -> None:
    c = client_for(lambda r: httpx.Response(429, headers={"Retry-After": "2"}, json={"message": "slow down"}))
    with pytest.raises(RateLimited) as info:
        c.submit("m", {"prompt": "x", "images": []})
    assert info.value.retry_after == 2.0


def test_submit_is_sent_once_whatever_happens() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"message": "busy"})

    with pytest.raises(OutcomeUnknown):
        client_for(handler).submit("m", {"prompt": "x", "images": []})
    assert len(calls) == 1
    assert json.loads(calls[0].content) == {"model": "m", "prompt": "x", "images": []}


def test_poll_with_non_json_is_invalid_response_after_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, content=b"[1, 2]")

    with pytest.raises(InvalidResponse):
        client_for(handler).get_prediction("p")
    assert len(calls) == FAST_RETRY.attempts


def test_upload_sends_file_name_and_type_multipart() -> None:
    seen: dict[str, bytes] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = request.read()
        return httpx.Response(200, json={"data": {"download_url": "https://files.example.test/u/sku.webp"}})

    url = client_for(handler).upload("sku.webp", b"RIFF....WEBP", "image/webp")
    assert url == "https://files.example.test/u/sku.webp"
    assert b'name="file"; filename="sku.webp"' in seen["body"] and b"image/webp" in seen["body"]


def test_downloads_never_carry_the_api_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"data", headers={"content-type": "image/png"})

    client_for(handler).download("https://cdn.example.test/o.png")
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/o.png",
        "http://localhost:6379/",
        "file:///etc/passwd",
        "ftp://x/o.png",
        "http://[::1]/o.png",
        "http://127.1/o.png",
        "http://2130706433/o.png",
        "http://0x7f.1/o.png",
        "http://0177.0.0.1/o.png",
        "http://017700000001/o.png",
        "http://0/o.png",
        "http://127.0.0.1./o.png",
        "http://127\u30020\u30020\u30021/o.png",  # ideographic full stops, read as dots
        "http://[::ffff:127.0.0.1]/o.png",
        "http://[0:0:0:0:0:ffff:7f00:1]/o.png",
        "http://[::ffff:a9fe:a9fe]/latest/meta-data",
        "http://[fe80::1%25eth0]/o.png",
        "http://100.100.100.200/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_internal_or_odd_output_urls_are_not_fetched(url: str) -> None:
    calls = []
    c = client_for(lambda r: calls.append(r) or httpx.Response(200))  # type: ignore[func-returns-value]
    with pytest.raises(BadOutput):
        c.download(url)
    assert calls == []


def test_redirect_to_internal_address_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "http://127.0.0.1:6379/"})

    with pytest.raises(BadOutput, match="internal"):
        client_for(handler).download("https://cdn.example.test/o.png")


def test_redirect_loop_ends() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(302, headers={"location": str(request.url)})

    with pytest.raises(BadOutput, match="redirects"):
        client_for(handler).download("https://cdn.example.test/loop.png")
    assert len(calls) <= 6


def test_endless_output_stream_is_cut_at_the_cap() -> None:
    def endless() -> object:
        while True:
            yield b"\0" * 65536

    c = client_for(lambda r: httpx.Response(200, content=endless()))  # type: ignore[arg-type]
    with pytest.raises(BadOutput, match="cut off"):
        c.download("https://cdn.example.test/huge.png", max_bytes=1_000_000)


def test_a_name_that_resolves_to_an_internal_address_is_not_fetched() -> None:
    names = {"rebound.example.test": ["93.184.216.34", "127.0.0.1"], "cdn.example.test": ["93.184.216.34"]}

    def resolve(host: str, port: int) -> list[str]:
        return names.get(host, [])

    with pytest.raises(BadOutput, match=r"rebound\.example\.test resolves to an internal address \(127\.0\.0\.1\)"):
        check_fetchable("https://rebound.example.test/o.png", trusted_hosts=frozenset(), resolve=resolve)
    assert check_fetchable("https://cdn.example.test/o.png", trusted_hosts=frozenset(), resolve=resolve)
    # a name that does not resolve here is left to the connection, which fails as a transient fault
    assert check_fetchable("https://gone.example.test/o.png", trusted_hosts=frozenset(), resolve=resolve)


def test_the_service_host_is_trusted_only_as_configured() -> None:
    """The sandbox on 127.0.0.1:8787 stays fetchable; no other spelling or port of it is, and it is never looked up."""
    trusted = frozenset({"127.0.0.1:8787"})

    def resolve(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} looked up")

    assert check_fetchable("http://127.0.0.1:8787/files/o.png", trusted_hosts=trusted, resolve=resolve)
    for url in ("http://127.1:8787/files/o.png", "http://2130706433:8787/o.png", "http://[::ffff:127.0.0.1]:8787/"):
        with pytest.raises(BadOutput, match="internal address"):
            check_fetchable(url, trusted_hosts=trusted, resolve=resolve)


def test_a_slow_lookup_is_given_up_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args: object, **kw: object) -> list[object]:
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    started = time.monotonic()
    assert resolve_host("slow.example.test", 80, timeout=0.2) == []
    assert time.monotonic() - started < 1.0


def test_a_lookup_gives_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 443, 0, 0)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: infos)
    assert resolve_host("two.example.test", 443) == ["93.184.216.34", "::1"]
    with pytest.raises(BadOutput, match="resolves to an internal address"):
        check_fetchable("https://two.example.test/o.png", trusted_hosts=frozenset())
