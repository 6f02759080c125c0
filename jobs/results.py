"""The results index: which edit (by request fingerprint) was already paid for, and where its
outputs are, kept in the output itself so every run that writes there shares it.

`<output>/_results/<fp[:2]>/<fp>.json` holds the run, job, prediction id, stored outputs
(keys under the output) and cost of the latest edit that produced the fingerprint. It is
written when a job has succeeded with every output stored, before the job is marked
succeeded, so an entry never names outputs that were not all written. A run learns which
fingerprints exist by listing (page after page while it is small, the shards not reached yet
side by side once it is big), never by one read per row; an entry itself is read only for a row that will
reuse it. Whatever an entry says is checked as untrusted: keys stay under the output, and
outputs that are gone make the row paid for again, not reused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.storage import S3Storage, Storage, open_output, safe_key
from manifests.errors import StorageError

FOLDER = "_results"
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_LIST_THREADS = 16
SEQUENTIAL = 10_000  # entries listed page after page before the rest is listed shard by shard


def _fingerprint_of(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    fp = name[:-5] if name.endswith(".json") else ""
    return fp if FINGERPRINT.fullmatch(fp) else ""


def entry_key(fp: str) -> str:
    return f"{FOLDER}/{fp[:2]}/{fp}.json"


@dataclass(frozen=True)
class Entry:
    fingerprint: str
    run_id: str
    job_id: str
    prediction_id: str
    model: str
    outputs: tuple[str, ...]  # keys under the output root: <run_id>/outputs/<job_id>/<n>.<ext>
    cost_micros: int
    finished_at: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "outputs": list(self.outputs)}

    @classmethod
    def from_json(cls, fp: str, data: Any) -> Entry | None:
        """The entry, or None when it is not one this project wrote for `fp` (damaged, edited)."""
        if not isinstance(data, dict) or data.get("fingerprint") != fp:
            return None
        outputs = data.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            return None
        try:
            run_id, job_id = safe_key(str(data["run_id"])), safe_key(str(data["job_id"]))
            keys = tuple(safe_key(o) for o in outputs)
            if not all(_output_name(run_id, job_id).fullmatch(k) for k in keys):
                return None  # only the outputs a job stores are copied, never another file of the output
            return cls(
                fingerprint=fp,
                run_id=run_id,
                job_id=job_id,
                prediction_id=str(data.get("prediction_id") or "")[:200],
                model=str(data.get("model") or "")[:200],
                outputs=keys,
                cost_micros=max(0, int(data.get("cost_micros") or 0)),
                finished_at=float(data.get("finished_at") or 0.0),
            )
        except (KeyError, TypeError, ValueError, StorageError):
            return None


def _output_name(run_id: str, job_id: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(run_id)}/outputs/{re.escape(job_id)}/\d{{1,4}}\.(?:jpe?g|png|webp)")


def output_keys(run_id: str, job_id: str, uris: Iterable[str]) -> tuple[str, ...]:
    """Where a job's stored outputs are under the output root (their file names are `<n>.<ext>`)."""
    return tuple(f"{run_id}/outputs/{job_id}/{uri.rstrip('/').rsplit('/', 1)[-1]}" for uri in uris)


class ResultsIndex:
    """One output root's index."""

    def __init__(self, root: Storage) -> None:
        self.root = root

    def fingerprints(self) -> set[str]:
        """Every fingerprint the index holds, by listing. Pages are read in key order; once an
        index passes SEQUENTIAL entries in S3, the shards not yet reached are listed side by side
        (in S3 a LIST is one round trip per 1,000 keys). A folder is walked once."""
        found: set[str] = set()
        last = ""
        for key in self.root.list(FOLDER):
            fp = _fingerprint_of(key)
            if fp:
                found.add(fp)
                last = fp
            if len(found) >= SEQUENTIAL and isinstance(self.root, S3Storage):
                break
        else:
            return found
        rest = [f"{FOLDER}/{n:02x}" for n in range(int(last[:2], 16), 256)]  # the shard of `last` again
        with ThreadPoolExecutor(max_workers=_LIST_THREADS, thread_name_prefix="results-list") as pool:
            for part in pool.map(lambda prefix: [f for k in self.root.list(prefix) if (f := _fingerprint_of(k))], rest):
                found.update(part)
        return found

    def get(self, fp: str) -> Entry | None:
        try:
            data = self.root.get_json(entry_key(fp))
        except ValueError:  # not JSON: a damaged entry is no entry
            return None
        return Entry.from_json(fp, data)

    def put(self, entry: Entry) -> None:
        self.root.put_json(entry_key(entry.fingerprint), entry.to_json())

    def copy_outputs(self, entry: Entry, run: Storage, job_id: str, metadata: dict[str, str]) -> list[str] | None:
        """The entry's outputs copied into `run` as this job's; None when any of them is gone
        (what was copied stays, and is overwritten when the job's own edit is stored)."""
        uris = []
        for n, key in enumerate(entry.outputs):
            ext = key.rsplit(".", 1)[-1] if "." in key.rsplit("/", 1)[-1] else "bin"
            uri = run.copy_in(self.root, key, f"outputs/{job_id}/{n}.{ext}", metadata)
            if uri is None:
                return None
            uris.append(uri)
        return uris


def reuse_roots(output: str, reuse_from: tuple[str, ...] | list[str]) -> list[str]:
    """The outputs whose results indexes a run reads, its own first, each named the same way by
    every run (a folder by its absolute path), so runs into one output share their claims."""
    roots: list[str] = []
    for uri in (output, *reuse_from):
        name = uri.rstrip("/") if "://" in uri else str(Path(uri).resolve())
        if name not in roots:
            roots.append(name)
    return roots


def known(roots: Iterable[str], endpoint_url: str | None = None) -> set[str]:
    """The fingerprints stored under each of `roots` (see `reuse_roots`)."""
    found: set[str] = set()
    for root in roots:
        found |= ResultsIndex(open_output(root, endpoint_url=endpoint_url)).fingerprints()
    return found


def find(indexes: Iterable[ResultsIndex], fp: str) -> Iterator[tuple[ResultsIndex, Entry]]:
    """The entries for `fp`, the run's own output first, then each `--reuse-from`."""
    for index in indexes:
        entry = index.get(fp)
        if entry is not None:
            yield index, entry


def new_entry(fp: str, run_id: str, job_id: str, prediction_id: str, model: str, uris: list[str], cost: int) -> Entry:
    return Entry(
        fingerprint=fp,
        run_id=run_id,
        job_id=job_id,
        prediction_id=prediction_id,
        model=model,
        outputs=output_keys(run_id, job_id, uris),
        cost_micros=cost,
        finished_at=time.time(),
    )


class Plan:
    """Which rows of a manifest will be reused, read in manifest order: a row whose edit is in an
    index, or one an earlier row of the same manifest makes (it waits for that one and copies).
    A new Plan for each pass over the manifest."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self._seen: set[str] = set()

    def reused(self, fp: str) -> bool:
        if not fp:
            return False
        if fp in self.known or fp in self._seen:
            return True
        self._seen.add(fp)
        return False
