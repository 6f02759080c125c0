"""What a valid manifest row becomes, and how a problem with a row is reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ImageKind = Literal["local", "url", "s3"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, said so a person can find and fix it."""

    file: str
    line: int  # 1-based physical line where the row starts; 0 for the file as a whole
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass(frozen=True)
class ImageRef:
    kind: ImageKind
    value: str  # as written in the manifest (a URL, s3:// URI, or the relative path)
    path: str | None = None  # absolute path, for local files


@dataclass(frozen=True)
class JobSpec:
    """A validated row: everything a worker needs to run one edit."""

    line: int
    id: str
    prompt: str
    images: tuple[ImageRef, ...]
    model: str
    size: str | None = None  # normalised to "W*H"
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # the request's (manifests/fingerprint.py); "" when it cannot be known
