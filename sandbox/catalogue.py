"""The service's own model catalogue, as Atlas publishes it (independent of the project's table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServiceModel:
    id: str
    price_micros: int
    min_pixels: int
    max_pixels: int = 4096 * 4096
    max_images: int = 10


CATALOGUE: dict[str, ServiceModel] = {
    m.id: m
    for m in (
        ServiceModel("bytedance/seedream-v4/edit", 27_000, 921_600),
        ServiceModel("bytedance/seedream-v4.5/edit", 36_000, 3_686_400),
    )
}


def schema_name(model_id: str) -> str:
    return f"{model_id.replace('/', '_')}.json"


def models_payload(base_url: str, prices: Mapping[str, int] | None = None) -> list[dict[str, object]]:
    """The catalogue as `/models` lists it. `prices` (micro-dollars) are live prices that differ
    from the list: shown as Atlas shows a discount, `actual` beside the `origin` and a percentage."""
    out: list[dict[str, object]] = []
    for m in CATALOGUE.values():
        actual = (prices or {}).get(m.id, m.price_micros)
        price: dict[str, object] = {
            "actual": {"base_price": actual / 1e6, "request_price": actual / 1e6, "output_image_price": 0}
        }
        if actual != m.price_micros:
            price["origin"] = {"base_price": m.price_micros / 1e6, "request_price": m.price_micros / 1e6}
            price["discount"] = f"{actual * 100 / m.price_micros:g}"
        out.append(
            {
                "model": m.id,
                "type": "Image",
                "price": price,
                "schema": f"{base_url.rstrip('/')}/schemas/{schema_name(m.id)}",
            }
        )
    return out


def schema_document(model: ServiceModel) -> dict[str, Any]:
    """The model's OpenAPI document: its `Input` accepts exactly what `Service._validate` does."""
    flag = {"type": "boolean"}
    input_schema = {
        "type": "object",
        "required": ["prompt", "images"],
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "pattern": "\\S"},
            "images": {
                "type": "array",
                "minItems": 1,
                "maxItems": model.max_images,
                "items": {"type": "string", "format": "uri", "pattern": "^https?://"},
            },
            "size": {"type": "string", "pattern": "^\\s*\\d+\\s*[*xX]\\s*\\d+\\s*$", "default": "2048*2048"},
            "seed": {"type": "integer", "default": -1},
            "max_images": {"type": "integer", "minimum": 1, "maximum": 14, "default": 1},
            "watermark": flag,
            "output_format": {"type": "string"},
            "enable_base64_output": flag,
            "enable_sync_mode": flag,
        },
        "additionalProperties": False,
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": model.id, "version": "1"},
        "paths": {
            "/api/v1/model/generateImage": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Input"}}},
                    }
                }
            }
        },
        "components": {"schemas": {"Input": input_schema}},
    }


def check_size(model: ServiceModel, size: object) -> tuple[int, int] | str:
    """(width, height) when the size is acceptable, else the service's error message."""
    if not isinstance(size, str):
        return "size must be a string like 2048*2048"
    sep = "*" if "*" in size else "x"
    parts = size.lower().split(sep)
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return f"size {size!r} is not W*H"
    w, h = int(parts[0]), int(parts[1])
    if w <= 0 or h <= 0:
        return f"size {size!r} must be positive"
    if w * h < model.min_pixels or w * h > model.max_pixels:
        return f"size {w}*{h} is outside {model.min_pixels}..{model.max_pixels} pixels for {model.id}"
    if max(w, h) > 16 * min(w, h):
        return f"size {w}*{h}: aspect ratio must be within 1:16 and 16:1"
    return w, h
