"""The model table: ids, list prices, size limits and accepted parameters, in one place.

Prices and limits change; a user overrides or extends this table with a JSON file
(`--models-file` or `SEEDREAM_MODELS_FILE`) instead of waiting for a release.
Prices are integer micro-dollars so that sums and budgets are exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from manifests.errors import ConfigError

DEFAULT_MODEL = "bytedance/seedream-v4/edit"
# Parameters the batch runner sets itself or cannot honour (it polls and downloads URLs).
RESERVED_PARAMS = {"model", "prompt", "images", "size", "input"}
UNSUPPORTED_PARAMS = {
    "enable_sync_mode": "the batch runner polls; sync mode would hold a worker for the whole prediction",
    "enable_base64_output": "outputs are fetched by URL and stored; base64 outputs are not supported",
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    price_micros: int
    min_pixels: int
    max_pixels: int = 4096 * 4096
    min_images: int = 1
    max_images: int = 10
    max_total_images: int = 15  # inputs plus outputs
    max_aspect: float = 16.0
    params: frozenset[str] = field(default_factory=lambda: frozenset({"seed", "max_images", "watermark"}))

    @property
    def price_usd(self) -> Decimal:
        return Decimal(self.price_micros) / 1_000_000


BUILTIN: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec("bytedance/seedream-v4/edit", price_micros=27_000, min_pixels=921_600),
        ModelSpec("bytedance/seedream-v4.5/edit", price_micros=36_000, min_pixels=3_686_400),
    )
}


def usd_to_micros(value: object) -> int:
    """Dollars (as typed by a person or read from a file) to exact micro-dollars."""
    try:
        usd = Decimal(str(value).strip().lstrip("$"))
    except (InvalidOperation, ValueError):
        raise ConfigError(f"{value!r} is not an amount in USD") from None
    if not usd.is_finite() or usd < 0:
        raise ConfigError(f"{value!r} is not a non-negative amount in USD")
    return int((usd * 1_000_000).to_integral_value())


def micros_to_usd(micros: int) -> str:
    """Exact decimal text: 81000 -> '0.081'; 12_000_000 -> '12.00'."""
    d = Decimal(micros) / 1_000_000
    text = f"{d:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True)
class ModelTable:
    models: Mapping[str, ModelSpec]
    default: str = DEFAULT_MODEL
    # the models whose price the user's file sets: it wins over the live price from /models
    priced_by_file: frozenset[str] = frozenset()

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.models

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, default: str | None = None) -> ModelTable:
        """The built-in table, changed by the user's file when one is given (the models_file setting)."""
        models = dict(BUILTIN)
        source = path
        priced: set[str] = set()
        if source:
            models.update(_read_overrides(Path(source), models, priced))
        table_default = default or DEFAULT_MODEL
        if table_default not in models:
            raise ConfigError(f"unknown model {table_default!r}; known: {', '.join(sorted(models))}")
        return cls(models=models, default=table_default, priced_by_file=frozenset(priced))

    def with_prices(self, prices: Mapping[str, int]) -> ModelTable:
        """The same table with these models' prices replaced (micro-dollars)."""
        models = {m: replace(s, price_micros=prices[m]) if m in prices else s for m, s in self.models.items()}
        return replace(self, models=models)


def _read_overrides(path: Path, current: Mapping[str, ModelSpec], priced: set[str]) -> dict[str, ModelSpec]:
    """A JSON object {model_id: {price_usd, min_pixels, max_pixels, max_images, params}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"models file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"models file {path}: expected a JSON object of model ids")
    out: dict[str, ModelSpec] = {}
    allowed = {"price_usd", "min_pixels", "max_pixels", "max_images", "params", "max_aspect"}
    for model_id, spec in data.items():
        if not isinstance(spec, dict) or set(spec) - allowed:
            raise ConfigError(f"models file {path}: {model_id}: use only {', '.join(sorted(allowed))}")
        base = current.get(model_id)
        if base is None and not {"price_usd", "min_pixels"} <= set(spec):
            raise ConfigError(f"models file {path}: new model {model_id} needs price_usd and min_pixels")
        changes: dict[str, Any] = {}
        if "price_usd" in spec:
            changes["price_micros"] = usd_to_micros(spec["price_usd"])
            priced.add(model_id)
        for key in ("min_pixels", "max_pixels", "max_images"):
            if key in spec:
                changes[key] = int(spec[key])
        if "max_aspect" in spec:
            changes["max_aspect"] = float(spec["max_aspect"])
        if "params" in spec:
            changes["params"] = frozenset(str(p) for p in spec["params"])
        out[model_id] = replace(base, **changes) if base else ModelSpec(id=model_id, **changes)
    return out
