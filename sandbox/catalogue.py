"""The service's own model catalogue, as Atlas publishes it (independent of the project's table)."""

from __future__ import annotations

from dataclasses import dataclass


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


def models_payload(base_url: str) -> list[dict[str, object]]:
    return [
        {
            "model": m.id,
            "type": "Image",
            "price": {
                "actual": {
                    "base_price": m.price_micros / 1e6,
                    "request_price": m.price_micros / 1e6,
                    "output_image_price": 0,
                }
            },
            "schema": f"{base_url.rstrip('/')}/schemas/{m.id.replace('/', '_')}.json",
        }
        for m in CATALOGUE.values()
    ]


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
