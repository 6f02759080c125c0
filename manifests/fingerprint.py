"""A row's request fingerprint: the same edit always has the same one, any change gives another.

It covers everything the service is sent: the model, the prompt exactly as written, each
input in order (a local file by the SHA-256 of its bytes, an s3:// object by its URI and
ETag, a URL by itself: the service fetches it, we never read it), the size as the
validator normalised it ("W*H") and every parameter with its keys sorted. A row whose
input content is not known (an s3:// object whose ETag could not be read) has none, and is
never reused: a wrong match would hand back another photo's edit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

VERSION = "v1"  # a new normalisation is a new version, never a silent change of old fingerprints


def normal_size(size: str | None) -> str:
    """'1024x1024', '1024X1024' and '1024*1024' are one size."""
    if not size:
        return ""
    return size.strip().lower().replace("x", "*").replace(" ", "")


def fingerprint(model: str, prompt: str, inputs: Iterable[str | None], size: str | None, params: dict[str, Any]) -> str:
    """64 hex digits, or "" when an input's content is unknown (`None` among `inputs`)."""
    tokens = list(inputs)
    if any(t is None or t == "" for t in tokens):
        return ""
    body = {
        "v": VERSION,
        "model": model,
        "prompt": prompt,
        "inputs": tokens,
        "size": normal_size(size),
        "params": params,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_token(sha256_hex: str) -> str:
    return f"sha256:{sha256_hex}"


def s3_token(uri: str, etag: str | None) -> str | None:
    """An object is its URI and its ETag (quotes dropped): a photo replaced at the same key is a
    new input. Without an ETag, unknown."""
    tag = (etag or "").strip().strip('"')
    return f"{uri}#{tag}" if tag else None


def url_token(url: str) -> str:
    return f"url:{url}"
