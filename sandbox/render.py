"""Real output images: the first input, resized to the requested size, tinted and captioned.

Deterministic (the same input and prompt give the same bytes) and visibly edited,
so a person checking a run can see that something happened.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, ImageDraw, ImageOps


def render(source: bytes, prompt: str, size: tuple[int, int] | None, index: int) -> bytes:
    with Image.open(io.BytesIO(source)) as img:
        img.load()
        base = img.convert("RGB")
    target = size or base.size
    out = ImageOps.fit(base, target, method=Image.Resampling.BILINEAR)
    digest = hashlib.sha256(f"{prompt}|{index}".encode()).digest()
    tint = Image.new("RGB", target, (digest[0], digest[1], digest[2]))
    out = Image.blend(out, tint, 0.35)
    draw = ImageDraw.Draw(out)
    border = max(2, min(target) // 40)
    draw.rectangle([0, 0, target[0] - 1, target[1] - 1], outline=(digest[3], digest[4], 255), width=border)
    caption = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    draw.text((border + 4, border + 4), f"#{index} {caption}", fill=(255, 255, 255))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
