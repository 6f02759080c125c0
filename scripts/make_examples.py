"""Generate the example catalog: small product photos and two manifests.

Run once (`python scripts/make_examples.py`); the outputs are committed under
manifests/examples/. Deterministic, so re-running changes nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1] / "manifests" / "examples"
PRODUCTS = [
    ("SKU-1001", "mug", (200, 60, 50)),
    ("SKU-1002", "sneaker", (40, 90, 200)),
    ("SKU-1003", "lamp", (230, 190, 40)),
    ("SKU-1004", "backpack", (60, 140, 70)),
    ("SKU-1005", "watch", (90, 90, 100)),
    ("SKU-1006", "vase", (170, 80, 160)),
    ("SKU-1007", "headphones", (20, 20, 30)),
    ("SKU-1008", "bottle", (50, 170, 190)),
    ("SKU-1009", "candle", (240, 230, 210)),
    ("SKU-1010", "chair", (130, 80, 40)),
    ("SKU-1011", "teapot", (220, 120, 90)),
    ("SKU-1012", "sunglasses", (30, 30, 30)),
]
PROMPTS = [
    "same product on white marble, soft daylight",
    "same product on a walnut table, warm evening light",
    "same product floating on a pastel gradient, studio lighting",
]


def product_image(name: str, color: tuple[int, int, int], size: int = 160) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 230))
    d = ImageDraw.Draw(img)
    m = size // 5
    if name in {"mug", "vase", "bottle", "candle", "teapot"}:
        d.rounded_rectangle([m + 10, m, size - m - 10, size - m], radius=18, fill=color)
    elif name in {"watch", "headphones", "sunglasses"}:
        d.ellipse([m, m, size - m, size - m], outline=color, width=12)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
    d.text((8, size - 16), name, fill=(60, 60, 60))
    return img


def main() -> None:
    images = ROOT / "images"
    images.mkdir(parents=True, exist_ok=True)
    for sku, name, color in PRODUCTS:
        product_image(name, color).save(images / f"{sku.lower()}.jpg", quality=80)
    backdrop = Image.new("RGB", (160, 160), (245, 245, 245))
    ImageDraw.Draw(backdrop).rectangle([0, 110, 160, 160], fill=(200, 200, 205))
    backdrop.save(images / "marble-backdrop.png")

    with (ROOT / "catalog.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "images", "model", "size", "sku", "campaign"])
        for i, (sku, name, _) in enumerate(PRODUCTS):
            model = "bytedance/seedream-v4.5/edit" if i % 4 == 3 else "bytedance/seedream-v4/edit"
            size = "1024*1024" if model.endswith("v4/edit") and i % 3 == 0 else ""
            w.writerow(
                [
                    f"{sku.lower()}-marble",
                    f"{PROMPTS[i % 3]} ({name})",
                    f"images/{sku.lower()}.jpg",
                    model,
                    size,
                    sku,
                    "spring-reshoot",
                ]
            )

    with (ROOT / "multi-ref.jsonl").open("w", encoding="utf-8") as fh:
        for sku, name, _ in PRODUCTS[:4]:
            row = {
                "id": f"{sku.lower()}-scene",
                "prompt": f"put the {name} from image 1 on the backdrop of image 2",
                "images": [f"images/{sku.lower()}.jpg", "images/marble-backdrop.png"],
                "model": "bytedance/seedream-v4.5/edit",
                "params": {"seed": 42},
                "sku": sku,
                "campaign": "scene-tests",
            }
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
