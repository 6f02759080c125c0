"""Every setting in one table: its environment variable, its flag, its key in the TOML file.

Layers, lowest first: the default, `seedream-batch.toml` (or the file SEEDREAM_CONFIG or
`--config` names), the environment, a flag. The file and the flags are written into the
process's environment, under each setting's variable, before anything reads it: the typed
config objects (`WorkerSettings`, `Limits`, `AtlasConfig`, celeryconfig) are then built once
from one place, and every worker a command starts sees the same values. `seedream-batch
config` prints the result and where each value came from, secrets masked.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from manifests.errors import ConfigError

FILE_NAME = "seedream-batch.toml"
CONFIG_ENV = "SEEDREAM_CONFIG"


@dataclass(frozen=True)
class Setting:
    name: str  # the key in the TOML file
    env: str
    kind: type
    default: str  # as the environment would hold it; "" is unset
    help: str
    secret: bool = False  # masked wherever it is shown
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The global option. A secret is read from a file named on the command line: a value
        typed there would show in `ps` and the shell's history."""
        return f"--{self.name.replace('_', '-')}" + ("-file" if self.secret and self.name == "api_key" else "")


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("api_key", "ATLASCLOUD_API_KEY", str, "", "the Atlas Cloud API key", secret=True),
    S("api_base", "ATLASCLOUD_API_BASE", str, "https://api.atlascloud.ai/api/v1", "the service's API base URL"),
    S("balance_url", "ATLASCLOUD_BALANCE_URL", str, "", "the balance endpoint (default: derived from api_base)"),
    S(
        "user_agent",
        "SEEDREAM_USER_AGENT",
        str,
        "",
        "the User-Agent of every HTTP call (default: seedream-batch/<version>)",
    ),
    S("http_timeout", "SEEDREAM_HTTP_TIMEOUT", float, "30", "read/write timeout of every HTTP call, seconds"),
    S("max_output_mb", "SEEDREAM_MAX_OUTPUT_MB", float, "64", "an output larger than this is cut off; the job fails"),
    S("models_file", "SEEDREAM_MODELS_FILE", str, "", "JSON file overriding model prices and limits"),
    S("redis_url", "REDIS_URL", str, "redis://127.0.0.1:6379/0", "coordination state (and the broker)", secret=True),
    S("broker_url", "SEEDREAM_BROKER_URL", str, "", "the Celery broker, if not redis_url", secret=True),
    S("prefix", "SEEDREAM_PREFIX", str, "seedream", "the prefix of every Redis key this project writes"),
    S("queue", "SEEDREAM_QUEUE", str, "seedream", "the Celery queue runs use for submits and polls"),
    S("fetch_queue", "SEEDREAM_FETCH_QUEUE", str, "", "a queue of its own for downloads and storage writes"),
    S("s3_endpoint", "AWS_ENDPOINT_URL", str, "", "an S3-compatible endpoint (MinIO, R2, a local one)"),
    S("submit_rate", "SEEDREAM_SUBMIT_RATE", float, "2", "submits per second per API key, on all hosts"),
    S("submit_burst", "SEEDREAM_SUBMIT_BURST", int, "1", "submits that may go back to back"),
    S("poll_rate", "SEEDREAM_POLL_RATE", float, "20", "polls per second per API key"),
    S("upload_rate", "SEEDREAM_UPLOAD_RATE", float, "5", "uploads per second per API key"),
    S(
        "max_in_flight",
        "SEEDREAM_MAX_IN_FLIGHT",
        int,
        "0",
        "a ceiling on predictions in flight per API key; 0: as many as the service takes (learned)",
    ),
    S("rate_headroom", "SEEDREAM_RATE_HEADROOM", float, "0.03", "plan every rate this share under its limit"),
    S(
        "window",
        "SEEDREAM_WINDOW",
        int,
        "0",
        "jobs of a run with a task message out at once (0: the in-flight slots + 2 s of submits + 1/8)",
    ),
    S("slot_lease", "SEEDREAM_SLOT_LEASE", float, "120", "seconds a slot outlives a worker that stopped"),
    S("visibility_timeout", "SEEDREAM_VISIBILITY_TIMEOUT", int, "300", "seconds before a lost worker's tasks return"),
    S("restore_interval", "SEEDREAM_RESTORE_INTERVAL", int, "5", "seconds between the broker's restore sweeps"),
    S("step_lease", "SEEDREAM_STEP_LEASE", float, "180", "seconds one task step may run before a takeover"),
    S(
        "poll_deadline",
        "SEEDREAM_POLL_DEADLINE",
        float,
        "900",
        "a prediction running longer is overdue (polled again by resume)",
    ),
    S(
        "warmup_grace",
        "SEEDREAM_WARMUP_GRACE",
        float,
        "30",
        "seconds after a submit when a 400/404 poll means still starting",
    ),
    S(
        "allocator",
        "SEEDREAM_ALLOCATOR",
        str,
        "jemalloc",
        "malloc of workers started here: jemalloc when installed, else glibc",
        choices=("jemalloc", "glibc"),
    ),
    S("task_events", "SEEDREAM_TASK_EVENTS", int, "0", "1: workers always send task events (Flower turns them on)"),
    S("liveness", "SEEDREAM_LIVENESS", float, "60", "a worker whose event loop stalls this long exits (0: off)"),
    S("log_format", "SEEDREAM_LOG_FORMAT", str, "text", "log lines as text or JSON objects", choices=("text", "json")),
    S("log_level", "SEEDREAM_LOG_LEVEL", str, "", "DEBUG, INFO, WARNING, ... (default: the command's)"),
    S("metrics_port", "SEEDREAM_METRICS_PORT", int, "0", "a worker's Prometheus port (0: off; local workers +1 each)"),
    S("metrics_host", "SEEDREAM_METRICS_HOST", str, "127.0.0.1", "the address the metrics endpoint listens on"),
    S("notify_url", "SEEDREAM_NOTIFY_URL", str, "", "POST the run's summary here when it ends", secret=True),
    S("notify_attempts", "SEEDREAM_NOTIFY_ATTEMPTS", int, "5", "tries of that POST before giving up"),
    S(
        "inputs",
        "SEEDREAM_INPUTS",
        str,
        "auto",
        "how local and s3:// inputs reach the service: auto, presign (never upload) or upload (uploadMedia)",
        choices=("auto", "presign", "upload"),
    ),
    S("inputs_bucket", "SEEDREAM_INPUTS_BUCKET", str, "", "s3://bucket/prefix where local inputs are staged"),
    S("input_link_ttl", "SEEDREAM_INPUT_LINK_TTL", int, "3600", "seconds a presigned input link works"),
    S(
        "bulk_upload_threshold",
        "SEEDREAM_BULK_UPLOAD_THRESHOLD",
        int,
        "100",
        "more distinct files than this through uploadMedia need --allow-bulk-upload",
    ),
    S("allow_bulk_upload", "SEEDREAM_ALLOW_BULK_UPLOAD", bool, "0", "upload past the threshold anyway"),
    S(
        "allow_internal_urls",
        "SEEDREAM_ALLOW_INTERNAL_URLS",
        bool,
        "0",
        "input URLs at loopback, private or link-local addresses pass validation",
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
BOOL_TEXT = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("", "0", "false", "no", "off"), False)}


def find_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The TOML file in use: named by --config or SEEDREAM_CONFIG (it must exist), else
    ./seedream-batch.toml when there is one."""
    named = explicit or environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"config file {named} does not exist")
        return path
    local = Path(FILE_NAME)
    return local if local.is_file() else None


def read_file(path: Path) -> dict[str, str]:
    """The file's settings as environment text, every key and type checked."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        setting = BY_NAME.get(key)
        if setting is None:
            near = difflib.get_close_matches(key, BY_NAME, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}; `seedream-batch config` lists them")
        out[setting.env] = check(setting, value, where=str(path))
    return out


def check(setting: Setting, value: Any, *, where: str) -> str:
    """The value as environment text, or ConfigError naming where it came from."""
    if isinstance(value, dict | list) or (isinstance(value, bool) and setting.kind is not bool):
        raise ConfigError(f"{where}: {setting.name} must be a {setting.kind.__name__}, got {value!r}")
    text = str(value)
    if setting.kind is bool:
        if text.strip().lower() not in BOOL_TEXT:
            raise ConfigError(f"{where}: {setting.name} must be a bool (1/0, true/false), got {value!r}")
        return "1" if BOOL_TEXT[text.strip().lower()] else "0"
    if setting.kind in (int, float):
        try:
            setting.kind(text)
        except ValueError:
            raise ConfigError(f"{where}: {setting.name} must be a {setting.kind.__name__}, got {value!r}") from None
    if setting.choices and text not in setting.choices:
        raise ConfigError(f"{where}: {setting.name} must be one of {', '.join(setting.choices)}, got {value!r}")
    return text


def apply(
    environ: MutableMapping[str, str], *, config: str | None = None, flags: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Layer the file and the flags into `environ`; return each setting's source."""
    sources = {s.name: ("env" if s.env in environ else "default") for s in SETTINGS}
    path = find_file(config, environ)
    if path is not None:
        for env, text in read_file(path).items():
            if env not in environ:
                environ[env] = text
                sources[_name_of(env)] = f"file {path}"
    for name, value in (flags or {}).items():
        if value is None:
            continue
        setting = BY_NAME[name]
        environ[setting.env] = check(setting, value, where=setting.flag)
        sources[name] = f"flag {setting.flag}"
    return sources


def apply_file(environ: MutableMapping[str, str]) -> None:
    """For processes started without the CLI (`celery -A workers worker`): the file, under the
    environment."""
    apply(environ)


def _name_of(env: str) -> str:
    return next(s.name for s in SETTINGS if s.env == env)


def effective(environ: Mapping[str, str], sources: Mapping[str, str]) -> list[dict[str, str]]:
    """Every setting's value now, masked where secret, with its source."""
    rows = []
    for s in SETTINGS:
        value = environ.get(s.env, s.default)
        rows.append(
            {
                "setting": s.name,
                "value": mask(s, value),
                "source": sources.get(s.name, "env" if s.env in environ else "default"),
                "env": s.env,
                "flag": s.flag,
            }
        )
    return rows


def mask(setting: Setting, value: str) -> str:
    """A secret shows only whether it is set. A URL keeps its scheme and host: a password in
    it goes, and so does a webhook's path (Slack-style hooks carry their token there)."""
    if not setting.secret or not value:
        return value
    parts = urlsplit(value)
    if parts.scheme and parts.netloc:
        host = parts.netloc.rsplit("@", 1)[-1]
        userinfo = "***@" if "@" in parts.netloc else ""
        path = "/***" if setting.name == "notify_url" and parts.path not in ("", "/") else parts.path
        return f"{parts.scheme}://{userinfo}{host}{path}"
    return "******** (set)"


def environ_default(name: str) -> str:
    """The value of setting `name` in this process (its default when unset)."""
    s = BY_NAME[name]
    return os.environ.get(s.env, s.default)


def environ_flag(name: str) -> bool:
    """A bool setting in this process; the environment is not checked on the way in as the file
    and the flags are, so a value that means neither is refused here rather than read as off."""
    text = environ_default(name).strip().lower()
    if text not in BOOL_TEXT:
        raise ConfigError(f"{BY_NAME[name].env} must be 1/0 or true/false, got {text!r}")
    return BOOL_TEXT[text]
