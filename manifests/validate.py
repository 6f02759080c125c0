"""Validation of every manifest row before anything is spent.

Every problem is reported, not just the first, each with file, line and field.
The reader streams, so a million-row manifest is checked in bounded memory (the
set of ids seen, kept as 8-byte digests, is the only thing that grows).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from manifests.addresses import is_internal_host
from manifests.fingerprint import file_token, fingerprint, s3_token, url_token
from manifests.images import NotAnImage, inspect
from manifests.models import RESERVED_PARAMS, UNSUPPORTED_PARAMS, ModelSpec, ModelTable
from manifests.reader import Header, RawRow, detect_format, read_rows
from manifests.service_schema import ServiceSchema
from manifests.spec import ImageRef, JobSpec, Problem

KNOWN_COLUMNS = ("id", "prompt", "images", "model", "size", "params")
REQUIRED_COLUMNS = ("id", "prompt", "images")
# Report columns a metadata column may not shadow.
REPORT_COLUMNS = {"status", "prediction_id", "outputs", "cost_usd", "attempts", "error"}
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MIN_SIDE = 15  # each side must be more than 14 px
MAX_PROMPT = 10_000
MAX_PROBLEMS_KEPT = 1000
PARAM_TYPES: dict[str, type | tuple[type, ...]] = {"seed": int, "max_images": int, "watermark": bool}
# Control characters (Unicode's Cc: C0, DEL, C1) but tab, newline and carriage return.
PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class Result:
    """The outcome of a whole pass: counts, the problems (the first 1000), jobs per model."""

    jobs: int = 0
    invalid_rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    by_model: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.more_problems

    def lines(self) -> list[str]:
        """The problems as printed to a person, with a count of those not kept."""
        out = [str(p) for p in self.problems]
        if self.more_problems:
            out.append(f"... and {self.more_problems:,} more problems")
        return out

    def add(self, problems: list[Problem]) -> None:
        room = MAX_PROBLEMS_KEPT - len(self.problems)
        self.problems.extend(problems[:room])
        self.more_problems += max(0, len(problems) - room)


class Validator:
    """Checks one manifest; file checks are cached so a photo used by many rows is read once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: ModelTable,
        *,
        fmt: str | None = None,
        model: str | None = None,
        check_files: bool = True,
        allow_internal_urls: bool = False,
        schemas: Callable[[str], ServiceSchema | None] | None = None,
    ) -> None:
        """`schemas` gives a model's schema as the service publishes it, or None where it
        cannot be had; rows are then checked against it on top of the project's own rules."""
        self.path = Path(path)
        self.name = str(path)
        self.table = table
        self.default_model = model or table.default
        self.check_files = check_files
        self.allow_internal_urls = allow_internal_urls
        self.schemas = schemas
        self.fmt = detect_format(self.path, fmt)
        self._file_checks: dict[str, str | None] = {}
        # each distinct s3:// input: its problem once checked (jobs/s3check.py), "" before
        self._s3_checks: dict[str, str | None] = {}
        self._file_hashes: dict[str, str] = {}  # path -> SHA-256 of its bytes, for fingerprints
        self._s3_etags: dict[str, str] = {}  # s3:// URI -> ETag, from the HEAD that checked it

    def results(self) -> Iterator[JobSpec | list[Problem]]:
        """Each row as a JobSpec or the list of its problems; file-level problems as lists too."""
        if not self.path.is_file():
            yield [Problem(self.name, 0, None, "file not found")]
            return
        seen: dict[bytes, int] = {}
        columns: dict[str, str] = {}
        any_row = False
        for item in read_rows(self.path, self.fmt):
            if isinstance(item, Problem):
                any_row = any_row or item.line == 0
                yield [item]
                continue
            if isinstance(item, Header):
                columns, header_problems = self._header(item)
                if header_problems:
                    yield header_problems
                    if any(p.field in REQUIRED_COLUMNS for p in header_problems):
                        return  # every row would fail the same way
                continue
            any_row = True
            yield self._row(item, columns, seen)
        if not any_row:
            yield [Problem(self.name, 0, None, "the manifest has no rows")]

    def run(self) -> Result:
        result = Result()
        for item in self.results():
            if isinstance(item, JobSpec):
                result.jobs += 1
                result.by_model[item.model] += 1
            else:
                result.invalid_rows += 1 if item and item[0].line else 0
                result.add(item)
        return result

    @property
    def local_files(self) -> int:
        """Distinct local files of the valid rows' inputs (by path) met so far."""
        return sum(1 for error in self._file_checks.values() if error is None)

    @property
    def s3_objects(self) -> int:
        return len(self._s3_checks)

    def has_unchecked_s3(self) -> bool:
        return any(v == "" for v in self._s3_checks.values())

    def unchecked_s3(self) -> list[str]:
        return [uri for uri, v in self._s3_checks.items() if v == ""]

    def s3_checked(self, uri: str, problem: str | None, etag: str = "") -> None:
        """The HEAD's verdict on `uri`: a problem makes each row using it invalid from now on;
        its ETag stands for its content in the rows' fingerprints."""
        self._s3_checks[uri] = problem
        if etag:
            self._s3_etags[uri] = etag

    def _input_token(self, ref: ImageRef) -> str | None:
        """What stands for an input's content in the row's fingerprint (manifests/fingerprint.py);
        None while it is unknown (an s3:// object not checked yet): the row then has none."""
        if ref.kind == "url":
            return url_token(ref.value)
        if ref.kind == "s3":
            return s3_token(ref.value, self._s3_etags.get(ref.value))
        digest = self._file_hashes.get(ref.path or "")
        return file_token(digest) if digest else None

    def jobs(self) -> Iterator[JobSpec]:
        for item in self.results():
            if isinstance(item, JobSpec):
                yield item

    # -- header --------------------------------------------------------------------------

    def _header(self, header: Header) -> tuple[dict[str, str], list[Problem]]:
        problems: list[Problem] = []
        columns: dict[str, str] = {}
        seen: set[str] = set()
        for i, raw in enumerate(header.names, 1):
            name = raw.strip()
            key = name.lower()
            if not name:
                problems.append(Problem(self.name, header.line, f"column {i}", "the column has no name"))
                continue
            if key in seen:
                problems.append(Problem(self.name, header.line, name, "the column appears twice"))
                continue
            seen.add(key)
            if key in KNOWN_COLUMNS:
                columns[raw] = key
            else:
                problem = self._unknown_key(name, header.line)
                if problem:
                    problems.append(problem)
                columns[raw] = name
        for required in REQUIRED_COLUMNS:
            if required not in columns.values():
                problems.append(Problem(self.name, header.line, required, "required column is missing"))
        return columns, problems

    def _unknown_key(self, name: str, line: int) -> Problem | None:
        """Metadata is welcome, but a near-miss of a known column is a typo, and report names are taken."""
        key = name.lower()
        if key in REPORT_COLUMNS:
            return Problem(self.name, line, name, "is a column of the report; rename this metadata column")
        close = difflib.get_close_matches(key, KNOWN_COLUMNS, n=1, cutoff=0.75)
        if close:
            return Problem(self.name, line, name, f"unknown column: did you mean {close[0]!r}?")
        if not all(c.isprintable() for c in name) or len(name) > 64:
            return Problem(self.name, line, name[:64], "metadata column names must be printable, ≤ 64 chars")
        return None

    # -- rows ----------------------------------------------------------------------------

    def _row(self, row: RawRow, columns: dict[str, str], seen: dict[bytes, int]) -> JobSpec | list[Problem]:
        problems = list(row.problems)
        line = row.line
        if problems and not row.fields:
            return problems
        fields: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        if self.fmt == "csv":
            for raw_name, value in row.fields.items():
                name = columns.get(raw_name, raw_name)
                (fields if name in KNOWN_COLUMNS else metadata)[name] = value
            if all(not str(v).strip() for v in row.fields.values()):
                return [*problems, Problem(self.name, line, None, "empty row")]
        else:
            for name, value in row.fields.items():
                key = name.lower() if isinstance(name, str) else name
                if key in KNOWN_COLUMNS:
                    fields[key] = value
                elif key == "metadata" and isinstance(value, dict):
                    metadata.update(value)
                else:
                    problem = self._unknown_key(str(name), line)
                    if problem:
                        problems.append(problem)
                    metadata[name] = value
            if not row.fields:
                return [*problems, Problem(self.name, line, None, "empty row")]
            for required in REQUIRED_COLUMNS:
                if required not in fields:
                    problems.append(Problem(self.name, line, required, "is missing"))
        p = lambda fld, msg: problems.append(Problem(self.name, line, fld, msg))  # noqa: E731

        job_id = fields.get("id")
        if isinstance(job_id, int) and not isinstance(job_id, bool):
            job_id = str(job_id)
        if not isinstance(job_id, str) or not job_id.strip():
            if "id" in fields:
                p("id", "is empty")
        elif not ID_PATTERN.fullmatch(job_id) or set(job_id) == {"."}:
            p("id", f"{_show(job_id)} is not a safe id: use letters, digits, '.', '_', '-' (at most 128)")
        else:
            duplicate = _duplicate(job_id, line, seen)
            if duplicate:
                p("id", duplicate)

        prompt = fields.get("prompt")
        if "prompt" in fields and (not isinstance(prompt, str) or not prompt.strip()):
            p("prompt", "is blank" if isinstance(prompt, str) or prompt is None else "must be text")
        elif isinstance(prompt, str) and len(prompt) > MAX_PROMPT:
            p("prompt", f"is longer than {MAX_PROMPT:,} characters")
        elif isinstance(prompt, str) and (control := PROMPT_CONTROL.search(prompt)):
            code, at = f"U+{ord(control.group()):04X}", control.start() + 1
            p("prompt", f"has the control character {code} at character {at} (only tab, newline and CR may appear)")

        model_id = fields.get("model")
        if model_id is None or (isinstance(model_id, str) and not model_id.strip()):
            model_id = self.default_model
        spec = self.table.get(model_id) if isinstance(model_id, str) else None
        if spec is None:
            known = ", ".join(sorted(self.table.models))
            p("model", f"unknown model {_show(model_id)}; known: {known}")

        images, n_images = self._images(fields.get("images"), line, problems) if "images" in fields else ((), 0)
        size = self._size(fields.get("size"), spec, line, problems)
        params = self._params(fields.get("params"), spec, n_images, line, problems)
        if spec is not None and n_images > spec.max_images:
            p("images", f"has {n_images} images; {spec.id} takes 1 to {spec.max_images}")

        if not problems and spec is not None and self.schemas is not None:
            service = self.schemas(spec.id)
            if service is not None:
                body = _request_body(prompt, images, size, params)
                problems += [Problem(self.name, line, fld, msg) for fld, msg in service.problems(body)]
        if problems:
            return problems
        assert isinstance(job_id, str) and isinstance(prompt, str) and spec is not None
        tokens = [self._input_token(ref) for ref in images]
        return JobSpec(
            line=line,
            id=job_id,
            prompt=prompt,
            images=images,
            model=spec.id,
            size=size,
            params=params,
            metadata=metadata,
            fingerprint=fingerprint(spec.id, prompt, tokens, size, params),
        )

    def _images(self, value: Any, line: int, problems: list[Problem]) -> tuple[tuple[ImageRef, ...], int]:
        if self.fmt == "csv":
            items: list[Any] = [] if not isinstance(value, str) or not value.strip() else value.split("|")
        elif isinstance(value, list):
            items = value
        else:
            problems.append(Problem(self.name, line, "images", "must be a list of paths or URLs"))
            return (), 0
        if not items:
            problems.append(Problem(self.name, line, "images", "has no images (1 to 10 are needed)"))
            return (), 0
        if len(items) > 50:
            problems.append(Problem(self.name, line, "images", f"has {len(items)} images; at most 10"))
            return (), len(items)
        refs: list[ImageRef] = []
        for n, item in enumerate(items, 1):
            fld = f"images[{n}]"
            if not isinstance(item, str) or not item.strip():
                problems.append(Problem(self.name, line, fld, "is empty"))
                continue
            if "\0" in item:
                problems.append(Problem(self.name, line, fld, f"{_show(item)} has a NUL byte; no path or URL can"))
                continue
            ref, error = self._image_ref(item.strip())
            if error:
                problems.append(Problem(self.name, line, fld, error))
            elif ref:
                refs.append(ref)
        return tuple(refs), len(items)

    def _image_ref(self, text: str) -> tuple[ImageRef | None, str | None]:
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme in ("http", "https"):
            try:
                hosts = [urlsplit(text).hostname]
                if "\\" in text:  # a reader that takes it for a slash (browsers, WHATWG) sees another host
                    hosts.append(urlsplit(text.replace("\\", "/")).hostname)
            except ValueError:  # an unclosed [ of an IPv6 address
                hosts = [None]
            if not hosts[0] or any(c.isspace() for c in text):
                return None, f"{_show(text)} is not a valid URL"
            internal = [h for h in hosts if h and is_internal_host(h)]
            if internal and not self.allow_internal_urls:
                allow = "SEEDREAM_ALLOW_INTERNAL_URLS=1 allows it"
                return None, f"{_show(text)} points at an internal address ({internal[0]}); {allow}"
            return ImageRef("url", text), None
        if scheme == "s3":
            bucket, _, key = text[5:].partition("/")
            if not bucket or not key:
                return None, f"{_show(text)} must be s3://bucket/key"
            problem = self._s3_checks.setdefault(text, "")
            if problem:
                return None, f"{_show(text)}: {problem}"
            return ImageRef("s3", text), None
        if scheme or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:(?![\\/])", text):
            shown = scheme or text.split(":", 1)[0]
            return None, f"URL scheme {shown!r} is not supported: use http(s)://, s3:// or a local path"
        path = (self.path.parent / text).resolve()
        if self.check_files:
            error = self._check_file(str(path))
            if error:
                return None, f"{_show(text)}: {error}"
        else:
            self._hash_file(str(path))
        return ImageRef("local", text, str(path)), None

    def _hash_file(self, path: str) -> None:
        """A file's hash for the row's fingerprint when files are not checked (a run resumed from
        storage): one that cannot be read now gives the row no fingerprint, not a problem."""
        if path in self._file_hashes:
            return
        self._file_hashes[path] = ""  # unreadable: no fingerprint
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            self._file_hashes[path] = hashlib.file_digest(fh, "sha256").hexdigest()

    def _check_file(self, path: str) -> str | None:
        if path in self._file_checks:
            return self._file_checks[path]
        error: str | None = None
        try:
            size = os.stat(path).st_size
            if not os.path.isfile(path):
                error = "is not a file"
            elif size > MAX_IMAGE_BYTES:
                error = f"is {size / 1048576:.1f} MB; the service takes at most 10 MB"
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
                info = inspect(data)
                self._file_hashes[path] = hashlib.sha256(data).hexdigest()
                if info.width < MIN_SIDE or info.height < MIN_SIDE:
                    error = f"is {info.width}x{info.height} px; each side must be more than 14 px"
        except FileNotFoundError:
            error = "file not found"
        except PermissionError:
            error = "cannot be read (permission denied)"
        except IsADirectoryError:
            error = "is a folder, not a file"
        except NotAnImage as exc:
            error = f"is not a usable image: {exc}"
        except OSError as exc:
            error = f"cannot be read ({exc.strerror or exc})"
        self._file_checks[path] = error
        return error

    def _size(self, value: Any, spec: ModelSpec | None, line: int, problems: list[Problem]) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        m = re.fullmatch(r"\s*(\d{1,6})\s*[*xX\u00d7]\s*(\d{1,6})\s*", str(value))
        if not m:
            problems.append(Problem(self.name, line, "size", f"{_show(value)} is not W*H (e.g. 2048*2048)"))
            return None
        w, h = int(m.group(1)), int(m.group(2))
        if spec is not None:
            px = w * h
            if w == 0 or h == 0 or px < spec.min_pixels or px > spec.max_pixels:
                problems.append(
                    Problem(
                        self.name,
                        line,
                        "size",
                        f"{w}*{h} is {px:,} pixels; {spec.id} needs {spec.min_pixels:,} to {spec.max_pixels:,}",
                    )
                )
            elif max(w, h) > spec.max_aspect * min(w, h):
                problems.append(Problem(self.name, line, "size", f"{w}*{h}: aspect ratio beyond 1:16"))
        return f"{w}*{h}"

    def _params(
        self, value: Any, spec: ModelSpec | None, n_images: int, line: int, problems: list[Problem]
    ) -> dict[str, Any]:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                problems.append(Problem(self.name, line, "params", f"is not valid JSON ({exc})"))
                return {}
        if not isinstance(value, dict):
            problems.append(Problem(self.name, line, "params", "must be a JSON object"))
            return {}
        for key, v in value.items():
            fld = f"params.{key}"
            if key in RESERVED_PARAMS:
                problems.append(Problem(self.name, line, fld, f"set {key!r} in its own column, not in params"))
            elif key in UNSUPPORTED_PARAMS:
                problems.append(Problem(self.name, line, fld, UNSUPPORTED_PARAMS[key]))
            elif spec is not None and key not in spec.params:
                known = ", ".join(sorted(spec.params)) or "none"
                problems.append(Problem(self.name, line, fld, f"unknown parameter for {spec.id}; known: {known}"))
            elif key in PARAM_TYPES and (
                not isinstance(v, PARAM_TYPES[key]) or (PARAM_TYPES[key] is int and isinstance(v, bool))
            ):
                problems.append(Problem(self.name, line, fld, f"must be {PARAM_TYPES[key].__name__}"))  # type: ignore[union-attr]
        n_out = value.get("max_images", 1)
        if spec is not None and isinstance(n_out, int) and not 1 <= n_out <= spec.max_total_images - n_images:
            problems.append(
                Problem(
                    self.name,
                    line,
                    "params.max_images",
                    f"inputs plus outputs must be at most {spec.max_total_images}",
                )
            )
        return value


def _request_body(
    prompt: Any, images: tuple[ImageRef, ...], size: str | None, params: dict[str, Any]
) -> dict[str, Any]:
    """What the submit would send. Local files and s3:// objects reach the service as links
    (uploaded or presigned), so each stands in as a link here."""
    links = [ref.value if ref.kind == "url" else f"https://inputs.invalid/{n}" for n, ref in enumerate(images, 1)]
    body: dict[str, Any] = {"prompt": prompt, "images": links, **params}
    if size is not None:
        body["size"] = size
    return body


def _duplicate(job_id: str, line: int, seen: dict[bytes, int]) -> str | None:
    """Ids name output folders and files, which case-insensitive file systems (macOS, Windows)
    cannot tell apart by case alone. Each id is kept as the 8-byte digest of its folded form,
    mapped to its line and a checksum of its exact form, so the message can say which it is."""
    key = hashlib.blake2b(job_id.casefold().encode(), digest_size=8).digest()
    exact = zlib.crc32(job_id.encode())
    first = seen.setdefault(key, line << 32 | exact)
    first_line = first >> 32
    if first_line == line:
        return None
    if first & 0xFFFFFFFF == exact:
        return f"duplicate id {job_id!r} (first on line {first_line})"
    why = "ids name files, and macOS and Windows ignore case"
    return f"duplicate id {job_id!r} ignoring case (first on line {first_line}): {why}"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…'"
