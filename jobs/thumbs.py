"""Small JPEG thumbnails beside the report, made once: a re-shoot is checked by eye, not by CSV.

Output thumbnails are made by the workers as each output is stored; the report makes any
that are missing by reading the output back from the run's own storage, and input ones from
where the workers read the inputs (local files and s3://). A URL input is not fetched: the
report writer is no crawler of untrusted addresses. Thumbnails are keyed so that a photo
shared by many rows is made once, and a thumbnail already stored is never made again
(`report` can be run any number of times).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from PIL import Image

from jobs.storage import Storage
from manifests.errors import StorageError
from manifests.images import MAX_PIXELS

log = logging.getLogger("seedream.thumbs")
SIDE = 256
QUALITY = 80
MAX_INPUT_BYTES = 10 * 1024 * 1024
FOLDER = "thumbs"


def thumbnail(data: bytes, side: int = SIDE) -> bytes | None:
    """A JPEG at most `side` px on its longer side, or None when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return None
            img.draft("RGB", (side * 2, side * 2))  # JPEG decodes at a fraction of the size: fast
            small = img.convert("RGB")
            small.thumbnail((side, side))
            out = io.BytesIO()
            small.save(out, "JPEG", quality=QUALITY, optimize=True)
            return out.getvalue()
    except Exception:  # any decoder error means "no thumbnail", never a failed report
        return None


def output_key(job_id: str, n: int) -> str:
    """Hashed, so no job id can shape a storage key (ids are checked too; this is the second lock)."""
    return f"{FOLDER}/out/{hashlib.sha256(job_id.encode()).hexdigest()[:24]}-{n}.jpg"


def input_key(kind: str, value: str) -> str:
    return f"{FOLDER}/in/{hashlib.sha256(f'{kind}:{value}'.encode()).hexdigest()[:24]}.jpg"


def store_output_thumbnail(storage: Storage, job_id: str, n: int, data: bytes) -> bool:
    """Made by the worker that stores the output, while the bytes are at hand: the report then
    has nothing to read back, however large the run. A failure here never fails the job (the
    report tries again)."""
    small = thumbnail(data)
    if small is None:
        return False
    try:
        storage.put_bytes(output_key(job_id, n), small, "image/jpeg")
    except StorageError as exc:
        log.warning("thumbnail of %s/%d not stored: %s", job_id, n, exc)
        return False
    return True


@dataclass
class Thumbs:
    """Thumbnails of one run, stored under `thumbs/` of its storage; keys are relative to the report."""

    storage: Storage
    read_input: Callable[[str, str, str | None], bytes | None] | None = None
    existing: set[str] = field(default_factory=set)
    threads: int = 8

    def __post_init__(self) -> None:
        try:
            self.existing = set(self.storage.list(FOLDER))
        except StorageError as exc:
            log.warning("cannot list thumbnails (%s); making them again", exc)

    def make_all(self, jobs: list[dict[str, Any]], base_uri: str) -> None:
        """Fill in `thumbs_in` / `thumbs_out` of each job (a key, or "" where there is none)."""
        tasks: dict[str, Callable[[], bytes | None]] = {}
        for job in jobs:
            job["thumbs_out"] = []
            for n, uri in enumerate(job.get("outputs") or []):
                rel = relative(uri, base_uri)
                key = output_key(job["id"], n)
                job["thumbs_out"].append(key if rel else "")
                if rel and key not in self.existing:
                    tasks.setdefault(key, partial(self.storage.get_bytes, rel))
            job["thumbs_in"] = []
            read_input = self.read_input
            for kind, value, path in job.get("image_refs") or []:
                if read_input is None or kind not in ("local", "s3"):
                    job["thumbs_in"].append("")
                    continue
                key = input_key(kind, value)
                job["thumbs_in"].append(key)
                if key not in self.existing:
                    tasks.setdefault(key, partial(read_input, kind, value, path))
        with ThreadPoolExecutor(self.threads) as pool:  # reads from S3 are I/O bound
            made = dict(zip(tasks, pool.map(lambda key: self._make(key, tasks[key]), tasks), strict=True))
        missing = {k for k, ok in made.items() if not ok}
        for job in jobs:
            job["thumbs_out"] = ["" if k in missing else k for k in job["thumbs_out"]]
            job["thumbs_in"] = ["" if k in missing else k for k in job["thumbs_in"]]

    def _make(self, key: str, read: Callable[[], bytes | None]) -> bool:
        try:
            data = read()
            small = thumbnail(data) if data else None
            if small is None:
                return False
            self.storage.put_bytes(key, small, "image/jpeg")
        except (StorageError, OSError) as exc:
            log.warning("thumbnail %s not made: %s", key, exc)
            return False
        self.existing.add(key)
        return True


def relative(uri: str, base_uri: str) -> str:
    """The key of a stored output under the run's storage, or "" for anything outside it."""
    base = base_uri.rstrip("/") + "/"
    if not uri.startswith(base):
        return ""
    rel = uri[len(base) :]
    return "" if ".." in rel.split("/") or rel.startswith("/") else rel


def input_reader(s3: Callable[[], Any] | None) -> Callable[[str, str, str | None], bytes | None]:
    """Reads a local or s3:// input as the workers do (at most 10 MB); None when it cannot."""

    def read(kind: str, value: str, path: str | None) -> bytes | None:
        try:
            if kind == "local" and path:
                with open(path, "rb") as fh:
                    return fh.read(MAX_INPUT_BYTES + 1)
            if kind == "s3" and s3 is not None:
                bucket, _, key = value[5:].partition("/")
                body = s3().get_object(Bucket=bucket, Key=key)["Body"]
                return bytes(body.read(MAX_INPUT_BYTES + 1))
        except Exception as exc:  # missing file, S3 error: the card shows no thumbnail
            log.warning("input %s not read for its thumbnail: %s", value[:200], type(exc).__name__)
        return None

    return read
