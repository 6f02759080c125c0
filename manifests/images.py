"""Is this really an image, and of what kind and size? Used on inputs and on outputs.

Decoding is the only honest check (a truncated JPEG has a valid header), but it
is guarded: a pixel cap stops decompression bombs before any memory is spent.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Formats the service accepts for inputs, by Pillow's name, and their file extension.
ACCEPTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
}
MAX_PIXELS = 64_000_000  # beyond 4096x4096 outputs with margin; above this is a bomb


class NotAnImage(ValueError):
    """The bytes are not a usable image; the message says why in plain words."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name: JPEG, PNG, ...
    width: int
    height: int

    @property
    def extension(self) -> str:
        return ACCEPTED_FORMATS.get(self.format, self.format.lower())

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.extension, "application/octet-stream")


def inspect(data: bytes, *, decode: bool = True, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Identify an image; with `decode`, also decode every pixel to catch truncation and corruption."""
    if not data:
        raise NotAnImage("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "?"
                width, height = img.size
                if width * height > max_pixels:
                    raise NotAnImage(f"{width}x{height} pixels is more than the {max_pixels:,} allowed")
                if fmt not in ACCEPTED_FORMATS:
                    raise NotAnImage(f"format {fmt} is not one the service accepts")
                if decode:
                    img.load()
    except NotAnImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotAnImage(_plain(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise NotAnImage(f"the image is corrupt or truncated ({_plain(exc)})") from None
    return ImageInfo(format=fmt, width=width, height=height)


def _plain(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "far too many pixels for a photo (a decompression bomb?)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised content)"
    text = str(exc).split("\n")[0]
    return text[:200] or type(exc).__name__
