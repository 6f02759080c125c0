"""Settings: one table, three ways in (file, environment, flag), one way to see them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import click
import pytest
from click.testing import CliRunner

from cli.inputs import inputs_options
from cli.options import s3_endpoint_option
from jobs.config import DEFAULT_USER_AGENT, AtlasConfig, Limits, WorkerSettings
from jobs.secret import Secret
from jobs.settings import BOOL_TEXT, BY_NAME, SETTINGS, Settings, mask, resolve
from manifests.errors import ConfigError
from tests.pipeline import EXE

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEEDREAM_", "ATLASCLOUD_")) and k != "REDIS_URL"}
    env.update(extra)
    return env


def config_json(tmp: Path, *args: str, env: dict[str, str]) -> dict[str, dict[str, str]]:
    argv = [EXE, *args, "config", "--json"]
    done = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {row["setting"]: row for row in json.loads(done.stdout)}


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    (tmp_path / "seedream-batch.toml").write_text(
        'submit_rate = 7\nmax_in_flight = 40\nqueue = "from-file"\nlog_format = "json"\n'
        'notify_url = "https://hooks.example/services/T0/B0/hook-token"\n'
    )
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-a-file-0123456789\n")
    env = _env(SEEDREAM_MAX_IN_FLIGHT="50", REDIS_URL="redis://:redis-pass@127.0.0.1:6379/3")
    got = config_json(tmp_path, "--max-in-flight", "9", "--api-key-file", str(key_file), env=env)
    assert (got["submit_rate"]["value"], got["submit_rate"]["source"]) == ("7", f"file {Path('seedream-batch.toml')}")
    assert (got["max_in_flight"]["value"], got["max_in_flight"]["source"]) == ("9", "flag --max-in-flight")
    assert got["queue"]["value"] == "from-file" and got["poll_rate"] == {**got["poll_rate"], "source": "default"}
    assert got["redis_url"]["source"] == "env" and got["redis_url"]["value"] == "redis://***@127.0.0.1:6379/3"
    assert got["api_key"]["value"] == "******** (set)" and got["api_key"]["source"] == "flag --api-key-file"
    assert got["notify_url"]["value"] == "https://hooks.example/***"
    shown = json.dumps(got)
    assert "sk-from-a-file" not in shown and "redis-pass" not in shown and "hook-token" not in shown
    env_only = config_json(tmp_path, env=env)
    assert env_only["max_in_flight"]["value"] == "50"  # without the flag, the environment wins over the file


def test_the_file_reaches_a_worker_started_by_celery_itself(tmp_path: Path) -> None:
    """`celery -A workers worker` reads no CLI flags; the app's config, derived from the settings
    when first needed, layers the file in."""
    (tmp_path / "seedream-batch.toml").write_text('queue = "q-from-file"\nvisibility_timeout = 77\n')
    code = (
        "from workers.celery_app import app; c = app.conf; "
        "print(c.task_default_queue, c.broker_transport_options['visibility_timeout'])"
    )
    env = _env(PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["q-from-file", "77"], out.stderr


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("submit_rte = 3\n", "unknown setting 'submit_rte' (did you mean 'submit_rate'?)"),
        ('submit_rate = "fast"\n', "submit_rate must be a number"),
        ('log_format = "xml"\n', "log_format must be one of text, json"),
        ("max_in_flight = [1]\n", "max_in_flight must be a whole number"),
        ("submit_rate = \n", "seedream-batch.toml"),
        ('allow_internal_urls = "maybe"\n', "allow_internal_urls must be a bool"),
    ],
)
def test_a_bad_file_is_refused_with_its_name_and_key(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "seedream-batch.toml").write_text(text)
    done = subprocess.run([EXE, "config"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr


def test_allow_internal_urls_is_off_unless_set(tmp_path: Path) -> None:
    assert config_json(tmp_path, env=_env())["allow_internal_urls"]["value"] == "0"
    (tmp_path / "seedream-batch.toml").write_text("allow_internal_urls = true\n")
    assert config_json(tmp_path, env=_env())["allow_internal_urls"]["value"] == "1"
    flag = config_json(tmp_path, "--allow-internal-urls", "no", env=_env())["allow_internal_urls"]
    assert (flag["value"], flag["source"]) == ("0", "flag --allow-internal-urls")


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, config=str(tmp_path / "nope.toml"))


def test_every_setting_is_documented_and_its_default_is_the_one_in_use() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [s.env for s in SETTINGS if f"`{s.env}`" not in readme] == []
    limits, atlas, worker = Limits.from_env({}), AtlasConfig.from_env({}), WorkerSettings.from_env({})
    in_use = {
        "submit_rate": limits.submit_rate,
        "submit_burst": limits.submit_burst,
        "poll_rate": limits.poll_rate,
        "upload_rate": limits.upload_rate,
        "max_in_flight": limits.max_in_flight,
        "rate_headroom": limits.headroom,
        "window": limits.window,
        "slot_lease": limits.slot_lease_seconds,
        "api_base": atlas.api_base,
        "http_timeout": atlas.timeouts.read,
        "max_output_mb": atlas.max_output_bytes / 1024 / 1024,
        "redis_url": worker.redis_url,
        "prefix": worker.prefix,
        "poll_deadline": worker.poll_deadline,
    }
    for name, value in in_use.items():
        s = BY_NAME[name]
        assert s.kind(s.default) == value, name


def test_secrets_show_only_that_they_are_set() -> None:
    assert mask(BY_NAME["api_key"], "sk-abc") == "******** (set)"
    assert mask(BY_NAME["api_key"], "") == ""
    assert mask(BY_NAME["redis_url"], "redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask(BY_NAME["broker_url"], "redis://user:pw@h:1/2") == "redis://***@h:1/2"
    assert mask(BY_NAME["notify_url"], "https://h.example/T/B/token") == "https://h.example/***"
    assert mask(BY_NAME["queue"], "q") == "q"


def test_the_user_agent_is_the_products_unless_set() -> None:
    assert AtlasConfig.from_env({}).user_agent == DEFAULT_USER_AGENT
    assert DEFAULT_USER_AGENT.split("/")[0] == "seedream-batch" and DEFAULT_USER_AGENT.split("/")[1]
    assert AtlasConfig.from_env({"SEEDREAM_USER_AGENT": "my-shop/2.0"}).user_agent == "my-shop/2.0"
    with pytest.raises(ConfigError, match="one line"):
        AtlasConfig.from_env({"SEEDREAM_USER_AGENT": "a\r\nX-Injected: 1"})


def test_the_celery_app_takes_its_config_from_the_settings_when_first_needed(tmp_path: Path) -> None:
    """Nothing is read at import: settings installed after the app was imported still make its
    config (as the command line does), and every value Celery needs from them arrives."""
    code = (
        "from workers.celery_app import app\n"
        "from jobs.environment import install\n"
        "from jobs.settings import resolve\n"
        "install(resolve({'SEEDREAM_BROKER_URL': 'redis://127.0.0.1:6379/9', 'SEEDREAM_QUEUE': 'q-late',\n"
        "    'SEEDREAM_VISIBILITY_TIMEOUT': '41', 'SEEDREAM_RESTORE_INTERVAL': '3', 'SEEDREAM_TASK_EVENTS': '1'}))\n"
        "c = app.conf\n"
        "print(c.broker_url, c.task_default_queue, c.broker_transport_options['visibility_timeout'],\n"
        "      c.broker_transport_options['unacked_restore_interval'], c.worker_send_task_events)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert out.stdout.split() == ["redis://127.0.0.1:6379/9", "q-late", "41", "3", "True"], out.stderr


def test_an_option_with_a_setting_behind_it_defaults_to_that_setting() -> None:
    """`--s3-endpoint`, `--inputs`, ... of a subcommand: unset, they take the resolved setting
    (file or environment), so the file counts for them too; a flag still wins."""

    @click.command()
    @s3_endpoint_option
    @inputs_options
    def probe(s3_endpoint: str | None, inputs: str, inputs_bucket: str | None, allow_bulk_upload: bool) -> None:
        click.echo(f"{s3_endpoint} {inputs} {inputs_bucket} {allow_bulk_upload}")

    def shown(settings: Settings, *args: str) -> str:
        result = CliRunner().invoke(probe, list(args), obj=settings)
        assert result.exit_code == 0, result.output
        return result.output.strip()

    assert shown(resolve({}, read_config=False)) == "None auto None False"
    given = resolve(
        {"AWS_ENDPOINT_URL": "http://s3.local", "SEEDREAM_INPUTS": "presign", "SEEDREAM_ALLOW_BULK_UPLOAD": "yes"},
        read_config=False,
        flags={"inputs_bucket": "s3://b/p"},
    )
    assert shown(given) == "http://s3.local presign s3://b/p True"
    assert shown(given, "--s3-endpoint", "http://flag", "--inputs", "upload") == "http://flag upload s3://b/p True"


def test_the_typed_settings_are_the_table() -> None:
    """One attribute per row of SETTINGS, in its order and of its kind, so the two cannot drift;
    each resolves to the table's default when nothing is given."""
    hints = get_type_hints(Settings)
    typed = [f.name for f in fields(Settings) if f.name != "layers"]
    assert typed == [s.name for s in SETTINGS]
    assert {name: hints[name] for name in typed} == {s.name: s.kind for s in SETTINGS}
    defaults = resolve({}, read_config=False)
    for s in SETTINGS:
        value = getattr(defaults, s.name)
        assert type(value) is s.kind, s.name
        expected = BOOL_TEXT[s.default] if s.kind is bool else s.kind(s.default)
        assert value == expected, s.name
    assert defaults.sources == {} and defaults.environment() == {}


def test_values_are_parsed_once_and_a_bad_one_names_where_it_came_from(tmp_path: Path) -> None:
    env = {
        "SEEDREAM_SUBMIT_RATE": "12.5",
        "SEEDREAM_MAX_IN_FLIGHT": "40",
        "SEEDREAM_ALLOW_BULK_UPLOAD": "yes",
        "SEEDREAM_METRICS_PORT": "",  # an empty variable is one not set
        "ATLASCLOUD_API_KEY": "sk-typed-0123456789",
        "REDIS_URL": "redis://:redis-pass@127.0.0.1:6379/3",
        "SEEDREAM_NOTIFY_URL": "https://hooks.example/services/T0/B0/hook-token",
    }
    s = resolve(env, read_config=False)
    assert (s.submit_rate, s.max_in_flight, s.allow_bulk_upload, s.metrics_port) == (12.5, 40, True, 0)
    assert s.api_key == Secret("sk-typed-0123456789") and s.secrets() == [
        "sk-typed-0123456789",
        env["SEEDREAM_NOTIFY_URL"],
    ]
    given = {k: v for k, v in env.items() if v}  # the empty one is not handed on
    assert s.environment() == given and s.sources["submit_rate"] == "env" and s.given("submit_rate")
    shown = repr(s)
    assert "sk-typed" not in shown and "redis-pass" not in shown and "hook-token" not in shown
    assert "submit_rate='12.5'" in shown
    assert s.with_flags(submit_rate=3).submit_rate == 3.0
    bad = "SEEDREAM_MAX_IN_FLIGHT in the environment: max_in_flight must be a whole number"
    with pytest.raises(ConfigError, match=bad):
        resolve({"SEEDREAM_MAX_IN_FLIGHT": "many"}, read_config=False)
    with pytest.raises(ConfigError, match=r"SEEDREAM_ALLOW_INTERNAL_URLS in the environment: \w+ must be a bool"):
        resolve({"SEEDREAM_ALLOW_INTERNAL_URLS": "maybe"}, read_config=False)
    with pytest.raises(ConfigError, match="SEEDREAM_LOG_FORMAT in the environment: log_format must be one of"):
        resolve({"SEEDREAM_LOG_FORMAT": "xml"}, read_config=False)
    with pytest.raises(ConfigError, match="--window: window must be a whole number"):
        s.with_flags(window="wide")
    (tmp_path / "bad.toml").write_text('poll_rate = "often"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'bad.toml'}: poll_rate must be a number")):
        resolve({}, config=str(tmp_path / "bad.toml"))


def test_config_still_shows_a_bad_variable_and_other_commands_refuse_it(tmp_path: Path) -> None:
    """`config` is where a user looks for a bad value: it shows it, with its source, and names
    it; a command that needs the settings refuses it with its own exit code (doctor: 1)."""
    env = _env(SEEDREAM_SUBMIT_RATE="fast")
    done = subprocess.run([EXE, "config", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    row = next(r for r in json.loads(done.stdout) if r["setting"] == "submit_rate")
    assert (row["value"], row["source"]) == ("fast", "env")
    assert "SEEDREAM_SUBMIT_RATE in the environment: submit_rate must be a number" in done.stderr
    doctor = subprocess.run([EXE, "doctor"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 1 and "SEEDREAM_SUBMIT_RATE" in doctor.stderr


def test_worker_settings_carry_the_settings_read_where_they_are_used() -> None:
    worker = WorkerSettings.from_env(
        {
            "SEEDREAM_ALLOW_INTERNAL_URLS": "1",
            "SEEDREAM_MODELS_FILE": "models.json",
            "SEEDREAM_BROKER_URL": "redis://:broker-pass@h:1/2",
        }
    )
    assert (worker.allow_internal_urls, worker.models_file, worker.broker_url) == (
        True,
        "models.json",
        "redis://:broker-pass@h:1/2",
    )
    assert "broker-pass" not in repr(worker)
    assert (WorkerSettings().allow_internal_urls, WorkerSettings().models_file, WorkerSettings().broker_url) == (
        False,
        "",
        "",
    )


def test_an_empty_variable_is_one_not_set_so_the_files_value_stands(tmp_path: Path) -> None:
    """A compose file or a unit template leaves a variable it has no value for empty: a user's
    ceiling from the file must not fall back to "no ceiling" because of it."""
    (tmp_path / "cfg.toml").write_text('max_in_flight = 2\nsubmit_rate = 1.5\nqueue = "q-file"\n')
    environ = {"SEEDREAM_MAX_IN_FLIGHT": "", "SEEDREAM_SUBMIT_RATE": " ", "SEEDREAM_QUEUE": ""}
    s = resolve(environ, config=str(tmp_path / "cfg.toml"))
    assert (s.max_in_flight, s.submit_rate, s.queue) == (2, 1.5, "q-file")
    assert Limits.from_settings(s).max_in_flight == 2
    assert s.layers.sources["max_in_flight"] == f"file {tmp_path / 'cfg.toml'}"
    assert s.layers.environment()["SEEDREAM_MAX_IN_FLIGHT"] == "2"  # what a worker started from here is given
    none = resolve({"SEEDREAM_MAX_IN_FLIGHT": ""}, read_config=False)
    assert none.max_in_flight == 0 and "max_in_flight" not in none.layers.sources  # the default
