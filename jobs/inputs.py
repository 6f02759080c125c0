"""How a run's local and s3:// inputs reach the service, decided before anything is spent.

The service's `uploadMedia` is for temporary generation inputs, and its own documentation
warns that bulk uploads may get the API key suspended: a catalogue re-shoot pushed through
it could stop the team's only account in the middle of the night. So inputs go as presigned
GET links from the user's own bucket wherever there is one: `s3://` inputs as they are, local
files staged once per content hash under `<output>/inputs/` (or `--inputs-bucket`), where
every later run writing there finds them. `uploadMedia` is left for a folder output without
a bucket, and past a threshold a run must be told that this is really wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from manifests.errors import ConfigError, SeedreamError

MODES = ("auto", "presign", "upload")
STAGE_FOLDER = "inputs"
SERVICE_WARNING = (
    'the service says uploadMedia is "strictly for temporary use with Atlas Cloud generation tasks", '
    'its files are cleaned up periodically, and "bulk uploads ... may result in immediate API key suspension"'
)


class InputsRefused(SeedreamError):
    """The inputs would go through uploadMedia where the settings forbid it: nothing was spent."""


@dataclass(frozen=True)
class InputPlan:
    mode: str  # as asked: auto | presign | upload
    stage: str  # s3://bucket/prefix where local files are staged; "" where there is none

    @property
    def presigns_s3(self) -> bool:
        return self.mode != "upload"

    @property
    def uploads_local(self) -> bool:
        return self.mode == "upload" or not self.stage

    def meta(self) -> dict[str, Any]:
        """What the workers read from the run's meta (a run from before this has neither: upload)."""
        return {"inputs_mode": self.mode, "inputs_stage": "" if self.mode == "upload" else self.stage}

    def uploads(self, local_files: int, s3_objects: int) -> int:
        """Distinct files that would go through uploadMedia."""
        return (local_files if self.uploads_local else 0) + (0 if self.presigns_s3 else s3_objects)


def plan(mode: str, output: str | None, inputs_bucket: str | None) -> InputPlan:
    if mode not in MODES:
        raise ConfigError(f"--inputs {mode!r}: use one of {', '.join(MODES)}")
    bucket = (inputs_bucket or "").strip()
    if bucket:
        parts = urlsplit(bucket)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"--inputs-bucket {bucket!r}: expected s3://bucket/prefix")
        return InputPlan(mode, bucket.rstrip("/"))
    if output and output.startswith("s3://"):
        return InputPlan(mode, f"{output.rstrip('/')}/{STAGE_FOLDER}")
    return InputPlan(mode, "")


def upload_verdict(
    p: InputPlan, local_files: int, s3_objects: int, *, threshold: int, allow: bool
) -> tuple[str | None, str | None]:
    """(warning, refusal) about the files that would go through uploadMedia. `presign` refuses
    any; above `threshold` a run is refused unless `allow` (validate and estimate only warn)."""
    n = p.uploads(local_files, s3_objects)
    if not n:
        return None, None
    if p.mode == "presign":
        why = (
            f"--inputs presign: {n:,} local files would have to go through the service's uploadMedia; "
            "stage them in your bucket with --inputs-bucket s3://bucket/prefix (or an s3:// --output)"
        )
        return why, why
    if n <= threshold:
        return None, None
    warning = (
        f"{n:,} distinct files would go through the service's uploadMedia (more than {threshold:,}); "
        f"{SERVICE_WARNING}. Pass --inputs-bucket s3://bucket/prefix to send links from your own bucket "
        "instead, or --allow-bulk-upload to upload them anyway"
    )
    return warning, None if allow else warning
