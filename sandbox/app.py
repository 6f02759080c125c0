"""The sandbox's HTTP surface: Atlas's routes (`/api/v1/...`, `/public/v1/balance`, the daily
ledger `/public/v1/model-costs` and `/model-usage`), the files and model schemas it serves, and
a separate admin area (`/_sandbox/...`) for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sandbox import ledger
from sandbox.catalogue import CATALOGUE, models_payload, schema_document, schema_name
from sandbox.render import render
from sandbox.service import ApiError, SandboxPrediction, Service
from sandbox.settings import SandboxSettings

_RENDER_CACHE_SIZE = 256


class _Dropped(Exception):
    """Raised after the response started, so the server closes the connection mid-answer."""


class _DroppedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Dropped) and "_Dropped" not in record.getMessage()


class DropAfterHeaders:
    """An answer that starts (status line, headers) and then loses the connection."""

    def __init__(self, partial: bytes = b"", length: int = 512, content_type: bytes = b"application/json") -> None:
        self.partial, self.length, self.content_type = partial, length, content_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", self.content_type),
                    (b"content-length", str(self.length).encode()),
                ],
            }
        )
        if self.partial:
            await send({"type": "http.response.body", "body": self.partial, "more_body": True})
        raise _Dropped()


async def _endless(service: Service, head: bytes) -> AsyncIterator[bytes]:
    """A JPEG's first bytes, then filler for as long as the client keeps reading."""
    chunk = b"\x00" * 65536
    service.counts["endless_bytes"] += len(head)
    yield head
    while True:
        service.counts["endless_bytes"] += len(chunk)
        yield chunk
        await asyncio.sleep(0)


def _envelope(service: Service, data: Any) -> JSONResponse:
    if service.bare():
        return JSONResponse(data)
    return JSONResponse({"code": service.code(200), "message": "success", "data": data})


def _money(micros: int) -> dict[str, str]:
    return {"value": f"{micros / 1_000_000:.6f}", "currency": "usd"}


# The User-Agents Cloudflare's browser integrity check refuses in front of the service: a
# library's default, or none at all (atlas-api.md, "User-Agent").
LIBRARY_AGENTS = ("python-httpx/", "python-requests/", "python-urllib/", "curl/", "go-http-client", "aiohttp")
API_PREFIXES = ("/api/", "/public/")


def refused_agent(agent: str) -> bool:
    agent = agent.strip().lower()
    return not agent or agent.startswith(LIBRARY_AGENTS) or "aiohttp" in agent


class CloudflareCheck:
    """In front of every API route, as the CDN is: the admin area and served files pass."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sandbox/"):
            await self.app(scope, receive, send)
            return
        agent = dict(scope["headers"]).get(b"user-agent", b"").decode("latin-1")
        self.service.user_agents[agent[:200]] += 1
        checked = scope["path"].startswith(API_PREFIXES) and self.service.settings.check_user_agent
        if checked and refused_agent(agent):
            self.service.counts["refused_user_agent"] += 1
            await Response("error code: 1010", status_code=403, media_type="text/plain")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: SandboxSettings | None = None) -> Starlette:
    service = Service(settings or SandboxSettings())
    rendered: dict[tuple[str, int], bytes] = {}

    def _error(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(service.error_body(exc.status, exc.message), status_code=exc.status, headers=headers)

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def submit(request: Request) -> Response:
        try:
            key = service.authenticate(request.headers.get("authorization"))
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "request body is not valid JSON") from None
            pred = service.submit(key, body)
        except ApiError as exc:
            return _error(exc)
        service.counts[f"created_from:{request.client.host if request.client else '?'}"] += 1
        if service.chance(service.settings.faults.drop_submit):
            service.counts["dropped_submit_answers"] += 1
            service.unanswered.add(pred.id)
            return DropAfterHeaders()  # type: ignore[return-value]
        return _envelope(service, {"id": pred.id, "status": "created", "model": pred.model.id})

    def owned(request: Request, key: str) -> SandboxPrediction:
        pred = service.predictions.get(request.path_params["pid"])
        if pred is None or pred.key != key:
            raise ApiError(404, "prediction not found")
        return pred

    async def prediction(request: Request) -> Response:
        service.counts["polls"] += 1
        try:
            key = service.authenticate(request.headers.get("authorization"))
            service.inject_call_faults("poll")
            pred = owned(request, key)
            if service.settings.poll_latency > 0:
                await asyncio.sleep(service.settings.poll_latency)
            if service.warming_up(pred):
                service.counts["warmup_404"] += 1
                raise ApiError(404, "prediction not found")
        except ApiError as exc:
            return _error(exc)
        pred.polls += 1
        if pred.final and pred.seen_final_at is None:
            pred.seen_final_at = time.time()
        view = service.view(pred, base(request))
        if pred.final and pred.outcome == "failed_5xx":
            return JSONResponse(service.error_body(500, "prediction failed", view), status_code=500)
        return _envelope(service, view)

    async def upload(request: Request) -> Response:
        try:
            service.authenticate(request.headers.get("authorization"))
            service.inject_call_faults("upload")
            limit = service.settings.max_upload_bytes
            async with request.form(max_files=1, max_fields=4, max_part_size=limit + 1) as form:
                item = form.get("file")
                if item is None or isinstance(item, str):
                    raise ApiError(400, "multipart field 'file' is required")
                data = await item.read()
                name = (item.filename or "upload.bin").replace("/", "_")[-120:] or "upload.bin"
                ctype = item.content_type or "application/octet-stream"
            if len(data) > limit:
                raise ApiError(413, "file too large")
        except ApiError as exc:
            return _error(exc)
        token = service.store_upload(name, ctype, data)
        url = f"{base(request)}/files/uploads/{token}/{name}"
        return _envelope(service, {"download_url": url, "file_name": name, "content_type": ctype, "size": len(data)})

    async def uploaded_file(request: Request) -> Response:
        entry = service.uploads.get(request.path_params["token"])
        if entry is None:
            return Response(status_code=404)
        _name, ctype, sha = entry
        return Response(service.blobs[sha], media_type=ctype)

    async def output_file(request: Request) -> Response:
        pred = service.predictions.get(request.path_params["pid"])
        try:
            index = int(request.path_params["name"].split(".")[0])
        except ValueError:
            return Response(status_code=404)
        if pred is None or not pred.billable or not 0 <= index < pred.n_outputs:
            return Response(status_code=404)
        service.counts["output_downloads"] += 1
        fault = pred.output_faults[index]
        if fault == "output_404":
            return Response(status_code=404)
        if fault == "output_corrupt":
            return Response(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, media_type="image/jpeg")
        cache_key = (pred.id, index)
        data = rendered.get(cache_key)
        if data is None:
            data = await run_in_threadpool(render, service.blobs[pred.inputs[0]], pred.prompt, pred.size, index)
            if len(rendered) >= _RENDER_CACHE_SIZE:
                rendered.pop(next(iter(rendered)))
            rendered[cache_key] = data
        if fault == "output_endless":
            service.counts["endless_streams"] += 1
            return StreamingResponse(_endless(service, data), media_type="image/jpeg")
        if fault == "output_slow":
            await asyncio.sleep(service.settings.slow_output_seconds)
        if fault == "output_truncated" and index not in pred.truncated_served:
            pred.truncated_served.add(index)
            return DropAfterHeaders(data[: len(data) // 2], len(data), b"image/jpeg")  # type: ignore[return-value]
        return Response(data, media_type="image/jpeg")

    async def bait_file(request: Request) -> Response:
        """Reached only by a client that followed an output URL to a local address."""
        service.counts["bait_fetches"] += 1
        return await output_file(request)

    async def loop_file(request: Request) -> Response:
        service.counts["redirect_hops"] += 1
        p = request.path_params
        hop = int(p["hop"]) if p["hop"].isdigit() else 0
        return RedirectResponse(f"{base(request)}/files/loop/{p['pid']}/{p['index']}/{hop + 1}", status_code=302)

    async def history(request: Request) -> Response:
        try:
            key = service.authenticate(request.headers.get("authorization"))
            q = request.query_params
            page = max(1, int(q.get("no", "1")))
            size = max(1, min(100, int(q.get("size", "10"))))
        except ApiError as exc:
            return _error(exc)
        except ValueError:
            return _error(ApiError(400, "no and size must be integers"))
        items = [p for p in service.predictions.values() if p.key == key]
        if q.get("model"):
            items = [p for p in items if p.model.id == q["model"]]
        if q.get("status"):
            items = [p for p in items if p.status == q["status"]]
        if q.get("sessionID"):
            items = [p for p in items if p.id == q["sessionID"]]
        items.sort(key=lambda p: p.created, reverse=True)
        chunk = items[(page - 1) * size : page * size]
        b = base(request)
        rows = [
            {
                "ID": p.id,
                "status": p.status,
                "model": p.model.id,
                "createdAt": int(p.created),
                "result": {"outputs": service.view(p, b)["outputs"]},
            }
            for p in chunk
        ]
        return _envelope(service, {"items": rows, "total": len(items)})

    async def models(request: Request) -> Response:
        return _envelope(service, models_payload(base(request), service.live_prices()))

    async def model_schema(request: Request) -> Response:
        """The document a model's `schema` URL in /models names (public, like /models)."""
        for model in CATALOGUE.values():
            if schema_name(model.id) == request.path_params["name"]:
                return JSONResponse(schema_document(model))
        return JSONResponse({"code": 404, "message": "schema not found", "data": None}, status_code=404)

    async def balance(request: Request) -> Response:
        try:
            key = service.authenticate(request.headers.get("authorization"))
        except ApiError as exc:
            return _error(exc)
        cash, frozen = service.available_micros(key), service.frozen_micros[key]
        if service.chance(service.settings.faults.enveloped_balance):
            old = {"available": cash / 1_000_000, "cash": cash / 1_000_000, "bonus": 0, "frozen": frozen / 1_000_000}
            return JSONResponse({"code": 200, "message": "success", "data": old})
        return JSONResponse(
            {
                "object": "balance",
                "scope": "account",
                "account": {"id": "acct_sandbox", "name": "sandbox", "type": "personal"},
                "available": _money(cash - frozen),
                "cash": _money(cash),
                "bonus": _money(0),
                "frozen": _money(frozen),
                "request_id": uuid.uuid4().hex,
            }
        )

    async def daily(request: Request) -> Response:
        """Unenveloped, like the balance: the account's charges per UTC day."""
        try:
            key = service.authenticate(request.headers.get("authorization"))
        except ApiError as exc:
            return _error(exc)
        kind = "costs" if request.url.path.endswith("model-costs") else "usage"
        params = {name: request.query_params.getlist(name) for name in request.query_params}
        try:
            return JSONResponse(ledger.answer(kind, service.charges, key, params, time.time()))
        except ledger.LedgerQueryError as exc:
            return _error(ApiError(400, str(exc)))

    # -- admin (tests only; not part of the API) --------------------------------------------

    async def admin_accounting(request: Request) -> Response:
        return JSONResponse(service.accounting())

    async def admin_config(request: Request) -> Response:
        if request.method == "POST":
            try:
                service.settings.update(json.loads(await request.body() or b"{}"))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(service.settings.to_dict())

    async def admin_reset(request: Request) -> Response:
        for task in list(service.tasks):
            task.cancel()
        body = json.loads(await request.body() or b"{}")
        fresh = SandboxSettings()
        try:
            fresh.update(body.get("settings") or {})
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        service.settings = fresh
        service.reset()
        rendered.clear()
        return JSONResponse({"ok": True})

    async def admin_health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def admin_timeline(request: Request) -> Response:
        """Per prediction: when it was created and finished, how often it was polled and when the
        final status was first seen (the benchmarks' raw data)."""
        rows = [
            [p.created, p.completed, p.polls, p.seen_final_at, p.delay]
            for p in sorted(service.predictions.values(), key=lambda p: p.created)
        ]
        return JSONResponse({"columns": ["created", "completed", "polls", "seen_final_at", "delay"], "rows": rows})

    async def admin_prediction(request: Request) -> Response:
        pred = service.predictions.get(request.path_params["pid"])
        if pred is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(
            {
                "id": pred.id,
                "status": pred.status,
                "final": pred.final,
                "fingerprint": pred.fingerprint,
                "billable": pred.billable,
                "output_faults": pred.output_faults,
                "nsfw": pred.nsfw,
                "outcome": pred.outcome,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if service.http is not None:
            await service.http.aclose()

    logging.getLogger("uvicorn.error").addFilter(_DroppedFilter())
    app = Starlette(
        routes=[
            Route("/api/v1/model/generateImage", submit, methods=["POST"]),
            Route("/api/v1/model/prediction/{pid}", prediction, methods=["GET"]),
            Route("/api/v1/model/uploadMedia", upload, methods=["POST"]),
            Route("/api/v1/model/history", history, methods=["GET"]),
            Route("/api/v1/models", models, methods=["GET"]),
            Route("/public/v1/balance", balance, methods=["GET"]),
            Route("/schemas/{name}", model_schema, methods=["GET"]),
            Route("/public/v1/model-costs", daily, methods=["GET"]),
            Route("/public/v1/model-usage", daily, methods=["GET"]),
            Route("/files/uploads/{token}/{name}", uploaded_file, methods=["GET"]),
            Route("/files/outputs/{pid}/{name}", output_file, methods=["GET"]),
            Route("/files/bait/{pid}/{name}", bait_file, methods=["GET"]),
            Route("/files/loop/{pid}/{index}/{hop}", loop_file, methods=["GET"]),
            Route("/_sandbox/accounting", admin_accounting, methods=["GET"]),
            Route("/_sandbox/config", admin_config, methods=["GET", "POST"]),
            Route("/_sandbox/reset", admin_reset, methods=["POST"]),
            Route("/_sandbox/health", admin_health, methods=["GET"]),
            Route("/_sandbox/predictions/{pid}", admin_prediction, methods=["GET"]),
            Route("/_sandbox/timeline", admin_timeline, methods=["GET"]),
        ],
        lifespan=lifespan,
        middleware=[Middleware(CloudflareCheck, service=service)],
    )
    app.state.service = service
    return app
