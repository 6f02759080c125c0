"""Reading what Atlas Cloud sends back: envelopes, statuses, outputs, errors, prices.

Everything here is untrusted input. Both documented shapes are accepted (the
`{"code", "message", "data"}` envelope and a bare payload), every status spelling
is normalised, and nothing the service sends can crash the reader: malformed
fields become `None`, and odd values are cut to a sane length.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_TEXT = 2000  # characters kept of any message the service sends
MAX_OUTPUTS = 64


class State(enum.Enum):
    """What a prediction's status means to us, whatever its spelling."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_RUNNING = {"created", "starting", "queued", "processing", "pending", "running", "in_progress"}
_SUCCEEDED = {"completed", "succeeded", "success"}
_FAILED = {"failed", "error", "timeout", "canceled", "cancelled"}


def classify(status: object) -> State:
    """Map a status string to a State; an unknown one is still running (callers keep a deadline)."""
    if not isinstance(status, str):
        return State.RUNNING
    s = status.strip().lower()
    if s in _SUCCEEDED:
        return State.SUCCEEDED
    if s in _FAILED:
        return State.FAILED
    return State.RUNNING


def unwrap(body: object) -> dict[str, Any]:
    """The payload of an answer: `data` when the envelope is there, the top level otherwise."""
    if not isinstance(body, dict):
        return {}
    data = body.get("data")
    if isinstance(data, dict):
        return data
    return body


def envelope_code(body: object) -> int | None:
    """The envelope's own `code` when it is HTTP-like, a number or a string of digits (the
    service sends `"200"`), else None."""
    if isinstance(body, dict):
        code = body.get("code")
        if isinstance(code, str) and code.strip().isdigit() and len(code.strip()) == 3:
            code = int(code.strip())
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
            return code
    return None


def clip(value: object, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def message_of(body: object) -> str | None:
    """The human message in an error answer, wherever this model or endpoint put it."""
    if isinstance(body, str):
        return clip(body) if body.strip() else None
    if not isinstance(body, dict):
        return None
    data = body.get("data")
    for candidate in (
        error_text(data.get("error")) if isinstance(data, dict) else None,
        body.get("msg") if isinstance(body.get("msg"), str) else None,
        body.get("message") if isinstance(body.get("message"), str) else None,
        error_text(body.get("error")),
        body.get("detail") if isinstance(body.get("detail"), str) else None,
    ):
        if candidate and str(candidate).strip():
            return clip(candidate)
    return None


def error_text(err: object) -> str | None:
    """`error` is a string on some models and an object (message/msg/detail) on others."""
    if err is None or err == "":
        return None
    if isinstance(err, str):
        return clip(err)
    if isinstance(err, dict):
        for key in ("message", "msg", "detail", "error"):
            value = err.get(key)
            if isinstance(value, str) and value.strip():
                return clip(value)
        return clip(err)
    return clip(err)


def _outputs(payload: dict[str, Any]) -> tuple[str, ...]:
    raw = payload.get("outputs")
    if raw is None:
        raw = payload.get("output")
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    urls: list[str] = []
    for item in items[:MAX_OUTPUTS]:
        if isinstance(item, dict):
            item = item.get("url")
        if isinstance(item, str) and item.strip():
            urls.append(item.strip())
    return tuple(urls)


def _price_micros(value: object) -> int | None:
    """USD as sent (number or string) to integer micro-dollars; None when absent or absurd."""
    if value is None or isinstance(value, bool):
        return None
    try:
        usd = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not usd.is_finite() or usd < 0 or usd > 1000:
        return None
    return int((usd * 1_000_000).to_integral_value())


def _flags(value: object) -> tuple[bool, ...]:
    """`has_nsfw_contents`: one boolean per output; anything else reads as no flags."""
    if not isinstance(value, list):
        return ()
    return tuple(v is True for v in value[:MAX_OUTPUTS])


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Prediction:
    """One poll's view of a prediction, already normalised."""

    id: str
    status: str
    state: State
    outputs: tuple[str, ...] = ()
    error: str | None = None
    error_code: str | None = None
    price_micros: int | None = None
    predict_time: float | None = None
    model: str | None = None
    nsfw: tuple[bool, ...] = ()  # per output: the service's content check flagged it (it may be blank)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.state is not State.RUNNING

    @property
    def flagged(self) -> list[int]:
        """The indexes of the outputs the service flagged as NSFW."""
        return [i for i, flag in enumerate(self.nsfw) if flag]

    @classmethod
    def from_body(cls, body: object, *, fallback_id: str = "") -> Prediction:
        payload = unwrap(body)
        pid = payload.get("id")
        status = payload.get("status")
        status_text = clip(status, 64) if isinstance(status, str) else ""
        metrics = payload.get("metrics")
        code = payload.get("error_code")
        model = payload.get("model")
        return cls(
            id=clip(pid, 200) if isinstance(pid, str) and pid else fallback_id,
            status=status_text,
            state=classify(status),
            outputs=_outputs(payload),
            error=error_text(payload.get("error")),
            error_code=clip(code, 200) if code not in (None, "") else None,
            price_micros=_price_micros(payload.get("price")),
            predict_time=_float(metrics.get("predict_time")) if isinstance(metrics, dict) else None,
            model=model if isinstance(model, str) else None,
            nsfw=_flags(payload.get("has_nsfw_contents")),
            raw=payload,
        )


def has_final_verdict(body: object) -> bool:
    """True when an error answer (e.g. HTTP 500) carries a prediction's final status."""
    payload = unwrap(body)
    return "status" in payload and classify(payload.get("status")) is not State.RUNNING
