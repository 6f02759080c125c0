"""Every setting in one table: its environment variable, its flag, its key in the TOML file.

Layers, lowest first: the default, `seedream-batch.toml` (or the file SEEDREAM_CONFIG or
`--config` names), the environment, a flag. `resolve` layers them once into a `Settings`
object, which is passed down: the typed config objects (`WorkerSettings`, `Limits`,
`AtlasConfig`, Celery's config) are built from it, and every worker a command starts is given
its values. Only `jobs.environment` reads the process's environment. `seedream-batch config`
prints the result and where each value came from, secrets masked.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from jobs.secret import Secret
from manifests.errors import ConfigError

FILE_NAME = "seedream-batch.toml"
CONFIG_ENV = "SEEDREAM_CONFIG"


@dataclass(frozen=True)
class Setting:
    name: str  # the key in the TOML file
    env: str
    kind: type  # the type of its attribute on `Settings`
    default: str  # as the environment would hold it; "" is unset
    help: str
    secret: bool = False  # masked wherever it is shown
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The global option. A secret is read from a file named on the command line: a value
        typed there would show in `ps` and the shell's history."""
        return f"--{self.name.replace('_', '-')}" + ("-file" if self.kind is Secret else "")


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("api_key", "ATLASCLOUD_API_KEY", Secret, "", "the Atlas Cloud API key", secret=True),
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
    """A value from the file or a flag as environment text, or ConfigError naming where it came from."""
    if isinstance(value, dict | list) or (isinstance(value, bool) and setting.kind is not bool):
        raise ConfigError(f"{where}: {setting.name} must be {_kind_name(setting)}, got {_shown(setting, value)}")
    parsed = _parse(setting, str(value), where=where)
    return ("1" if parsed else "0") if setting.kind is bool else str(value)


def _parse(setting: Setting, text: str, *, where: str) -> Any:
    """`text` as the setting's type: the one place a setting's text becomes its value. A value
    that is not one is refused, naming `where` it came from (a variable, the file, a flag)."""
    if setting.kind is bool:
        if text.strip().lower() not in BOOL_TEXT:
            raise ConfigError(f"{where}: {setting.name} must be a bool (1/0, true/false), got {text!r}")
        return BOOL_TEXT[text.strip().lower()]
    if setting.kind in (int, float):
        try:
            return setting.kind(text)
        except ValueError:
            raise ConfigError(f"{where}: {setting.name} must be {_kind_name(setting)}, got {text!r}") from None
    if setting.choices and text not in setting.choices:
        raise ConfigError(f"{where}: {setting.name} must be one of {', '.join(setting.choices)}, got {text!r}")
    return Secret(text) if setting.kind is Secret else text


def _kind_name(setting: Setting) -> str:
    """The kind in the words of a message a user reads."""
    return {int: "a whole number", float: "a number", bool: "a bool"}.get(setting.kind, "text")


def _shown(setting: Setting, value: Any) -> str:
    return "a value (not shown: a secret)" if setting.secret else repr(value)


def resolve(
    environ: Mapping[str, str],
    *,
    config: str | None = None,
    flags: Mapping[str, Any] | None = None,
    read_config: bool = True,
) -> Settings:
    """The layers, lowest first: default, file, `environ`, flags, each value parsed once, here.
    A bad value is refused (ConfigError), naming the variable, file or flag it came from."""
    return layer(environ, config=config, flags=flags, read_config=read_config).parse()


def layer(
    environ: Mapping[str, str],
    *,
    config: str | None = None,
    flags: Mapping[str, Any] | None = None,
    read_config: bool = True,
) -> Layers:
    """The settings given, as text, with where each came from: not parsed yet, so that
    `seedream-batch config` can still show a bad value from the environment (the file's values
    and the flags are checked on the way in)."""
    # An empty variable (`SEEDREAM_MAX_IN_FLIGHT=`, as a compose file or a unit template leaves
    # one it has no value for) is one not set: the file's value, or the default, stands.
    texts = {s.name: environ[s.env] for s in SETTINGS if environ.get(s.env, "").strip()}
    sources = dict.fromkeys(texts, "env")
    path = find_file(config, environ) if read_config else None
    if path is not None:
        for env, text in read_file(path).items():
            name = _name_of(env)
            if name not in texts:
                texts[name] = text
                sources[name] = f"file {path}"
    return Layers(MappingProxyType(texts), MappingProxyType(sources)).with_flags(**(flags or {}))


def _name_of(env: str) -> str:
    return next(s.name for s in SETTINGS if s.env == env)


@dataclass(frozen=True)
class Layers:
    """The settings given (file, environment, flags) as the environment would hold them, and
    where each came from. `parse` makes them a `Settings`; what a worker process is handed
    (`environment`) and what `config` shows (`rows`) are this text."""

    texts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __repr__(self) -> str:  # the key and the webhook must not reach a log line or a traceback
        return f"Layers({_given(self.rows())})"

    def with_flags(self, **flags: Any) -> Layers:
        """These settings with a command's flags on top (None: not given), checked like the
        global flags and shown as their source."""
        texts, sources = dict(self.texts), dict(self.sources)
        for name, value in flags.items():
            if value is None:
                continue
            setting = BY_NAME[name]
            texts[name] = check(setting, value, where=setting.flag)
            sources[name] = f"flag {setting.flag}"
        return Layers(MappingProxyType(texts), MappingProxyType(sources))

    def parse(self) -> Settings:
        """Every setting as its type, its default where it was not given."""
        values = {s.name: _parse(s, self.texts.get(s.name, s.default), where=self._where(s)) for s in SETTINGS}
        return Settings(**values, layers=self)

    def _where(self, setting: Setting) -> str:
        source = self.sources.get(setting.name, "default")
        if source == "env":
            return f"{setting.env} in the environment"
        return source.removeprefix("file ").removeprefix("flag ")

    def environment(self) -> dict[str, str]:
        """The settings given, under their variables: what a worker process started from here
        needs in its environment to resolve the same values."""
        return {BY_NAME[name].env: text for name, text in self.texts.items()}

    def rows(self) -> list[dict[str, str]]:
        """Every setting's value, masked where secret, with its source (`seedream-batch config`)."""
        return [
            {
                "setting": s.name,
                "value": mask(s, self.texts.get(s.name, s.default)),
                "source": self.sources.get(s.name, "default"),
                "env": s.env,
                "flag": s.flag,
            }
            for s in SETTINGS
        ]


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings:
    """Every setting, resolved once into its type (one attribute per row of `SETTINGS`, in its
    order: tests/test_settings.py keeps the two alike), with the text it was given and where that
    came from (`layers`). It is passed down, never re-read: a value does not depend on when a
    module was imported, and the workers a command starts get the same values (`environment()`).
    The typed views (`WorkerSettings`, `Limits`, `AtlasConfig`, Celery's config) are built from
    it and refuse a value their own rules do not allow (a rate of 0, a link TTL of 8 days)."""

    api_key: Secret
    api_base: str
    balance_url: str
    user_agent: str
    http_timeout: float
    max_output_mb: float
    models_file: str
    redis_url: str
    broker_url: str
    prefix: str
    queue: str
    fetch_queue: str
    s3_endpoint: str
    submit_rate: float
    submit_burst: int
    poll_rate: float
    upload_rate: float
    max_in_flight: int
    rate_headroom: float
    window: int
    slot_lease: float
    visibility_timeout: int
    restore_interval: int
    step_lease: float
    poll_deadline: float
    warmup_grace: float
    allocator: str
    task_events: int
    liveness: float
    log_format: str
    log_level: str
    metrics_port: int
    metrics_host: str
    notify_url: str
    notify_attempts: int
    inputs: str
    inputs_bucket: str
    input_link_ttl: int
    bulk_upload_threshold: int
    allow_bulk_upload: bool
    allow_internal_urls: bool
    layers: Layers = field(compare=False)

    def __repr__(self) -> str:  # the key, the webhook and the URLs' passwords stay masked
        return f"Settings({_given(self.rows())})"

    @property
    def sources(self) -> Mapping[str, str]:
        """Where each setting given came from: `env`, `file <path>`, `flag <flag>`."""
        return self.layers.sources

    def given(self, name: str) -> bool:
        """Whether setting `name` was given (file, environment or flag) rather than defaulted."""
        return name in self.layers.sources

    def with_flags(self, **flags: Any) -> Settings:
        """These settings with a command's flags on top (None: not given)."""
        return self.layers.with_flags(**flags).parse()

    def environment(self) -> dict[str, str]:
        return self.layers.environment()

    def rows(self) -> list[dict[str, str]]:
        return self.layers.rows()

    def secrets(self) -> list[str]:
        """The values a log line must never show."""
        return [value for value in (self.api_key.reveal(), self.notify_url) if value]


def _given(rows: list[dict[str, str]]) -> str:
    """The settings given, masked where secret: what a repr shows."""
    return ", ".join(f"{r['setting']}={r['value']!r}" for r in rows if r["source"] != "default")


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
