"""The Atlas Cloud HTTP client: the one place where httpx errors enter the project.

Reads (poll, history, models, balance, the daily ledger, upload, download) retry transient faults
with backoff and jitter. A submit is sent exactly once: any answer that does not
prove the prediction was or was not created raises `OutcomeUnknown`, because a
second POST could create (and bill) a second prediction.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx

from jobs.config import AtlasConfig
from jobs.retry import Backoff, call_with_retry
from manifests.errors import (
    AgentRefused,
    AuthError,
    BadOutput,
    BadRequest,
    InvalidResponse,
    NotFound,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    ServiceError,
    TransientError,
)
from workers.metrics import RETRIES
from workers.prediction import (
    Prediction,
    clip,
    envelope_code,
    has_final_verdict,
    message_of,
    unwrap,
)
from workers.urls import check_fetchable

log = logging.getLogger("seedream.atlas")
T = TypeVar("T")
MAX_API_BODY = 8 * 1024 * 1024  # an API answer larger than this is not JSON we want
MAX_LEDGER_PAGES = 100  # a cursor that never ends is the service's bug, not a reason to loop forever


@dataclass(frozen=True)
class Submitted:
    """The service accepted a submit: this prediction exists and will be billed if it succeeds."""

    id: str
    status: str


@dataclass(frozen=True)
class Downloaded:
    content: bytes
    content_type: str


@dataclass(frozen=True)
class Balance:
    available: Decimal | None  # USD
    raw: dict[str, Any]


def _usd(value: object) -> Decimal | None:
    """A balance amount: a money object `{"value": "125.500000", "currency": "usd"}` (the
    service's shape) or a bare number (the old enveloped one); None when it is neither, or
    not in dollars."""
    if isinstance(value, dict):
        if str(value.get("currency") or "").lower() != "usd":
            return None
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        usd = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return usd if usd.is_finite() else None


def cloudflare_refused(status: int, body: object) -> bool:
    """Cloudflare's browser check in front of the service answers 403 with a plain-text page."""
    return status == 403 and isinstance(body, str) and "error code: 1010" in body.lower()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), clamped to 0..600."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(600.0, seconds))


def _is_insufficient_balance(message: str | None) -> bool:
    m = (message or "").lower()
    return "insufficient balance" in m or "insufficient_balance" in m or "balance is not enough" in m


def error_for(status: int, body: object, headers: Mapping[str, str], op: str, *, user_agent: str = "") -> ServiceError:
    """The exception an error answer means, by status and envelope code (documented policy)."""
    if cloudflare_refused(status, body):
        return AgentRefused(
            f"{op}: the service's CDN (Cloudflare, error 1010) refused this client's User-Agent "
            f"{clip(user_agent, 200)!r}; set SEEDREAM_USER_AGENT to another value",
            status=status,
        )
    code = envelope_code(body)
    effective = code if code is not None and code >= 400 else status
    message = message_of(body) or f"HTTP {status}"
    text = f"{op}: {message}"
    if effective == 402 or _is_insufficient_balance(message):
        return PaymentRequired(text, status=effective)
    if effective in (401, 403):
        return AuthError(text, status=effective)
    if effective == 429:
        return RateLimited(text, retry_after=parse_retry_after(headers.get("retry-after")))
    if effective == 404:
        return NotFound(text, status=effective)
    if 400 <= effective < 500:
        return BadRequest(text, status=effective)
    return TransientError(text, status=effective)


class AtlasClient:
    """A connection-reusing client for one API key; thread-safe like httpx.Client."""

    def __init__(
        self,
        config: AtlasConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._sleep = sleep
        t = config.timeouts
        timeout = httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        headers = {"Accept": "application/json", "User-Agent": config.user_agent}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key.reveal()}"
        self._api = httpx.Client(
            base_url=config.api_base,
            headers=headers,
            timeout=timeout,
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )
        # Outputs and uploaded files live on storage hosts: never send them the API key.
        # Only the service's own host *and port* is trusted: on 127.0.0.1 the bare host would
        # also let an answer point us at Redis or any other local port.
        self._trusted = frozenset({config.api_host})
        self._files = httpx.Client(
            headers={"User-Agent": config.user_agent},
            timeout=timeout,
            limits=limits,
            transport=transport,
            follow_redirects=True,
            max_redirects=config.max_redirects,
            event_hooks={"request": [self._check_file_request]},
        )

    def __repr__(self) -> str:
        return f"AtlasClient(api_base={self.config.api_base!r})"

    def close(self) -> None:
        self._api.close()
        self._files.close()

    def __enter__(self) -> AtlasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level ---------------------------------------------------------------------

    def _send_api(self, method: str, url: str, op: str, **kwargs: Any) -> tuple[int, Any, httpx.Headers]:
        """One HTTP exchange; JSON body (or None) back; httpx errors become TransientError."""
        try:
            request = self._api.build_request(method, url, **kwargs)
            response = self._api.send(request, stream=True)
            try:
                raw = _read_capped(response, MAX_API_BODY)
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise TransientError(f"{op}: timed out ({type(exc).__name__})") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            raise TransientError(f"{op}: connection failed ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise TransientError(f"{op}: HTTP error ({type(exc).__name__})") from None
        try:
            body = json.loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")[:MAX_API_BODY]
        return response.status_code, body, response.headers

    def _api_call(self, method: str, url: str, op: str, **kwargs: Any) -> Any:
        status, body, headers = self._send_api(method, url, op, **kwargs)
        code = envelope_code(body)
        if status >= 400 or (code is not None and code >= 400):
            raise self._error(status, body, headers, op)
        if not isinstance(body, dict):
            raise InvalidResponse(f"{op}: answer is not a JSON object")
        return body

    def _error(self, status: int, body: object, headers: Mapping[str, str], op: str) -> ServiceError:
        return error_for(status, body, headers, op, user_agent=self.config.user_agent)

    def _retrying(self, fn: Callable[[], T], op: str, policy: Backoff | None = None) -> T:
        def note(attempt: int, exc: BaseException, wait: float) -> None:
            stage = op.split(" ", 1)[0]
            RETRIES.labels(stage).inc()
            log.warning("retrying %s after %s (try %d, waiting %.2fs)", op, type(exc).__name__, attempt, wait,
                        extra={"event": "retry", "reason": stage, "attempt": attempt})  # fmt: skip

        return call_with_retry(fn, policy or self.config.read_retry, sleep=self._sleep, on_retry=note)

    # -- the API -------------------------------------------------------------------------

    def submit(self, model: str, params: Mapping[str, Any]) -> Submitted:
        """POST one prediction, once. Raises OutcomeUnknown when the answer leaves it unknown."""
        if "input" in params:
            raise BadRequest("submit: parameters go beside 'model', not nested under 'input'")
        payload = {"model": model, **params}
        op = f"submit {model}"
        try:
            request = self._api.build_request("POST", "/model/generateImage", json=payload)
            response = self._api.send(request, stream=True)
            try:
                raw = _read_capped(response, MAX_API_BODY)
            finally:
                response.close()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never left this machine: nothing was created.
            raise TransientError(f"{op}: could not connect ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise OutcomeUnknown(
                f"{op}: the answer was lost ({type(exc).__name__}); the prediction may exist"
            ) from None
        status = response.status_code
        try:
            body: Any = json.loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            body = raw[:4096].decode("utf-8", "replace")  # a page in front of the service (the CDN's)
        code = envelope_code(body)
        effective = code if code is not None and code >= 400 else status
        if 400 <= effective < 500:
            raise self._error(status, body, response.headers, op)
        if effective >= 500 or status >= 300:
            raise OutcomeUnknown(
                f"{op}: HTTP {effective} ({message_of(body) or 'no message'}); the prediction may exist",
                status=effective,
            )
        payload_out = unwrap(body)
        pid = payload_out.get("id")
        if not isinstance(pid, str) or not pid.strip():
            raise OutcomeUnknown(f"{op}: accepted but no prediction id in the answer")
        st = payload_out.get("status")
        return Submitted(id=clip(pid.strip(), 200), status=st if isinstance(st, str) else "created")

    def get_prediction(self, prediction_id: str, *, retry: Backoff | None = None) -> Prediction:
        """Poll once (with transient retries); a 5xx that carries a final verdict is an answer."""
        op = f"poll {prediction_id}"
        path = f"/model/prediction/{_safe_segment(prediction_id)}"

        def once() -> Prediction:
            status, body, headers = self._send_api("GET", path, op)
            if (status >= 400 or (envelope_code(body) or 0) >= 400) and has_final_verdict(body):
                return Prediction.from_body(body, fallback_id=prediction_id)
            if status >= 400 or (envelope_code(body) or 0) >= 400:
                raise self._error(status, body, headers, op)
            if not isinstance(body, dict):
                raise InvalidResponse(f"{op}: answer is not a JSON object")
            return Prediction.from_body(body, fallback_id=prediction_id)

        return self._retrying(once, op, retry)

    def upload(self, filename: str, content: bytes, content_type: str) -> str:
        """Upload an input image; the file name's extension is kept (the service classifies by it)."""
        op = f"upload {filename}"

        def once() -> str:
            body = self._api_call("POST", "/model/uploadMedia", op, files={"file": (filename, content, content_type)})
            url = unwrap(body).get("download_url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise InvalidResponse(f"{op}: no download_url in the answer")
            return url

        return self._retrying(once, op)

    def history(
        self,
        *,
        page: int = 1,
        size: int = 10,
        model: str | None = None,
        status: str | None = None,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """One page of `/model/history`; with session_id, the prediction of that id."""
        params: dict[str, Any] = {"no": page, "size": size}
        if model:
            params["model"] = model
        if status:
            params["status"] = status
        if session_id:
            params["sessionID"] = session_id
        body = self._retrying(lambda: self._api_call("GET", "/model/history", "history", params=params), "history")
        data = unwrap(body)
        items = data.get("items")
        return {"items": items if isinstance(items, list) else [], "total": data.get("total")}

    def models(self, *, retry: Backoff | None = None) -> list[dict[str, Any]]:
        body = self._retrying(lambda: self._api_call("GET", "/models", "models"), "models", retry)
        data = body.get("data", body)
        if isinstance(data, dict):
            data = data.get("models") or data.get("items") or []
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def schema(self, url: str) -> dict[str, Any]:
        """A model's schema document from the URL `/models` gives. It may live on another host,
        so it is fetched like an output: without the API key, never from an internal address."""
        raw = self.download(url, max_bytes=MAX_API_BODY, op=f"schema {clip(url, 200)}").content
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidResponse("schema: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidResponse("schema: the answer is not a JSON object")
        return body

    def balance(self) -> Balance:
        """The account's available USD: the service answers without an envelope, each amount a
        money object; the old enveloped shape with plain numbers is read too."""
        body = self._retrying(lambda: self._api_call("GET", self.config.balance_url, "balance"), "balance")
        data = body if "available" in body else unwrap(body)
        return Balance(available=_usd(data.get("available")), raw=data)

    def model_costs(
        self, start: str, end: str, *, group_by: Sequence[str] = ("model", "api_key"), limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The account's own spend per UTC day (`start` inclusive, `end` exclusive): what it was
        really charged, which no prediction answer is relied on to say."""
        return self._daily("model-costs", start, end, group_by, limit)

    def model_usage(
        self, start: str, end: str, *, group_by: Sequence[str] = ("model", "api_key"), limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The account's own request counts per UTC day, shaped like `model_costs`."""
        return self._daily("model-usage", start, end, group_by, limit)

    def _daily(self, name: str, start: str, end: str, group_by: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """Every daily bucket over all pages. The ledger lives beside the balance endpoint (not
        enveloped, like it), so a balance URL set by hand moves it too."""
        url = f"{self.config.balance_url.rsplit('/', 1)[0]}/{name}"
        base: list[tuple[str, str | int]] = [("start_date", start), ("end_date", end), ("limit", limit)]
        base += [("group_by[]", g) for g in group_by]
        buckets: list[dict[str, Any]] = []
        page: str | None = None
        for _ in range(MAX_LEDGER_PAGES):
            params = base + ([("page", page)] if page else [])
            body = self._retrying(functools.partial(self._api_call, "GET", url, name, params=params), name)
            data = body.get("data")
            if not isinstance(data, list):
                raise InvalidResponse(f"{name}: no list of daily buckets in the answer")
            buckets += [b for b in data if isinstance(b, dict)]
            following = body.get("next_page")
            if not body.get("has_more") or not isinstance(following, str) or not following or following == page:
                return buckets
            page = following
        raise InvalidResponse(f"{name}: more than {MAX_LEDGER_PAGES} pages; narrow the dates")

    # -- files ---------------------------------------------------------------------------

    def _check_file_request(self, request: httpx.Request) -> None:
        check_fetchable(str(request.url), trusted_hosts=self._trusted)

    def download(self, url: str, *, max_bytes: int | None = None, op: str = "download output") -> Downloaded:
        """Stream an output to memory, cut at the size cap, retrying transient faults."""
        cap = max_bytes or self.config.max_output_bytes
        check_fetchable(url, trusted_hosts=self._trusted)

        def once() -> Downloaded:
            try:
                with self._files.stream("GET", url) as response:
                    status = response.status_code
                    if status >= 400:
                        small = int(response.headers.get("content-length") or 0) < 65536
                        text = response.read().decode("utf-8", "replace") if small else ""
                        if cloudflare_refused(status, text):
                            raise self._error(status, text, response.headers, op)
                        raise _download_error(status, response.headers, op)
                    length = response.headers.get("content-length")
                    if length and length.isdigit() and int(length) > cap:
                        raise BadOutput(f"{op}: {int(length)} bytes is over the {cap}-byte cap")
                    content = _read_capped(response, cap, what=op)
                    ctype = response.headers.get("content-type", "")
            except BadOutput:
                raise
            except httpx.TooManyRedirects:
                raise BadOutput(f"{op}: too many redirects") from None
            except httpx.TimeoutException as exc:
                raise TransientError(f"{op}: timed out ({type(exc).__name__})") from None
            except httpx.HTTPError as exc:
                raise TransientError(f"{op}: transfer failed ({type(exc).__name__})") from None
            return Downloaded(content=content, content_type=clip(ctype, 100))

        return self._retrying(once, op)


def catalogue_client(config: AtlasConfig) -> AtlasClient:
    """A client for `/models` and the schemas it names: each is read once, untried again, so a
    command facing a service that is down falls back to the built-in table without a wait."""
    return AtlasClient(config.with_(read_retry=Backoff(attempts=1)))


def _download_error(status: int, headers: Mapping[str, str], op: str) -> ServiceError:
    if status in (404, 410):
        return NotFound(f"{op}: HTTP {status} (the output is gone)", status=status)
    if status == 429:
        return RateLimited(f"{op}: HTTP 429", retry_after=parse_retry_after(headers.get("retry-after")))
    if status >= 500 or status == 408:
        return TransientError(f"{op}: HTTP {status}", status=status)
    return BadOutput(f"{op}: HTTP {status}", status=status)


def _read_capped(response: httpx.Response, cap: int, *, what: str = "answer") -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > cap:
            raise BadOutput(f"{what}: more than {cap} bytes; cut off")
        chunks.append(chunk)
    return b"".join(chunks)


def _safe_segment(value: str) -> str:
    """A prediction id from the service goes into a URL path: keep it one safe segment."""
    if not value or len(value) > 200 or not all(c.isalnum() or c in "-_." for c in value) or value in (".", ".."):
        raise BadRequest(f"refusing an unsafe prediction id {clip(value, 60)!r}")
    return value
