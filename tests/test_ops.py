"""Operations: workers by role from the deploy files, a warm stop, metrics, the webhook, JSON logs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.redisio import connect
from jobs.store import RunStore
from sandbox.server import free_port
from tests.conftest import API_KEY
from tests.helpers import wait_for
from tests.pipeline import EXE, Pipeline, catalog, run_id_of
from workers.local import JEMALLOC

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def procfile() -> dict[str, list[str]]:
    """deploy/Procfile's commands, as a Procfile runner would start them."""
    roles = {}
    for line in (DEPLOY / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            role, _, command = line.partition(":")
            argv = shlex.split(command)
            assert argv[0] == "seedream-batch"
            roles[role.strip()] = [EXE, *argv[1:]]
    return roles


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log written with --log-format json, each parsed (a line that is not JSON fails)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def test_workers_by_role_from_the_procfile_and_a_warm_stop_loses_nothing(pipe: Pipeline) -> None:
    """The Procfile's two workers, on their own queues: submits and polls on one, downloads and
    storage writes on the other; every job flows through both. The fetch worker is stopped
    warm (SIGTERM) mid-run while fetches wait for it, and started again: every job ends with its
    output, nothing is submitted twice, and nothing needed the watchdog."""
    pipe.sandbox.configure(delay="uniform:0.3:1.0")
    pipe.extra_env.update(SEEDREAM_FETCH_QUEUE=f"{pipe.prefix}.fetch", SEEDREAM_SUBMIT_RATE="10")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    roles = procfile()
    logs = {role: pipe.tmp / f"{role}.log" for role in roles}
    procs = {role: start(argv, pipe.env, logs[role]) for role, argv in roles.items()}
    try:
        started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
        assert started.returncode == 0, started.stderr
        run_id = run_id_of(started.stdout)
        runs = pipe.runs()
        wait_for(lambda: runs.progress(run_id).counts.get("succeeded", 0) >= 5, timeout=60, what="a few jobs done")
        procs["fetch"].send_signal(signal.SIGTERM)  # warm stop
        assert procs["fetch"].wait(timeout=60) == 0
        store = RunStore(connect(pipe.redis_url), prefix=pipe.prefix)
        waiting = wait_for(lambda: store.client.llen(f"{pipe.prefix}.fetch"), timeout=60, what="fetches queued")
        assert waiting > 0 and not runs.progress(run_id).done  # the stopped role's work waits in Redis
        procs["fetch"] = start(roles["fetch"], pipe.env, logs["fetch"])
        done = pipe.wait_done(run_id, timeout=120)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=60)
    assert done.counts.get("succeeded") == 30 and done.counts.get("redriven", 0) == 0
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 30 and acc["duplicate_fingerprints"] == []
    assert len(list((pipe.tmp / "out" / run_id / "outputs").glob("*/0.*"))) == 30
    moves = {role: [ln for ln in json_lines(logs[role]) if ln.get("event") == "transition"] for role in roles}
    control = {(m["from_state"], m["to_state"]) for m in moves["control"]}
    fetch = {(m["from_state"], m["to_state"]) for m in moves["fetch"]}
    assert ("pending", "submitting") in control and ("submitted", "fetching") in control
    assert fetch == {("fetching", "succeeded")}  # the fetch worker only fetches and stores
    assert {m["job_id"] for m in moves["fetch"]} == {f"sku-{i:03d}" for i in range(30)}  # every job passed through it
    assert all(m["worker"].startswith("control@") for m in moves["control"])
    assert all(m["worker"].startswith("fetch@") for m in moves["fetch"])


def test_a_run_with_its_own_workers_takes_the_fetch_queue_too(pipe: Pipeline) -> None:
    """`run --workers N` with a fetch queue set: the workers it starts listen on both queues, so
    a paid prediction's download does not wait in Redis for a fetch worker nobody started."""
    pipe.extra_env.update(SEEDREAM_FETCH_QUEUE=f"{pipe.prefix}.fetch", SEEDREAM_SUBMIT_RATE="10")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 6)
    got = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--workers", "1", "--wait", timeout=90)
    assert got.returncode == 0, got.stderr
    run_id = run_id_of(got.stdout)
    assert pipe.runs().progress(run_id).counts.get("succeeded") == 6
    assert len(list((pipe.tmp / "out" / run_id / "outputs").glob("*/0.*"))) == 6


def test_the_systemd_unit_runs_the_same_worker() -> None:
    """The unit's ExecStart is the CLI's worker command with a role (checked, not run: systemd is
    not here); the role it names exists."""
    unit = (DEPLOY / "seedream-worker@.service").read_text()
    exec_start = next(ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(exec_start.replace("%i", "fetch").replace("%H", "host"))
    assert argv[0].endswith("/seedream-batch") and argv[1] == "worker"
    check = subprocess.run([EXE, *argv[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "--role [all|control|fetch]" in check.stdout
    assert "Restart=always" in unit and "KillSignal=SIGTERM" in unit


@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_local_workers_run_on_jemalloc_when_the_system_has_it(pipe: Pipeline, allocator: str) -> None:
    """Under glibc's malloc a worker's RSS creeps up with every job; under jemalloc it stays flat
    (docs/BENCHMARKS.md). On Debian, redis-server brings libjemalloc2 with it; where no jemalloc
    is installed, the worker runs on glibc's malloc."""
    pipe.extra_env["SEEDREAM_ALLOCATOR"] = allocator
    workers = pipe.start_workers(1, concurrency=1)

    proc = Path(f"/proc/{workers.procs[0].pid}")

    def imported() -> str:  # the worker's own imports are in: the loader is long done
        if b"celery" not in (proc / "cmdline").read_bytes():
            return ""
        maps = (proc / "maps").read_text()
        return maps if "hiredis" in maps else ""

    maps = wait_for(imported, timeout=60, what="the worker to import its modules")
    installed = next((lib for lib in JEMALLOC if os.path.exists(lib)), None)
    assert ("libjemalloc" in maps) == (allocator == "jemalloc" and installed is not None)
    unit = (DEPLOY / "seedream-worker@.service").read_text()
    assert any(f"Environment=LD_PRELOAD={lib}" in unit for lib in JEMALLOC)


def scrape(port: int) -> dict[str, float]:
    """{'name{label=value,...}': value} from a worker's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: list[dict[str, float]], name: str, **labels: str) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        v
        for got in samples
        for key, v in got.items()
        if key.split("{")[0] == name and all(w in key.split("{")[1].rstrip("}").split(",") for w in want)
    )


def test_metrics_during_a_run_agree_with_the_service(pipe: Pipeline) -> None:
    """Two workers, each with its endpoint; the sandbox refuses submits past 4/s (429s) and fails
    a share of predictions. Scraped mid-run, the Redis gauges show the run in progress; at the
    end, the workers' counters summed equal what the sandbox saw and billed."""
    pipe.sandbox.configure(seed=5, delay="uniform:0.2:0.6", submit_rate=4, submit_burst=1, faults={"failed": 0.2})
    base = free_port()
    pipe.extra_env.update(SEEDREAM_METRICS_PORT=str(base), SEEDREAM_SUBMIT_RATE="8", SEEDREAM_SUBMIT_BURST="2")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 24)
    pipe.start_workers(2)
    ports = [base, base + 1]
    wait_for(lambda: all(_answers(p) for p in ports), timeout=30, what="both metrics endpoints")
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    run_id = run_id_of(started.stdout)
    key = f"seedream_run_jobs{{run_id={run_id},state=in_progress}}"
    mid = wait_for(lambda: (m := scrape(base)).get(key, 0) > 0 and m, timeout=30, what="the run in the gauges")
    assert 0 < mid[key] <= 24 and f"seedream_run_jobs{{run_id={run_id},state=succeeded}}" in mid
    assert "seedream_in_flight_slots{}" in mid
    done = pipe.wait_done(run_id, timeout=120)
    wait_for(lambda: pipe.runs().meta(run_id).report_written, timeout=60, what="the report")
    end = [scrape(p) for p in ports]
    acc = pipe.sandbox.accounting()
    assert acc["http_429"] > 0 and acc["not_billed"] > 0  # the test shows something
    assert total(end, "seedream_submits_total", outcome="accepted") == acc["created"] == 24
    assert total(end, "seedream_http_429_total", kind="submit") == acc["http_429"]
    assert total(end, "seedream_polls_total") == acc["polls"]
    # the catalog's own upload (the URL input it points rows at) is the sandbox's, not a worker's
    assert total(end, "seedream_uploads_total") == acc["uploads"] - 1
    assert total(end, "seedream_jobs_finished_total", state="failed") == acc["not_billed"]  # failed, in any spelling
    assert total(end, "seedream_jobs_finished_total") == 24 == done.finished
    assert round(total(end, "seedream_cost_usd_total"), 6) == round(acc["billed_micros"] / 1e6, 6)
    # every poll is one step of a submitted job; a step may also find its poll not yet due
    assert total(end, "seedream_step_seconds_count", stage="submitted") >= acc["polls"]
    assert total(end, "seedream_step_seconds_count", stage="pending") >= 24
    assert total(end, "seedream_step_seconds_count", stage="fetching") >= done.counts["succeeded"] > 0


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def documented_status_fields() -> set[str]:
    text = (DEPLOY.parent / "docs" / "DEPLOY.md").read_text()
    table = text.split("| field | meaning |", 1)[1].split("\n\n", 1)[0]
    return {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}


class Hook:
    """A local webhook that answers 500 to its first `fail` requests, then 204."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail = fail
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                hook.bodies.append(json.loads(body))
                hook.headers.append(dict(self.headers))
                self.send_response(500 if len(hook.bodies) <= hook.fail else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0/secret-token"

    def __enter__(self) -> Hook:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    with Hook(fail=1) as h:
        yield h


def test_the_webhook_gets_the_summary_and_a_dead_one_changes_nothing(pipe: Pipeline, hook: Hook) -> None:
    pipe.extra_env.update(SEEDREAM_NOTIFY_ATTEMPTS="3")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 6)
    pipe.start_workers(1)
    told = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--notify", hook.url, "--wait")
    assert told.returncode == 0, told.stdout + told.stderr
    run_id = run_id_of(told.stdout)
    wait_for(lambda: len(hook.bodies) == 2, timeout=60, what="the webhook, told on the second try")
    body = hook.bodies[-1]
    saved = json.loads((pipe.tmp / "out" / run_id / "summary.json").read_text())
    assert body == {"event": "run.finished", **saved}  # the summary, as stored
    assert body["outcome"] == "succeeded" and body["counts"] == {"succeeded": 6}
    assert int(body["total_cost_micros"]) == pipe.sandbox.accounting()["billed_micros"]
    assert hook.headers[-1]["X-Seedream-Run"] == run_id
    wait_for(lambda: pipe.runs().meta(run_id).notified == "ok after 2 tries", timeout=30, what="notified")
    run_json = (pipe.tmp / "out" / run_id / "run.json").read_text()
    assert "secret-token" not in run_json  # the webhook's token is not kept in storage
    status = json.loads(pipe.cli("status", run_id, "--json").stdout)
    assert set(status) == documented_status_fields()  # the fields docs/DEPLOY.md promises scripts
    assert status["notified"] == "ok after 2 tries" and status["report_written"] is True and status["done"] is True

    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    again = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out2"), "--notify", dead, "--wait")
    assert again.returncode == told.returncode == 0, again.stderr
    dead_id = run_id_of(again.stdout)
    # these workers outlive the CLI, which does not wait for them to give up on the webhook
    gave_up = wait_for(lambda: pipe.runs().meta(dead_id).notified, timeout=60, what="the webhook given up")
    assert gave_up.startswith("failed after 3 tries")
    assert pipe.runs().progress(dead_id).counts.get("succeeded") == 6


def test_json_logs_parse_carry_run_and_job_ids_and_never_the_key(pipe: Pipeline) -> None:
    pipe.sandbox.configure(seed=3, delay="uniform:0.1:0.3", faults={"server_error": 0.2, "failed": 0.35})
    pipe.extra_env.update(SEEDREAM_LOG_FORMAT="json", SEEDREAM_NOTIFY_ATTEMPTS="1")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 16)
    pipe.start_workers(2, loglevel="INFO")
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--wait", "--notify",
                    f"http://{API_KEY}@127.0.0.1:{free_port()}/x")  # fmt: skip
    run_id = run_id_of(done.stdout)
    wait_for(lambda: pipe.runs().meta(run_id).notified, timeout=60, what="the webhook given up")
    for w in pipe.workers:
        w.stop(timeout=30)
    raw = (pipe.tmp / "workers.log").read_bytes()
    assert raw and API_KEY.encode() not in raw  # not in any line, whatever logged it
    lines = json_lines(pipe.tmp / "workers.log")
    assert all({"ts", "level", "logger", "message", "run_id", "job_id", "worker"} <= set(ln) for ln in lines)
    about_jobs = [ln for ln in lines if ln.get("event") in ("transition", "retry", "submitted", "rate_limited")]
    assert about_jobs and all(ln["run_id"] == run_id and ln["job_id"] for ln in about_jobs)
    moves = [ln for ln in lines if ln.get("event") == "transition"]
    assert {ln["job_id"] for ln in moves} == {f"sku-{i:03d}" for i in range(16)}
    finals = [ln for ln in moves if ln["to_state"] in ("succeeded", "failed", "skipped", "uncertain")]
    assert len(finals) == 16 and all("cost_usd" in ln for ln in finals)
    assert {ln["to_state"] for ln in finals} >= {"succeeded", "failed"}
    assert any(ln.get("event") == "retry" and ln["attempt"] >= 1 for ln in lines)  # a 5xx was retried
    celery_lines = [ln for ln in lines if ln["logger"].startswith("celery") and "seedream.job" in ln["message"]]
    assert celery_lines and all(ln["run_id"] == run_id and ln["job_id"] for ln in celery_lines)
    assert any(ln.get("event") == "run_finished" and ln["run_id"] == run_id for ln in lines)
    assert os.environ.get("ATLASCLOUD_API_KEY") != API_KEY  # the key came from the workers' env only
