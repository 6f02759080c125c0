"""The sandbox's service logic, apart from HTTP: predictions, limits, billing, accounting.

Single-threaded (one asyncio loop), so no locks. Accounting is the ground truth a
test compares a run against: submissions per job fingerprint, uploads per content
hash, what was billed, and the highest submit rate and in-flight count seen.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from sandbox.catalogue import CATALOGUE, ServiceModel, check_size
from sandbox.ledger import Charge
from sandbox.settings import FAILED, RUNNING, SUCCEEDED, SandboxSettings, draw_delay

MAX_INPUT_BYTES = 10 * 1024 * 1024
KNOWN_PARAMS = {
    "prompt",
    "images",
    "size",
    "enable_sync_mode",
    "enable_base64_output",
    "max_images",
    "seed",
    "watermark",
    "output_format",
}


class ApiError(Exception):
    """An error answer: HTTP status, message, optional Retry-After."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class SandboxPrediction:
    id: str
    key: str
    model: ServiceModel
    prompt: str
    image_urls: list[str]
    params: dict[str, Any]
    size: tuple[int, int] | None
    n_outputs: int
    created: float
    delay: float
    outcome: str  # success | failed | failed_5xx | timeout
    spelling: str  # the final status it will show, from the set its outcome belongs to
    send_price: bool
    running_offset: int  # where in RUNNING its in-progress spellings start
    nsfw: list[bool]  # per output: flagged by the service's content check
    price_micros: int  # the live price when it was created: what it bills
    output_faults: list[str | None]
    status: str = "created"
    final: bool = False
    error: str | None = None
    completed: float | None = None
    inputs: list[str] = field(default_factory=list)  # content hashes
    fingerprint: str | None = None
    truncated_served: set[int] = field(default_factory=set)
    polls: int = 0
    seen_final_at: float | None = None  # the first poll that reported the final status

    @property
    def billable(self) -> bool:
        return self.final and self.status in SUCCEEDED

    def running_status(self, fixed: str) -> str:
        """The in-progress spelling of this poll: the same sequence for the same seed."""
        return fixed or RUNNING[(self.running_offset + self.polls) % len(RUNNING)]


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Service:
    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.http: httpx.AsyncClient | None = None
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.settings.seed)
        self.predictions: dict[str, SandboxPrediction] = {}
        self.uploads: dict[str, tuple[str, str, str]] = {}  # token -> (name, content type, sha)
        self.blobs: dict[str, bytes] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.recent_submits: collections.deque[float] = collections.deque()
        self.spent_micros: collections.Counter[str] = collections.Counter()
        self.frozen_micros: collections.Counter[str] = collections.Counter()
        self.charges: list[Charge] = []  # every billed prediction: the daily ledger's source
        self.counts: collections.Counter[str] = collections.Counter()
        self.by_fingerprint: collections.Counter[str] = collections.Counter()
        self.prompts_posted: collections.Counter[str] = collections.Counter()
        self.unanswered: set[str] = set()  # predictions created whose submit answer was dropped
        self.uploads_by_sha: collections.Counter[str] = collections.Counter()
        self.input_fetches_by_sha: collections.Counter[str] = collections.Counter()  # links fetched, by content
        self.user_agents: collections.Counter[str] = collections.Counter()  # every request but the admin area's
        self.peak_submit_rate = 0
        self.peak_in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.started = time.time()

    # -- request-level decisions -----------------------------------------------------------

    def authenticate(self, header: str | None) -> str:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing or malformed Authorization header")
        if self.settings.api_keys and token not in self.settings.api_keys:
            raise ApiError(401, "invalid API key")
        return token

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def inject_call_faults(self, kind: str) -> None:
        f = self.settings.faults
        if self.chance(f.rate_limited):
            self.counts[f"injected_429_{kind}"] += 1
            self.counts["http_429"] += 1
            raise ApiError(429, "rate limit exceeded (injected)", self.settings.fault_retry_after)
        if self.chance(f.server_error):
            self.counts[f"injected_5xx_{kind}"] += 1
            raise ApiError(self.rng.choice((500, 502, 503)), "internal server error (injected)")

    def bare(self) -> bool:
        return self.chance(self.settings.faults.bare_shape)

    def code(self, status: int) -> int | str:
        """The envelope's `code`: the service sends it as a string."""
        return status if self.chance(self.settings.faults.numeric_code) else str(status)

    def error_body(self, status: int, message: str, data: Any = None) -> dict[str, Any]:
        """An error answer: the text in `msg` (the first place the service's clients look), or
        the old `{code: <number>, message}` shape under its fault."""
        if self.chance(self.settings.faults.message_errors):
            return {"code": status, "message": message, "data": data}
        return {"code": self.code(status), "msg": message, "data": data}

    def warming_up(self, pred: SandboxPrediction) -> bool:
        """Right after a submit the service does not know its own prediction yet."""
        return time.time() - pred.created < self.settings.warmup_seconds

    def price_micros(self, model: ServiceModel) -> int:
        """The model's live price: a `prices` setting, else the catalogue's."""
        usd = self.settings.prices.get(model.id)
        return model.price_micros if usd is None else round(usd * 1_000_000)

    def live_prices(self) -> dict[str, int]:
        return {m.id: self.price_micros(m) for m in CATALOGUE.values()}

    def available_micros(self, key: str) -> int:
        return int(self.settings.balance_usd * 1_000_000) - self.spent_micros[key]

    # -- submit ----------------------------------------------------------------------------

    def submit(self, key: str, body: Any) -> SandboxPrediction:
        self.counts["submit_calls"] += 1
        if isinstance(body, dict):  # every POST that arrived, whatever its answer (the chaos invariants)
            self.prompts_posted[str(body.get("prompt"))] += 1
        self.inject_call_faults("submit")
        s = self.settings
        if s.submit_rate > 0:
            bucket = self.buckets.get(key)
            if bucket is None or bucket.rate != s.submit_rate or bucket.burst != s.burst:
                bucket = self.buckets[key] = TokenBucket(s.submit_rate, s.burst)
            wait = bucket.take()
            if wait > 0:
                self.counts["http_429"] += 1
                self.counts["rejected_rate"] += 1
                raise ApiError(429, "submit rate limit exceeded", max(1, int(wait + 0.999)))
        if s.max_in_flight > 0 and self.in_flight[key] >= s.max_in_flight:
            self.counts["http_429"] += 1
            self.counts["rejected_in_flight"] += 1
            raise ApiError(429, "too many predictions in progress", 1)
        model, params = self._validate(body)
        if self.available_micros(key) - self.frozen_micros[key] < self.price_micros(model):
            self.counts["rejected_balance"] += 1
            raise ApiError(402, "insufficient balance")
        pred = self._create(key, model, params)
        now = time.monotonic()
        self.recent_submits.append(now)
        while self.recent_submits and self.recent_submits[0] <= now - 1.0:
            self.recent_submits.popleft()
        self.peak_submit_rate = max(self.peak_submit_rate, len(self.recent_submits))
        return pred

    def _validate(self, body: Any) -> tuple[ServiceModel, dict[str, Any]]:
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        params = dict(body)
        nested = params.pop("input", None)
        if isinstance(nested, dict):
            params = {**nested, **params}
        model = CATALOGUE.get(str(params.pop("model", "")))
        if model is None:
            raise ApiError(400, f"model {body.get('model')!r} not found")
        unknown = sorted(set(params) - KNOWN_PARAMS)
        if unknown:
            raise ApiError(400, f"unknown parameter(s): {', '.join(unknown)}")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt is required")
        images = params.get("images")
        if not isinstance(images, list) or not 1 <= len(images) <= model.max_images:
            raise ApiError(400, f"images must be a list of 1 to {model.max_images} URLs")
        if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in images):
            raise ApiError(400, "images must be http(s) URLs")
        if "size" in params:
            checked = check_size(model, params["size"])
            if isinstance(checked, str):
                raise ApiError(400, checked)
        n = params.get("max_images", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 15 - len(images):
            raise ApiError(400, "max_images must be an integer, inputs plus outputs at most 15")
        return model, params

    def _create(self, key: str, model: ServiceModel, params: dict[str, Any]) -> SandboxPrediction:
        f = self.settings.faults
        seq = self.counts["created"]
        rng = random.Random(f"{self.settings.seed}:{seq}")
        roll = rng.random()
        outcome = "success"
        for name, rate in (("failed", f.failed), ("failed_5xx", f.failed_5xx), ("timeout", f.timeout_status)):
            if roll < rate:
                outcome = name
                break
            roll -= rate
        forced = self.settings.final_status
        if forced:
            outcome = "success" if forced in SUCCEEDED else "timeout" if forced == "timeout" else "failed"
            spelling = forced
        elif outcome == "success":
            spelling = "succeeded" if rng.random() < f.succeeded_spelling else rng.choice(SUCCEEDED)
        elif outcome == "timeout":
            spelling = "timeout"
        elif outcome == "failed_5xx":
            spelling = "failed"
        else:
            spelling = rng.choice(FAILED[:-1])
        n = 0 if f.no_outputs and rng.random() < f.no_outputs else int(params.get("max_images", 1))
        out_faults: list[str | None] = []
        for _ in range(n):
            fault = None
            for name in OUTPUT_FAULTS:
                if rng.random() < getattr(f, name):
                    fault = name
                    break
            out_faults.append(fault)
        size = check_size(model, params["size"]) if "size" in params else None
        pred = SandboxPrediction(
            id=uuid.uuid4().hex,  # unique across restarts, as the real service's are
            key=key,
            model=model,
            prompt=params["prompt"],
            image_urls=list(params["images"]),
            params=params,
            size=size if isinstance(size, tuple) else None,
            n_outputs=n,
            created=time.time(),
            delay=draw_delay(self.settings.delay, rng),
            outcome=outcome,
            spelling=spelling,
            send_price=rng.random() < f.send_price,
            running_offset=rng.randrange(len(RUNNING)),
            nsfw=[f.nsfw > 0 and rng.random() < f.nsfw for _ in range(n)],
            output_faults=out_faults,
            price_micros=self.price_micros(model),
        )
        self.counts["created"] += 1
        for fault in out_faults:
            if fault:
                self.counts[f"injected_{fault}"] += 1
        self.predictions[pred.id] = pred
        self.in_flight[key] += 1
        self.frozen_micros[key] += pred.price_micros
        self.peak_in_flight = max(self.peak_in_flight, sum(self.in_flight.values()))
        task = asyncio.get_running_loop().create_task(self._run(pred))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return pred

    # -- the life of a prediction ----------------------------------------------------------

    async def _run(self, pred: SandboxPrediction) -> None:
        started = time.monotonic()
        error = None
        hashes: list[str] = []
        for url in pred.image_urls:
            try:
                hashes.append(await self._fetch_input(url))
            except Exception as exc:
                error = f"failed to fetch input image {url[:200]}: {exc}"
                hashes.append("url:" + url)
        pred.inputs = hashes
        fp_source = {k: v for k, v in pred.params.items() if k != "images"}
        fp_source.update(model=pred.model.id, inputs=hashes)
        pred.fingerprint = hashlib.sha256(json.dumps(fp_source, sort_keys=True, default=str).encode()).hexdigest()
        self.by_fingerprint[pred.fingerprint] += 1
        pred.status = "running"
        remaining = pred.delay - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)
        self._finish(pred, error)

    async def _fetch_input(self, url: str) -> str:
        """The service fetches every input link itself, once the prediction exists: one it cannot
        fetch, or that is no image, fails the prediction unbilled. Every fetch is counted, and a
        signed link (a presigned S3 GET) on its own, so a test can see how inputs arrived."""
        token = _own_upload_token(url)
        if token is not None and token in self.uploads:
            self.counts["input_uploads_used"] += 1
            return self.uploads[token][2]
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10.0, follow_redirects=True, max_redirects=5)
        self.counts["input_fetches"] += 1
        if "X-Amz-Signature=" in url:
            self.counts["input_fetches_signed"] += 1
        try:
            sha = await self._download_input(url)
        except Exception:
            self.counts["input_fetch_failures"] += 1
            raise
        self.input_fetches_by_sha[sha] += 1
        return sha

    async def _download_input(self, url: str) -> str:
        assert self.http is not None
        async with self.http.stream("GET", url) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > MAX_INPUT_BYTES:
                    raise ValueError("larger than 10 MB")
        blob = bytes(data)
        try:
            with Image.open(io.BytesIO(blob)) as img:
                w, h = img.size
        except Exception:
            raise ValueError("not an image") from None
        if w <= 14 or h <= 14:
            raise ValueError("image sides must be larger than 14 px")
        sha = hashlib.sha256(blob).hexdigest()
        self.blobs.setdefault(sha, blob)
        return sha

    def _finish(self, pred: SandboxPrediction, error: str | None) -> None:
        pred.final = True
        pred.completed = time.time()
        self.in_flight[pred.key] -= 1
        self.frozen_micros[pred.key] -= pred.price_micros
        if error is not None:
            pred.status, pred.error = "failed", error
        elif pred.outcome in ("failed", "failed_5xx"):
            pred.status, pred.error = pred.spelling, "the model could not process this request (injected)"
        elif pred.outcome == "timeout":
            pred.status, pred.error = pred.spelling, "prediction timed out (injected)"
        else:
            pred.status = pred.spelling
        if pred.billable:
            self.spent_micros[pred.key] += pred.price_micros
            self.counts["billed"] += 1
            self.counts["billed_micros"] += pred.price_micros
            self.charges.append(Charge(pred.model.id, "image", pred.key, pred.price_micros, pred.completed))
        else:
            self.counts["not_billed"] += 1

    def view(self, pred: SandboxPrediction, base_url: str) -> dict[str, Any]:
        base = base_url.rstrip("/")
        out: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model.id,
            "status": pred.status if pred.final else pred.running_status(self.settings.running_status),
            "outputs": [],
            "error": None,
            "created_at": _iso(pred.created),
            "has_nsfw_contents": [],
        }
        if pred.final:
            out["completed_at"] = _iso(pred.completed or pred.created)
            out["metrics"] = {"predict_time": round(pred.delay, 3)}
            out["latency_ms"] = int(((pred.completed or pred.created) - pred.created) * 1000)
        if pred.billable:
            out["outputs"] = [output_url(base, pred.id, i, pred.output_faults[i]) for i in range(pred.n_outputs)]
            out["has_nsfw_contents"] = list(pred.nsfw)
            if pred.send_price:
                out["price"] = pred.price_micros / 1_000_000
        if pred.error:
            out["error"] = {"message": pred.error} if pred.outcome == "failed_5xx" else pred.error
        return out

    # -- uploads ---------------------------------------------------------------------------

    def store_upload(self, filename: str, content_type: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(sha, data)
        token = uuid.uuid4().hex
        self.uploads[token] = (filename, content_type, sha)
        self.uploads_by_sha[sha] += 1
        self.counts["uploads"] += 1
        return token

    # -- accounting ------------------------------------------------------------------------

    def accounting(self) -> dict[str, Any]:
        finals = [p for p in self.predictions.values() if p.final]
        return {
            "submit_calls": self.counts["submit_calls"],
            "created": self.counts["created"],
            "finished": len(finals),
            "in_flight": sum(self.in_flight.values()),
            "billed_count": self.counts["billed"],
            "billed_micros": self.counts["billed_micros"],
            "billed_usd": f"{self.counts['billed_micros'] / 1_000_000:.6f}",
            "not_billed": self.counts["not_billed"],
            "by_status": dict(collections.Counter(p.status for p in self.predictions.values())),
            "submissions_by_fingerprint": dict(self.by_fingerprint),
            "prompts_posted": dict(self.prompts_posted),
            "prediction_ids": sorted(self.predictions),
            "answered_prediction_ids": sorted(set(self.predictions) - self.unanswered),
            "duplicate_fingerprints": sorted(fp for fp, n in self.by_fingerprint.items() if n > 1),
            "uploads": self.counts["uploads"],
            "uploads_by_sha": dict(self.uploads_by_sha),
            "input_fetches": self.counts["input_fetches"],
            "input_fetches_signed": self.counts["input_fetches_signed"],
            "input_fetch_failures": self.counts["input_fetch_failures"],
            "input_fetches_by_sha": dict(self.input_fetches_by_sha),
            "peak_submit_rate": self.peak_submit_rate,
            "peak_in_flight": self.peak_in_flight,
            "http_429": self.counts["http_429"],
            "rejected_rate": self.counts["rejected_rate"],
            "rejected_in_flight": self.counts["rejected_in_flight"],
            "polls": self.counts["polls"],
            "user_agents": dict(self.user_agents),
            "counts": dict(self.counts),
        }


OUTPUT_FAULTS = (
    "output_404",
    "output_slow",
    "output_truncated",
    "output_corrupt",
    "output_internal",
    "output_redirect_loop",
    "output_endless",
)


def output_url(base: str, pid: str, index: int, fault: str | None) -> str:
    """Where an output is said to be: hostile faults point somewhere a client must not follow."""
    if fault == "output_internal":  # the same server under another local name: fetching it is counted
        parts = urlsplit(base)
        return f"{parts.scheme}://localhost:{parts.port}/files/bait/{pid}/{index}.jpeg"
    if fault == "output_redirect_loop":
        return f"{base}/files/loop/{pid}/{index}/0"
    return f"{base}/files/outputs/{pid}/{index}.jpeg"


def _own_upload_token(url: str) -> str | None:
    marker = "/files/uploads/"
    if marker not in url:
        return None
    return url.split(marker, 1)[1].split("/", 1)[0]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
