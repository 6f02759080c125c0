"""Streaming readers for CSV and JSONL manifests: one row at a time, never the whole file.

Bytes are decoded line by line so a stray non-UTF-8 byte is reported at its line
instead of aborting the read; a byte-order mark and Windows line endings are
accepted; an over-long line is skipped with a problem rather than held in memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from manifests.spec import Problem

MAX_LINE_BYTES = 1024 * 1024
BOM = b"\xef\xbb\xbf"
FORMATS = ("csv", "jsonl")


@dataclass
class RawRow:
    line: int
    fields: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class Header:
    line: int
    names: list[str]


@dataclass
class _Line:
    number: int
    text: str
    problem: str | None


def detect_format(path: Path, explicit: str | None = None) -> str:
    if explicit:
        fmt = explicit.lower()
    else:
        suffix = path.suffix.lower().lstrip(".")
        fmt = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl"}.get(suffix, "")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the extension; pass --format csv or jsonl")
    return fmt


def _lines(fh: IO[bytes]) -> Iterator[_Line]:
    number = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield _Line(number, "\n", f"line is longer than {MAX_LINE_BYTES:,} bytes; not read")
            continue
        try:
            yield _Line(number, raw.decode("utf-8"), None)
        except UnicodeDecodeError as exc:
            yield _Line(
                number,
                raw.decode("utf-8", "replace"),
                f"byte {exc.start + 1} of the line is not UTF-8 (save the file as UTF-8)",
            )


def read_rows(path: Path, fmt: str) -> Iterator[RawRow | Header | Problem]:
    """Yield the CSV header, each data row (with its read problems), or a file-level Problem."""
    with path.open("rb") as fh:
        yield from (_read_csv(path, fh) if fmt == "csv" else _read_jsonl(path, fh))


def _read_jsonl(path: Path, fh: IO[bytes]) -> Iterator[RawRow | Header | Problem]:
    name = str(path)
    for ln in _lines(fh):
        if ln.problem:
            yield RawRow(ln.number, {}, [Problem(name, ln.number, None, ln.problem)])
            continue
        if not ln.text.strip():
            continue
        try:
            obj = json.loads(ln.text)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            col = getattr(exc, "colno", None)
            where = f" at column {col}" if col else ""
            yield RawRow(ln.number, {}, [Problem(name, ln.number, None, f"invalid JSON{where}: {msg}")])
            continue
        if not isinstance(obj, dict):
            yield RawRow(ln.number, {}, [Problem(name, ln.number, None, "each line must be a JSON object")])
            continue
        yield RawRow(ln.number, obj)


def _read_csv(path: Path, fh: IO[bytes]) -> Iterator[RawRow | Header | Problem]:
    name = str(path)
    pending: dict[int, str] = {}
    current = [0]

    def texts() -> Iterator[str]:
        for ln in _lines(fh):
            current[0] = ln.number
            if ln.problem:
                pending[ln.number] = ln.problem
            yield ln.text

    reader = csv.reader(texts(), strict=True)
    header: list[str] | None = None
    last_end = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            start = last_end + 1
            last_end = current[0]
            pending.clear()
            yield RawRow(start, {}, [Problem(name, start, None, f"malformed CSV ({exc}); check the quoting")])
            continue
        start, last_end = last_end + 1, reader.line_num
        problems = [Problem(name, n, None, msg) for n, msg in sorted(pending.items())]
        pending.clear()
        if not cells:  # a blank line
            if problems:
                yield RawRow(start, {}, problems)
            continue
        if header is None:
            header = [c.strip() for c in cells]
            if problems:
                yield Problem(name, start, None, problems[0].message)
                return
            yield Header(start, header)
            continue
        if len(cells) != len(header):
            problems.append(
                Problem(name, start, None, f"has {len(cells)} cells but the header has {len(header)} columns")
            )
        yield RawRow(start, dict(zip(header, cells, strict=False)), problems)
    if header is None:
        yield Problem(name, 0, None, "the manifest is empty (no header row)")
