"""No silent traps, and runs you can find: a flag pair that cannot work is refused with the ways
that do, every command says its exit codes, an unknown run says where it was looked for, and
`runs` lists what Redis (and an output) holds."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import redis

from cli.main import main
from jobs.exit_codes import CODES, markdown
from jobs.redisio import where
from tests.pipeline import EXE, Pipeline, catalog, run_id_of

README = Path(__file__).resolve().parents[1] / "README.md"


def test_workers_without_waiting_is_refused_with_the_two_ways_that_work(pipe: Pipeline) -> None:
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 3)
    out = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--workers", "2", "--no-wait")
    assert out.returncode == 2, out.stderr
    assert "refused: --workers 2" in out.stderr and "nothing would run" in out.stderr
    assert "--wait" in out.stderr and "seedream-batch worker" in out.stderr
    assert not (pipe.tmp / "out").exists()  # nothing was started, written or enqueued
    assert pipe.cli("runs").stdout.startswith("no runs in Redis")


def test_every_command_lists_its_exit_codes_in_help_and_the_readme() -> None:
    assert set(main.commands) == set(CODES)
    for name in main.commands:
        shown = subprocess.run([EXE, name, "--help"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        codes = re.findall(r"^\s+(\d)  ", shown.stdout.split("Exit codes:")[1], re.M)
        assert [int(c) for c in codes] == [c for c, _ in CODES[name]], (name, shown.stdout)
    assert markdown() in README.read_text()


def test_an_unknown_run_says_where_it_was_looked_for_never_the_password(pipe: Pipeline) -> None:
    out = pipe.cli("status", "no-such-run")
    assert out.returncode == 1
    assert f"Redis 127.0.0.1:6379/15 (key prefix '{pipe.prefix}')" in out.stderr, out.stderr
    elsewhere = pipe.cli("resume", "no-such-run", "--output", str(pipe.tmp / "nowhere"))
    assert elsewhere.returncode == 1 and "127.0.0.1:6379/15" in elsewhere.stderr
    assert str(pipe.tmp / "nowhere") in elsewhere.stderr
    client = redis.Redis.from_url("redis://user:s3cret-pw@10.1.2.3:6380/4")  # never connected
    assert where(client) == "10.1.2.3:6380/4"


def test_runs_lists_finished_runs_with_their_costs_from_redis_and_from_storage(pipe: Pipeline) -> None:
    pipe.start_workers(1, concurrency=4)
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 4)
    out = pipe.tmp / "out"
    ids = []
    for budget in ("1", "2"):
        done = pipe.cli("run", str(manifest), "--output", str(out), "--budget", budget, "--no-reuse", "--wait")
        assert done.returncode == 0, done.stderr
        ids.append(run_id_of(done.stdout))
    listed = pipe.cli("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["run_id"] for r in rows] == ids  # oldest first
    for row, budget in zip(rows, ("1.00", "2.00"), strict=True):
        assert row["state"] == "finished" and row["done"] == "4/4" and row["source"] == "redis"
        assert row["cost_usd"] == "0.117" and row["budget_usd"] == budget and row["output"] == str(out)
    text = pipe.cli("runs").stdout.splitlines()
    assert text[0].split() == ["run", "started", "state", "done", "cost", "budget", "output"]
    assert all(any(i in ln and "finished" in ln and "$0.117" in ln for ln in text) for i in ids), text
    latest = pipe.cli("status")
    assert latest.returncode == 0 and latest.stdout.startswith(f"run {ids[1]} (the latest)\n4/4 done: 4 ok")

    pipe.extra_env["SEEDREAM_PREFIX"] = pipe.prefix + "-elsewhere"  # a Redis that knows neither
    stored = json.loads(pipe.cli("runs", "--json", "--output", str(out)).stdout)
    assert [(r["run_id"], r["source"], r["state"], r["cost_usd"]) for r in stored] == [
        (i, "storage", "ended", "0.117") for i in ids
    ]
