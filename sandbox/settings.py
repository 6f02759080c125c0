"""What the sandbox does: timing, limits, and how often each fault is injected.

Settings can be changed while it runs (`POST /_sandbox/config`), so one server
serves a whole test session; every random choice comes from a seeded generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Every status spelling the service's own clients accept (atlas-api.md, "Prediction").
RUNNING = ("created", "pending", "starting", "queued", "processing", "running")
SUCCEEDED = ("completed", "succeeded", "success")
FAILED = ("failed", "error", "canceled", "cancelled", "timeout")


@dataclass
class Faults:
    """Probabilities in [0, 1] of each fault; all off by default."""

    rate_limited: float = 0.0  # any API call answered 429 with Retry-After (a storm)
    server_error: float = 0.0  # any API call answered a plain 5xx, no verdict, nothing created
    failed: float = 0.0  # the prediction ends `failed` (not billed)
    failed_5xx: float = 0.0  # the prediction fails and its polls answer HTTP 500 carrying the verdict
    timeout_status: float = 0.0  # the prediction ends with status `timeout` (not billed)
    drop_submit: float = 0.0  # the prediction is created, then the connection drops before the answer
    output_404: float = 0.0  # an output URL answers 404 (expired)
    output_slow: float = 0.0  # an output is served after `slow_output_seconds`
    output_truncated: float = 0.0  # the first transfer of an output stops half-way
    output_corrupt: float = 0.0  # an output is garbage bytes served as image/jpeg
    output_internal: float = 0.0  # an output URL names a local host other than the service (bait if fetched)
    output_redirect_loop: float = 0.0  # an output URL redirects to the next one, forever
    output_endless: float = 0.0  # an output is an image/jpeg stream with no length that never ends
    bare_shape: float = 0.0  # an answer comes without the {code, message, data} envelope
    succeeded_spelling: float = 0.0  # a finished prediction says `succeeded`, whatever spelling was drawn
    send_price: float = 0.0  # a finished prediction carries a `price` field (the service sends none)
    numeric_code: float = 0.0  # an envelope's `code` is the number 200 (or the error's status), not a string
    message_errors: float = 0.0  # an error body puts its text in `message` with a numeric code (the old shape)
    enveloped_balance: float = 0.0  # the balance answers `{code, message, data: {available: <number>, ...}}`
    no_outputs: float = 0.0  # a prediction completes, is billed, and lists no outputs
    nsfw: float = 0.0  # an output is flagged in `has_nsfw_contents`


@dataclass
class SandboxSettings:
    seed: int = 0
    delay: str = "fixed:0"  # fixed:S | lognormal:MEDIAN:SIGMA | uniform:LOW:HIGH (seconds)
    submit_rate: float = 0.0  # accepted submits per second per key; 0 means no limit
    submit_burst: int = 0  # bucket size; 0 means max(1, submit_rate)
    max_in_flight: int = 0  # predictions in progress per key; 0 means no limit
    fault_retry_after: int = 1  # Retry-After sent with injected 429s
    slow_output_seconds: float = 3.0
    balance_usd: float = 10_000.0
    api_keys: list[str] = field(default_factory=list)  # empty: any non-empty key is accepted
    max_upload_bytes: int = 10 * 1024 * 1024
    warmup_seconds: float = 2.0  # a prediction's polls answer 404 this long after its submit
    check_user_agent: bool = True  # refuse a library's default User-Agent as Cloudflare does (error 1010)
    poll_latency: float = 0.0  # seconds every status GET takes to answer (the service's take up to ~25)
    running_status: str = ""  # every in-progress answer uses this spelling; "" cycles through them all
    final_status: str = ""  # every prediction ends with this spelling (its outcome to match); "" draws one
    # live prices in USD by model id, unlike the catalogue's: /models, billing and predictions follow
    prices: dict[str, float] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial dict (as sent to the admin endpoint); unknown names are refused."""
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown sandbox setting {name!r}")
            if name == "faults":
                fault_names = {f.name for f in fields(Faults)}
                for fname, rate in dict(value).items():
                    if fname not in fault_names:
                        raise ValueError(f"unknown fault {fname!r}")
                    rate = float(rate)
                    if not 0.0 <= rate <= 1.0:
                        raise ValueError(f"fault {fname} must be within 0..1")
                    setattr(self.faults, fname, rate)
            elif name == "prices":
                prices = {str(model): float(usd) for model, usd in dict(value).items()}
                if any(not 0.0 < usd < 1000.0 for usd in prices.values()):
                    raise ValueError("prices must be USD amounts above 0")
                self.prices = prices
            else:
                current = getattr(self, name)
                setattr(self, name, type(current)(value) if not isinstance(current, list) else list(value))
        parse_delay(self.delay)  # refuse a bad spec now, not at the next submit
        if self.running_status not in ("", *RUNNING):
            raise ValueError(f"running_status must be one of {', '.join(RUNNING)}")
        if self.final_status not in ("", *SUCCEEDED, *FAILED):
            raise ValueError(f"final_status must be one of {', '.join(SUCCEEDED + FAILED)}")

    @property
    def burst(self) -> float:
        return float(self.submit_burst) if self.submit_burst > 0 else max(1.0, self.submit_rate)


def parse_delay(spec: str) -> tuple[str, tuple[float, ...]]:
    kind, _, rest = spec.partition(":")
    args = tuple(float(x) for x in rest.split(":") if x) if rest else ()
    expected = {"fixed": 1, "lognormal": 2, "uniform": 2}
    if kind not in expected or len(args) != expected[kind] or any(a < 0 for a in args):
        raise ValueError(f"delay {spec!r}: use fixed:S, lognormal:MEDIAN:SIGMA or uniform:LOW:HIGH (seconds)")
    return kind, args


def draw_delay(spec: str, rng: random.Random) -> float:
    kind, args = parse_delay(spec)
    if kind == "fixed":
        return args[0]
    if kind == "uniform":
        return rng.uniform(args[0], args[1])
    median, sigma = args
    return 0.0 if median == 0 else min(600.0, rng.lognormvariate(math.log(median), sigma))
