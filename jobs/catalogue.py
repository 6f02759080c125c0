"""The service's own catalogue (`GET /models`): live prices and each model's schema.

Prices change on the service before they change in a release, so the price a run
reserves and charges comes from `/models` when it answers. The built-in table is
only the fallback (said so, never fatal), and a user's models file still wins.
`price.actual` is what the service charges: it is already the discounted price
(`price.origin` is the one before, `price.discount` the percentage the official
client shows), so the discount is shown, never applied a second time.

One `/models` read per command, and each schema document read at most once (keyed
by its URL): both cost a round trip, and `validate` may be run on every save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from manifests.errors import ConfigError, SeedreamError
from manifests.models import ModelTable, micros_to_usd, usd_to_micros
from manifests.service_schema import SchemaUnusable, ServiceSchema

LIVE, BUILTIN, MODELS_FILE = "models-endpoint", "built-in table", "models file"


class CatalogueClient(Protocol):
    def models(self) -> list[dict[str, Any]]: ...

    def schema(self, url: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Catalogue:
    """What one read of `/models` gave: entries by model id, or why there are none."""

    entries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    read_at: float | None = None
    error: str | None = None

    @classmethod
    def read(cls, client: CatalogueClient) -> Catalogue:
        try:
            listed = client.models()
        except SeedreamError as exc:
            return cls(error=str(exc))
        entries = {str(m["model"]): m for m in listed if isinstance(m.get("model"), str)}
        return cls(entries=entries, read_at=time.time())

    def entry(self, model: str) -> tuple[Mapping[str, Any] | None, str]:
        """The model's entry, or None and why there is none."""
        if self.error is not None:
            return None, f"/models could not be read ({self.error})"
        entry = self.entries.get(model)
        return (entry, "") if entry is not None else (None, "/models does not list it")

    def price(self, model: str) -> tuple[int | None, str]:
        """The live price of `model` in micro-dollars, or None and why there is none."""
        entry, why = self.entry(model)
        if entry is None:
            return None, why
        actual = _dig(entry, "price", "actual")
        value = actual.get("base_price") if isinstance(actual, Mapping) else None
        try:
            micros = usd_to_micros(value) if value is not None else None
        except ConfigError:
            micros = None
        if not micros:
            return None, f"/models gives no usable price.actual.base_price ({value!r})"
        return micros, ""

    def discount(self, model: str) -> str:
        """' (discount N%, $X before)' when /models says the price is discounted, else ''."""
        entry = self.entries.get(model) or {}
        discount = _dig(entry, "price", "discount")
        origin = _dig(entry, "price", "origin", "base_price")
        if discount in (None, "", "100", 100):
            return ""
        try:
            before = f", ${micros_to_usd(usd_to_micros(origin))} before" if origin is not None else ""
        except ConfigError:
            before = ""
        return f" (discount {discount}%{before})"

    def schema_url(self, model: str) -> tuple[str | None, str]:
        entry, why = self.entry(model)
        if entry is None:
            return None, why
        url = entry.get("schema")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return None, "/models gives no schema URL"
        return url, ""


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


@dataclass
class Prices:
    """The price of every model in the table, where each came from, and when /models was read."""

    table: ModelTable
    sources: dict[str, str]
    read_at: float | None
    why_not_live: dict[str, str]
    discounts: dict[str, str]

    @classmethod
    def resolve(cls, table: ModelTable, catalogue: Catalogue | None) -> Prices:
        live: dict[str, int] = {}
        sources: dict[str, str] = {}
        why: dict[str, str] = {}
        discounts: dict[str, str] = {}
        for model in table.models:
            if model in table.priced_by_file:
                sources[model] = MODELS_FILE
                continue
            price, reason = catalogue.price(model) if catalogue is not None else (None, "/models was not read")
            if price is None:
                sources[model], why[model] = BUILTIN, reason
            else:
                live[model], sources[model] = price, LIVE
                discounts[model] = catalogue.discount(model) if catalogue is not None else ""
        read_at = catalogue.read_at if catalogue is not None else None
        return cls(table.with_prices(live), sources, read_at, why, discounts)

    def meta(self) -> dict[str, Any]:
        """What a run stores (Redis meta and run.json): workers charge `prices` when a
        prediction carries none."""
        return {
            "prices": {m: s.price_micros for m, s in self.table.models.items()},
            "price_sources": dict(self.sources),
            "prices_read_at": _iso(self.read_at) if self.read_at is not None else None,
        }

    def lines(self, models: Iterable[str]) -> list[str]:
        """One line per model: its price and where it came from."""
        out = []
        for model in sorted(set(models)):
            source = self.sources.get(model, BUILTIN)
            if source == LIVE:
                where = f"from /models, read at {_iso(self.read_at or 0)}{self.discounts.get(model, '')}"
            elif source == MODELS_FILE:
                where = "from the models file"
            else:
                where = f"from the built-in table: {self.why_not_live.get(model, '/models was not read')}"
            out.append(f"price {model}: ${micros_to_usd(self.table.models[model].price_micros)} {where}")
        return out

    def to_dict(self, models: Iterable[str]) -> dict[str, Any]:
        return {
            m: {
                "price_usd": micros_to_usd(self.table.models[m].price_micros),
                "source": self.sources.get(m, BUILTIN),
                **({"read_at": _iso(self.read_at)} if self.sources.get(m) == LIVE and self.read_at else {}),
                **({"why_not_live": self.why_not_live[m]} if m in self.why_not_live else {}),
            }
            for m in sorted(set(models))
        }


class Schemas:
    """Each model's schema as the service publishes it, fetched on first need, one read per
    URL; a schema that cannot be had leaves the project's own rules to decide, and says so."""

    def __init__(self, catalogue: Catalogue, fetch: Callable[[str], object] | None) -> None:
        self.catalogue = catalogue
        self.fetch = fetch
        self._documents: dict[str, object | SeedreamError] = {}
        self._by_model: dict[str, ServiceSchema | str] = {}

    def __call__(self, model: str) -> ServiceSchema | None:
        found = self._by_model.get(model)
        if found is None:
            found = self._by_model[model] = self._load(model)
        return found if isinstance(found, ServiceSchema) else None

    def _load(self, model: str) -> ServiceSchema | str:
        url, reason = self.catalogue.schema_url(model)
        if url is None or self.fetch is None:
            return reason or "no schema reader"
        if url not in self._documents:
            try:
                self._documents[url] = self.fetch(url)
            except SeedreamError as exc:
                self._documents[url] = exc
        document = self._documents[url]
        if isinstance(document, SeedreamError):
            return f"{url}: {document}"
        try:
            return ServiceSchema.from_document(model, document)
        except SchemaUnusable as exc:
            return f"{url}: {exc}"

    def used(self) -> dict[str, str | None]:
        """Each model asked for: None when its service schema was used, else why not."""
        return {m: None if isinstance(v, ServiceSchema) else v for m, v in self._by_model.items()}

    def lines(self) -> list[str]:
        out = []
        for model, reason in sorted(self.used().items()):
            if reason is None:
                out.append(f"checked against the service's schema for {model}")
            else:
                out.append(f"schema unavailable for {model} ({reason}); checked against the built-in rules only")
        return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
