"""Where results last: an S3 bucket/prefix or a local folder, behind one small interface.

Every key is relative to `<output>/<run_id>/` and checked segment by segment, so
no id or name from a manifest or the service can write outside the run's prefix.
botocore errors become StorageError here, where they enter.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from manifests.errors import ConfigError, StorageError
from manifests.s3 import s3_client

_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,160}")


def safe_key(key: str) -> str:
    parts = key.split("/")
    for part in parts:
        if not _SEGMENT.fullmatch(part) or set(part) == {"."}:
            raise StorageError(f"refusing an unsafe storage key {key[:200]!r}")
    return key


class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> str: ...
    def put_json(self, key: str, obj: Any) -> str: ...
    def get_json(self, key: str) -> Any | None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def uri(self, key: str) -> str: ...
    def presign(self, key: str, seconds: int) -> str: ...
    def copy_in(self, source: Storage, source_key: str, key: str, metadata: Mapping[str, str]) -> str | None: ...


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


class _JsonOnBytes:
    """JSON documents stored through a class's own put_bytes/get_bytes."""

    def put_bytes(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> str:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, _dumps(obj), "application/json")

    def get_json(self, key: str) -> Any | None:
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def copy_in(self, source: Storage, source_key: str, key: str, metadata: Mapping[str, str]) -> str | None:
        """Another store's object under `key` here; None when it is not there. Across kinds of
        store the bytes pass through this process; S3 to S3 and folder to folder they do not."""
        data = source.get_bytes(source_key)
        if data is None:
            return None
        return self.put_bytes(key, data, content_type(key), metadata)


class LocalStorage(_JsonOnBytes):
    """A folder; writes go to a temp file and are renamed, so a reader never sees half a file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        return str(path)

    def copy_in(self, source: Storage, source_key: str, key: str, metadata: Mapping[str, str]) -> str | None:
        if not isinstance(source, LocalStorage):
            return super().copy_in(source, source_key, key, metadata)
        path, origin = self._path(key), source._path(source_key)
        try:  # the destination: a failure here is this store's, and passes
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot copy to {path}: {exc.strerror or exc}") from None
        try:
            shutil.copyfile(origin, tmp)
            os.replace(tmp, path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # the source is not there as a file
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot copy to {path}: {exc.strerror or exc}") from None
        return str(path)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from None

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield str(path.relative_to(self.root))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc.strerror or exc}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def presign(self, key: str, seconds: int) -> str:
        raise ConfigError("links that work for a set time need an s3:// output; a folder's report links relatively")


class S3Storage(_JsonOnBytes):
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # 32 connections: the results index is listed 16 shards at a time
        self.client = client or s3_client(endpoint_url, pool=32)

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StorageError(f"S3 {what} failed: {code or exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 {what} failed: {type(exc).__name__}") from None

    def put_bytes(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> str:
        full = self._key(key)
        meta = {k: _ascii(v) for k, v in (metadata or {}).items()}
        self._call(
            "put",
            self.client.put_object,
            Bucket=self.bucket,
            Key=full,
            Body=data,
            ContentType=content_type,
            Metadata=meta,
        )
        return f"s3://{self.bucket}/{full}"

    def copy_in(self, source: Storage, source_key: str, key: str, metadata: Mapping[str, str]) -> str | None:
        """A server-side copy (no bytes through this process) when both are in S3."""
        if not isinstance(source, S3Storage):
            return super().copy_in(source, source_key, key, metadata)
        full = self._key(key)
        done = self._call(
            "copy",
            self.client.copy_object,
            Bucket=self.bucket,
            Key=full,
            CopySource={"Bucket": source.bucket, "Key": source._key(source_key)},
            MetadataDirective="REPLACE",
            ContentType=content_type(key),
            Metadata={k: _ascii(v) for k, v in metadata.items()},
        )
        return None if done is None else f"s3://{self.bucket}/{full}"

    def get_bytes(self, key: str) -> bytes | None:
        out = self._call("get", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        if out is None:
            return None
        try:
            return bytes(out["Body"].read())
        except Exception as exc:
            raise StorageError(f"S3 get failed while reading: {type(exc).__name__}") from None

    def list(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix.rstrip("/")) + "/"
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", self.client.list_objects_v2, **kwargs) or {}
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        """A HEAD: whether the object is there (a staged input is then not put again)."""
        return self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._key(key)) is not None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presign(self, key: str, seconds: int) -> str:
        """A GET link that works without credentials for `seconds` (signed locally, no request)."""
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        fn = self.client.generate_presigned_url
        return str(self._call("presign", fn, ClientMethod="get_object", Params=params, ExpiresIn=int(seconds)))


def stored_records(storage: Storage) -> list[dict[str, Any]]:
    """Every durable job record of a run (`records/<id>.json`), for when Redis no longer knows it."""
    records = (storage.get_json(k) for k in storage.list("records") if k.endswith(".json"))
    return [r for r in records if isinstance(r, dict)]


def content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _ascii(value: str) -> str:
    return value.encode("ascii", "replace").decode()[:256]


def open_storage(output: str, run_id: str, *, endpoint_url: str | None = None) -> Storage:
    """The run's own store: `<output>/<run_id>/` in S3 or on disk."""
    if not _SEGMENT.fullmatch(run_id) or set(run_id) == {"."}:
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_', '-'")
    if run_id.startswith("_"):  # `_results/` and its like belong to the output, not to a run
        raise ConfigError(f"run id {run_id!r}: must not start with '_'")
    return open_output(output, under=run_id, endpoint_url=endpoint_url)


def open_output(output: str, *, under: str = "", endpoint_url: str | None = None) -> Storage:
    """The output itself (or a folder `under` it): `doctor` probes here what every run will need.
    An empty output is refused: read as a folder it would be the working directory of whoever
    opened it, and a paid result written there is lost to the run."""
    if not output.strip():
        raise ConfigError("no output given: a run writes to --output (a folder or s3://bucket/prefix)")
    if output.startswith("s3://"):
        parts = urlsplit(output)
        if not parts.netloc:
            raise ConfigError(f"--output {output!r}: expected s3://bucket/prefix")
        prefix = "/".join(p for p in (parts.path.strip("/"), under) if p)
        return S3Storage(parts.netloc, prefix, endpoint_url=endpoint_url)
    if "://" in output:
        raise ConfigError(f"--output {output!r}: use s3://bucket/prefix or a local folder")
    return LocalStorage(Path(output) / under if under else Path(output))
