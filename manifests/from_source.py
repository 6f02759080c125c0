"""A manifest from a folder or an S3 prefix: the commonest catalogue job is one prompt on every
photo, and it should not need a spreadsheet first.

Ids come from file names and must be the same every time for the same folder (a rerun, a resume
or a join sheet relies on them), so a name only gets a hash of its path when another file folds
to the same id. The prompt template takes named fields only: a field like `{stem.__class__}`
or `{0}` is refused, so a file or sheet can never reach into Python objects.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import re
import string
import tempfile
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from manifests.errors import StorageError
from manifests.images import NotAnImage, inspect
from manifests.s3 import s3_client
from manifests.validate import KNOWN_COLUMNS, MAX_IMAGE_BYTES, MAX_PROMPT, MIN_SIDE, REPORT_COLUMNS

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs (jobs/report.py's rule)
MAX_ID_BASE = 100


class TemplateError(ValueError):
    """The prompt template cannot be used as written; the message says how to fix it."""


@dataclass(frozen=True)
class Found:
    """One file under the source: where it is, how the manifest names it, and why it is unusable."""

    rel: str  # path below the source, with '/'
    ref: str  # what the images column holds
    problem: str | None = None


@dataclass
class Built:
    rows: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (path below the source, why)
    notes: list[str] = field(default_factory=list)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(rel).parts)


def _check_file(path: Path) -> str | None:
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return f"is {size / 1048576:.1f} MB; the service takes at most 10 MB"
    try:
        info = inspect(path.read_bytes())
    except NotAnImage as exc:
        return f"not an image: {exc}"
    if info.width < MIN_SIDE or info.height < MIN_SIDE:
        return f"is {info.width}x{info.height} px; each side must be more than 14 px"
    return None


def scan_folder(root: Path, out: Path | None) -> list[Found]:
    """Every file below `root` but hidden ones (.DS_Store, .git), sorted by path. Images are
    named relative to the manifest's folder (absolute when it goes to stdout)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if _hidden(rel):
            continue
        ref = os.path.relpath(path.resolve(), out.resolve().parent) if out else str(path.resolve())
        ref = Path(ref).as_posix()
        if ref.startswith(FORMULA_START):
            ref = "./" + ref
        try:
            problem = _check_file(path)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        found.append(Found(rel, ref, problem))
    return found


def scan_s3(uri: str, endpoint: str | None) -> list[Found]:
    """Every object below s3://bucket/prefix, judged by its listing (nothing is downloaded)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: expected s3://bucket/prefix")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = s3_client(endpoint)
    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = item["Key"][len(prefix) :]
                if not rel or rel.endswith("/") or _hidden(rel):
                    continue
                size, ext = int(item.get("Size", 0)), PurePosixPath(rel).suffix.lower()
                problem = None
                if ext not in IMAGE_EXTENSIONS:
                    problem = f"not an image (the extension {ext or '(none)'!r} is not one of an image)"
                elif size > MAX_IMAGE_BYTES:
                    problem = f"is {size / 1048576:.1f} MB; the service takes at most 10 MB"
                elif size == 0:
                    problem = "not an image: the object is empty"
                found.append(Found(rel, f"s3://{bucket}/{item['Key']}", problem))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "") or "error"
        raise StorageError(f"cannot list {uri}: {code}") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from None
    return sorted(found, key=lambda f: f.rel)


def _id_base(rel: str) -> str:
    stem = unicodedata.normalize("NFKD", PurePosixPath(rel).stem).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:MAX_ID_BASE].strip("-._")
    return base or "image"


def _digest(rel: str, size: int) -> str:
    return hashlib.blake2b(rel.encode(), digest_size=size).hexdigest()


def make_ids(rels: list[str]) -> dict[str, str]:
    """An id per file, from its name: valid, unique ignoring case (ids name output files), and
    the same every time. Names that fold together each get a hash of their path, so which one
    came first never matters."""
    groups: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        groups[_id_base(rel).casefold()].append(rel)
    ids: dict[str, str] = {}
    for members in groups.values():
        for rel in members:
            base = _id_base(rel)
            ids[rel] = base if len(members) == 1 else f"{base}-{_digest(rel, 4)}"
    taken: dict[str, str] = {}
    for rel in sorted(ids):  # a hashed id equal to another file's own name: a longer hash, still stable
        if ids[rel].casefold() in taken:
            ids[rel] = f"{_id_base(rel)}-{_digest(rel, 12)}"
        taken[ids[rel].casefold()] = rel
    return ids


class Template:
    """`--prompt`: literal text and named fields, `{{`/`}}` for braces; nothing else."""

    def __init__(self, text: str, known: set[str]) -> None:
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"the prompt template is malformed ({exc}); write {{{{ and }}}} for braces") from None
        self.parts: list[tuple[str, str | None]] = []
        for literal, name, spec, conversion in parts:
            if name is not None:
                if not name.strip() or name.strip().isdigit():
                    raise TemplateError("the prompt template has a field without a name: use {stem}, {name}, ...")
                if "." in name or "[" in name:
                    raise TemplateError(f"{{{name}}}: only plain field names, no attribute or index access")
                if spec or conversion:
                    raise TemplateError(f"{{{name}}}: fields take no conversion or format (write {{{name}}})")
                if name not in known:
                    raise TemplateError(f"{{{name}}} is not a field; known: {', '.join(sorted(known))}")
            self.parts.append((literal, name))
        self.fields = {name for _, name in self.parts if name is not None}

    def render(self, values: dict[str, str]) -> str:
        return "".join(literal + (values[name] if name is not None else "") for literal, name in self.parts)


@dataclass
class Join:
    """`--join FILE.csv`: columns keyed by id (its `id` column, or else its first)."""

    path: Path
    columns: list[str]
    rows: dict[str, dict[str, str]]

    @classmethod
    def read(cls, path: Path) -> Join:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{path}: cannot be read as UTF-8 CSV ({exc})") from None
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in reader.fieldnames or []]
        if not columns:
            raise TemplateError(f"{path}: the sheet has no header row")
        key = next((c for c in columns if c.lower() == "id"), columns[0])
        rows: dict[str, dict[str, str]] = {}
        for n, raw in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
            if row.get(key, "") in rows:
                raise TemplateError(f"{path}:{n}: {key} {row[key]!r} appears twice")
            rows[row.get(key, "")] = row
        return cls(path, [c for c in columns if c != key], rows)

    def metadata_columns(self) -> tuple[list[str], list[str]]:
        """Columns copied into the manifest, and those only for prompts (their names are taken)."""
        kept: list[str] = []
        prompt_only: list[str] = []
        for c in self.columns:
            taken = c.lower() in (*KNOWN_COLUMNS, *REPORT_COLUMNS)
            near = difflib.get_close_matches(c.lower(), KNOWN_COLUMNS, n=1, cutoff=0.75)
            (prompt_only if taken or near or not c else kept).append(c)
        return kept, prompt_only


def build(
    found: list[Found],
    prompt: str,
    *,
    join: Join | None = None,
    model: str | None = None,
    size: str | None = None,
    fmt: str = "csv",
) -> Built:
    """Rows for every usable file; the others with their reason. Raises TemplateError."""
    known = {"stem", "name", "parent", *(join.columns if join else [])}
    template = Template(prompt, known)
    kept, prompt_only = join.metadata_columns() if join else ([], [])
    built = Built()
    if prompt_only:
        built.notes.append(f"columns {', '.join(prompt_only)} of the join sheet are for prompts only (names taken)")
    ids = make_ids([f.rel for f in found])
    for f in found:
        problem = f.problem
        rel = PurePosixPath(f.rel)
        values = {"stem": rel.stem, "name": rel.name, "parent": rel.parent.name}
        extra = None
        if join is not None:
            extra = join.rows.get(ids[f.rel]) or join.rows.get(rel.stem)
            if extra is None and template.fields & set(join.columns):
                problem = problem or f"no row for {ids[f.rel]!r} in {join.path.name}"
            values.update(extra or {})
        text = template.render({k: values.get(k, "") for k in template.fields})
        if not problem and not text.strip():
            problem = "the prompt is blank for this file"
        elif not problem and len(text) > MAX_PROMPT:
            problem = f"the prompt is longer than {MAX_PROMPT:,} characters"
        elif not problem and fmt == "csv" and "|" in f.ref:
            problem = "the path has a '|', which separates images in a CSV manifest: write JSONL (--out x.jsonl)"
        elif not problem and fmt == "csv" and text.startswith(FORMULA_START):
            problem = f"the prompt starts with {text[0]!r}, which a spreadsheet runs: write JSONL or reword it"
        if problem:
            built.invalid.append((f.rel, problem))
            continue
        row: dict[str, Any] = {"id": ids[f.rel], "prompt": text, "images": [f.ref]}
        if model:
            row["model"] = model
        if size:
            row["size"] = size
        for c in kept:
            row[c] = (extra or {}).get(c, "")
        built.rows.append(row)
    return built


def _csv_cell(value: Any) -> str:
    text = "|".join(value) if isinstance(value, list) else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = list(rows[0]) if rows else ["id", "prompt", "images"]
    writer.writerow([_csv_cell(c) for c in columns])
    for r in rows:
        writer.writerow([_csv_cell(r[c]) for c in columns])
    return buf.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """A reader (or a run started on it) never sees half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
