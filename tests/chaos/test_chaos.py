"""Chaos scenarios: real faults injected into real processes, then the same invariants checked.

Randomness is seeded (CHAOS_SEED, default 1234): a failure can be replayed.
Under `make chaos` the figures of each scenario are appended to bench/results/chaos.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from sandbox.server import SandboxProcess
from tests.chaos.invariants import Figures, check
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, catalog, run_id_of, write_manifest

SEED = int(os.environ.get("CHAOS_SEED", "1234"))
pytestmark = pytest.mark.chaos


def ids_of(manifest: Path) -> list[str]:
    return [json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()]


def start_run(pipe: Pipeline, manifest: Path, *extra: str) -> tuple[str, Path]:
    out = pipe.tmp / "out"
    started = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait", *extra)
    assert started.returncode == 0, started.stdout + started.stderr
    return run_id_of(started.stdout), out


def finish(pipe: Pipeline, run_id: str, timeout: float = 180) -> None:
    pipe.wait_done(run_id, timeout=timeout)
    pipe.runs().report(run_id)


def test_random_sigkills_with_others_taking_over(pipe: Pipeline) -> None:
    rng = random.Random(SEED)
    pipe.sandbox.configure(seed=SEED, delay="uniform:0.3:1.2")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "10"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 45)
    workers = [pipe.start_workers(1) for _ in range(3)]
    run_id, out = start_run(pipe, manifest)
    figures = Figures("1. random SIGKILLs")
    for target in (8, 18, 28):
        wait_for(lambda t=target: pipe.sandbox.accounting()["created"] >= t, timeout=90, what="submits")
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment: mid-submit, mid-poll or mid-fetch
        alive = [w for w in workers if w.procs[0].poll() is None]
        victim = rng.choice(alive)
        os.kill(victim.procs[0].pid, signal.SIGKILL)
        figures.kills += 1
        workers.append(pipe.start_workers(1))
    finish(pipe, run_id)
    check(pipe, run_id, out, ids_of(manifest), figures)


def test_all_workers_stopped_then_restarted(pipe: Pipeline) -> None:
    pipe.sandbox.configure(seed=SEED, delay="uniform:0.5:1.5")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "6"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    first = pipe.start_workers(2)
    run_id, out = start_run(pipe, manifest)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 10, timeout=60, what="submits")
    for p in first.procs:
        p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    figures = Figures("2. all workers SIGTERM then SIGKILL, restarted")
    for p in first.procs:
        if p.poll() is None:
            p.kill()
            figures.kills += 1
    for p in first.procs:
        p.wait(10)
    stalled = pipe.runs().progress(run_id).finished
    time.sleep(2.0)  # nobody works: nothing may move
    assert pipe.runs().progress(run_id).finished == stalled
    pipe.start_workers(2)
    finish(pipe, run_id)
    check(pipe, run_id, out, ids_of(manifest), figures)


def test_fault_storm(pipe: Pipeline) -> None:
    pipe.sandbox.configure(
        seed=SEED,
        delay="uniform:0.1:0.6",
        fault_retry_after=1,
        slow_output_seconds=0.5,
        faults={
            "rate_limited": 0.2,
            "server_error": 0.1,
            "failed": 0.1,
            "failed_5xx": 0.05,
            "timeout_status": 0.05,
            "drop_submit": 0.1,
            "output_404": 0.05,
            "output_slow": 0.1,
            "output_truncated": 0.2,
            "output_corrupt": 0.05,
            "bare_shape": 0.3,
            "succeeded_spelling": 0.3,
            "send_price": 0.3,
            "numeric_code": 0.3,
            "message_errors": 0.3,
        },
    )
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 60)
    pipe.start_workers(2)
    run_id, out = start_run(pipe, manifest)
    finish(pipe, run_id, timeout=240)
    figures = Figures("5. fault storm (429, 5xx, failures, dropped answers, broken outputs)")
    figures.extra = {"http_429_seen": pipe.sandbox.accounting()["http_429"]}
    report = check(pipe, run_id, out, ids_of(manifest), figures)
    assert {r["status"] for r in report} >= {"succeeded", "failed"}


def test_budget_runs_out_with_many_concurrent_workers(pipe: Pipeline) -> None:
    (pipe.tmp / "a.png").write_bytes(image_bytes())
    manifest = write_manifest(
        pipe.tmp, [{"id": f"j{i:03d}", "prompt": f"p{i}", "images": ["a.png"]} for i in range(60)]
    )
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "100"
    pipe.sandbox.configure(delay="uniform:0.1:0.5")
    for _ in range(3):
        pipe.start_workers(1, concurrency=8)
    cap = 20 * 27_000
    run_id, out = start_run(pipe, manifest, "--budget", "0.54", "--allow-partial")
    finish(pipe, run_id)
    figures = Figures("6. budget runs out mid-run, 3 workers x 8 threads")
    report = check(pipe, run_id, out, ids_of(manifest), figures, budget_micros=cap)
    acc = pipe.sandbox.accounting()
    assert acc["created"] == 20 and acc["billed_micros"] == cap  # exactly the jobs that fit
    assert sum(r["status"] == "skipped" for r in report) == 40


def test_cancel_mid_run(pipe: Pipeline) -> None:
    pipe.sandbox.configure(delay="fixed:1.5")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "4"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    pipe.start_workers(2)
    run_id, out = start_run(pipe, manifest)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 5, timeout=60, what="submits")
    assert pipe.cli("cancel", run_id).returncode == 0
    at_cancel = pipe.sandbox.accounting()["created"]
    finish(pipe, run_id)
    figures = Figures("7. cancel during a run")
    figures.extra = {"submitted_after_cancel": pipe.sandbox.accounting()["created"] - at_cancel}
    report = check(pipe, run_id, out, ids_of(manifest), figures)
    assert pipe.sandbox.accounting()["created"] <= at_cancel + 2  # two workers may each be past their last check
    assert all(r["status"] in ("succeeded", "skipped") for r in report)


def test_a_worker_cut_off_mid_run_and_coming_back(pipe: Pipeline) -> None:
    """Two 'hosts' (separately named workers, own temp dirs); one is frozen (SIGSTOP), as a host
    cut off from the network is: its jobs come back to the other, and when it wakes it must not
    submit or bill anything twice."""
    pipe.sandbox.configure(seed=SEED, delay="uniform:0.5:1.5")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "8"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    hosts = []
    for name in ("host-a", "host-b"):
        (pipe.tmp / name).mkdir()
        pipe.extra_env["TMPDIR"] = str(pipe.tmp / name)
        hosts.append(pipe.start_workers(1))
    run_id, out = start_run(pipe, manifest)
    wait_for(lambda: pipe.sandbox.accounting()["created"] >= 8, timeout=60, what="submits")
    frozen = hosts[0].procs[0]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        finish(pipe, run_id)  # host-b finishes everything, host-a's jobs included
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    time.sleep(3.0)  # let the woken host run whatever it still held
    figures = Figures("8b. one of two worker processes frozen (SIGSTOP) mid-run, then woken")
    figures.kills = 1
    check(pipe, run_id, out, ids_of(manifest), figures)


def test_hostile_input_at_scale_is_refused_whole(pipe: Pipeline, tmp_path: Path) -> None:
    corpus = Path(__file__).resolve().parents[1] / "manifests_bad"
    (tmp_path / "good.png").write_bytes(image_bytes())
    bomb = tmp_path / "bomb.png"  # 25,000 x 25,000 pixels in a few hundred KB
    from PIL import Image

    Image.new("1", (25_000, 25_000)).save(bomb)
    (tmp_path / "liar.png").write_bytes(b"PK\x03\x04" + os.urandom(2048))  # a zip, named .png
    rows: list[dict[str, object]] = [
        {"id": f"ok-{i}", "prompt": f"=fine prompt {i}", "images": ["good.png"]} for i in range(500)
    ]
    hostile = [
        {"id": "../../../etc/cron.d/x", "prompt": "p", "images": ["good.png"]},
        {"id": "a/../../b", "prompt": "p", "images": ["good.png"]},
        {"id": "bomb", "prompt": "p", "images": ["bomb.png"]},
        {"id": "liar", "prompt": "p", "images": ["liar.png"]},
        {"id": "huge", "prompt": "x" * (10 * 1024 * 1024), "images": ["good.png"]},
        {"id": "file", "prompt": "p", "images": ["file:///etc/passwd"]},
    ]
    rows[100:100] = hostile
    manifest = write_manifest(tmp_path, rows)
    with manifest.open("a") as fh:  # and one of every bad row from the corpus' JSONL files
        for f in sorted(corpus.glob("*.jsonl")):
            fh.write(f.read_text())
    out = tmp_path / "out"
    refused = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait", timeout=300)
    assert refused.returncode == 2
    lines = [ln for ln in refused.stderr.splitlines() if ln.startswith(str(manifest))]
    assert len({ln.split(":")[1] for ln in lines}) >= len(hostile)  # a clear error per bad row, by line
    for word in ("not a safe id", "decompression bomb", "not a usable image", "longer than", "scheme 'file'"):
        assert any(word in ln for ln in lines), word
    assert pipe.sandbox.accounting()["submit_calls"] == 0 and pipe.sandbox.accounting()["uploads"] == 0
    assert not out.exists()
    figures = Figures("9. bad input at scale (506 valid + hostile + corpus rows)")
    figures.jobs = len(rows)
    figures.extra = {"problems_reported": len(lines), "spent": 0}
    figures.save()


def test_messages_lost_by_the_broker_are_re_driven(pipe: Pipeline, rconn: object) -> None:
    """Delete every queued task message (as a broker losing them would): the watchdog finds the
    overdue jobs and drives them again; nothing is submitted twice."""
    import redis

    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 12)
    run_id, out = start_run(pipe, manifest)
    r = redis.Redis.from_url(pipe.redis_url)
    assert r.llen(pipe.prefix) == 12
    r.delete(pipe.prefix)  # every message gone
    pipe.start_workers(1)
    finish(pipe, run_id, timeout=150)
    figures = Figures("broker lost every queued message")
    figures.extra = {"redriven": pipe.runs().progress(run_id).counts.get("redriven", 0)}
    check(pipe, run_id, out, ids_of(manifest), figures)
    assert figures.extra["redriven"] == 12


def test_s3_endpoint_down_for_a_while(pipe: Pipeline, s3_endpoint: str) -> None:
    """The S3 endpoint disappears mid-run (a proxy in front of it is stopped) and comes back:
    outputs and records are retried, none is lost."""
    import subprocess
    import sys

    import boto3

    from sandbox.server import free_port

    port, target = free_port(), int(s3_endpoint.rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "tests.chaos.proxy", str(port), str(target)]
    proxy = subprocess.Popen(cmd)
    pipe.s3_endpoint = f"http://127.0.0.1:{port}"
    bucket = f"chaos-{pipe.prefix.lower()}"
    wait_for(lambda: _can_create(pipe.s3_endpoint, bucket), timeout=20, what="proxy")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    pipe.sandbox.configure(delay="uniform:0.3:0.8")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "6"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
    pipe.start_workers(2)
    output = f"s3://{bucket}/chaos"
    # Inputs through uploadMedia: this scenario is about outputs and records. A presigned input
    # link the service cannot fetch while the bucket is away fails its job, unbilled
    # (tests/test_input_links.py); `retry-failed` runs it again.
    started = pipe.cli("run", str(manifest), "--output", output, "--inputs", "upload", "--no-wait")
    run_id = run_id_of(started.stdout)

    def stored_outputs() -> int:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=f"chaos/{run_id}/outputs/")
        return int(page.get("KeyCount", 0))

    wait_for(lambda: stored_outputs() >= 5, timeout=60, what="some outputs")
    proxy.kill()
    proxy.wait(5)
    down_at = stored_outputs()
    time.sleep(6.0)  # the endpoint is gone: workers keep retrying
    assert stored_outputs() == down_at
    proxy = subprocess.Popen(cmd)
    try:
        finish(pipe, run_id, timeout=180)
        figures = Figures("4. S3 endpoint down for 6 s mid-run")
        figures.extra = {"outputs_stored_before_outage": down_at}
        report = check(pipe, run_id, output, ids_of(manifest), figures)
        assert {r["status"] for r in report} == {"succeeded"}
    finally:
        proxy.kill()


def by_host(sandbox: SandboxProcess, address: str) -> int:
    """Predictions the service created for calls coming from this address."""
    return int(sandbox.accounting()["counts"].get(f"created_from:{address}", 0))


def _can_create(endpoint: str, bucket: str) -> bool:
    import boto3
    import botocore.exceptions

    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        return True
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


def test_redis_restarted_with_its_data_kept(pipe: Pipeline, tmp_path: Path) -> None:
    """Redis (append-only file on, as the deploy guide asks) is stopped mid-run and started
    again on the same port: workers reconnect, or are restarted, and the run completes."""
    from tests.chaos.redis_server import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    pipe.redis_url = server.url
    try:
        pipe.sandbox.configure(seed=SEED, delay="uniform:0.3:1.0")
        pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "6"
        manifest, _ = catalog(pipe.tmp, pipe.sandbox, 30)
        pipe.extra_env["SEEDREAM_LIVENESS"] = "10"
        workers = pipe.start_workers(2, loglevel="INFO", restart=True)
        run_id, out = start_run(pipe, manifest)
        wait_for(lambda: pipe.sandbox.accounting()["created"] >= 8, timeout=60, what="submits")
        server.stop()
        time.sleep(3.0)  # Redis is down: the workers lose their connections
        server.start()
        finish(pipe, run_id, timeout=150)
        figures = Figures("3a. Redis stopped and started again mid-run (data kept)")
        figures.faults_injected = 1
        figures.extra = {"worker_restarts": workers.restarts}
        check(pipe, run_id, out, ids_of(manifest), figures)
    finally:
        pipe.stop()
        server.stop()


def test_hostile_service_answers_in_a_whole_run(pipe: Pipeline) -> None:
    """Output URLs to a local address, redirect loops and endless streams: each such job fails
    with the reason (paid: the service billed it), nothing is fetched from the local address,
    every loop and stream ends, and the other jobs are untouched."""
    cap_mb = 2
    pipe.extra_env["SEEDREAM_MAX_OUTPUT_MB"] = str(cap_mb)
    hostile = {"output_internal": 0.15, "output_redirect_loop": 0.15, "output_endless": 0.15}
    pipe.sandbox.configure(seed=SEED, delay="uniform:0.1:0.5", faults=hostile)
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 40)
    pipe.start_workers(2)
    run_id, out = start_run(pipe, manifest)
    finish(pipe, run_id)
    counts = pipe.sandbox.accounting()["counts"]
    injected = {name: int(counts.get(f"injected_{name}", 0)) for name in hostile}
    figures = Figures("untrusted answers: local-address URLs, redirect loops, endless streams")
    figures.extra = {
        "local_address_urls": injected["output_internal"],
        "redirect_loops": injected["output_redirect_loop"],
        "endless_streams": injected["output_endless"],
        "fetched_from_local_address": counts.get("bait_fetches", 0),
        "redirect_hops_followed": counts.get("redirect_hops", 0),
        "endless_mb_sent": round(counts.get("endless_bytes", 0) / 1024 / 1024, 1),
    }
    report = check(pipe, run_id, out, ids_of(manifest), figures)
    reasons = {"output_internal": "internal address", "output_redirect_loop": "redirects", "output_endless": "cut off"}
    seen = dict.fromkeys(reasons, 0)
    for r in report:
        fault = pipe.sandbox.admin("GET", f"predictions/{r['prediction_id']}")["output_faults"][0]
        if fault in reasons:
            seen[fault] += 1
            assert r["status"] == "failed" and reasons[fault] in r["error"], r
            assert float(r["cost_usd"]) > 0  # the service billed it; the report says so
        else:
            assert r["status"] == "succeeded", r
    assert seen == injected and all(seen.values()), (seen, injected)  # every kind was really injected
    assert counts.get("bait_fetches", 0) == 0
    assert counts["redirect_hops"] <= seen["output_redirect_loop"] * 6  # max_redirects (5) + 1, never retried
    assert counts["endless_streams"] == seen["output_endless"], counts  # a cut stream is not fetched again
    # the sandbox counts what it handed to its socket: the cap plus the kernel's loopback buffers (a few MB)
    assert counts["endless_bytes"] <= seen["output_endless"] * (cap_mb + 10) * 1024 * 1024


def test_two_hosts_in_network_namespaces_one_cut_off(pipe: Pipeline, tmp_path: Path) -> None:
    """Two hosts (network namespaces) reach Redis, S3 and the service only over their own
    links. Host A's link is taken down mid-run (its connections hang, as in a real outage):
    host B finishes every job, A's included; when A's link comes back, A submits and bills
    nothing twice."""
    import subprocess

    from tests.chaos.netns import make_network
    from tests.chaos.redis_server import RedisServer
    from tests.helpers import moto_server
    from workers.local import worker_command

    network = make_network(2)
    address, hosts = network.service_address, network.hosts
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", bind=address).start()
    sandbox = SandboxProcess(host=address).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with moto_server(address) as s3:
            net = Pipeline(sandbox=sandbox, redis_url=server.url, prefix=pipe.prefix, tmp=pipe.tmp, s3_endpoint=s3)
            sandbox.configure(seed=SEED, delay="uniform:0.5:1.5")
            net.extra_env["SEEDREAM_SUBMIT_RATE"] = "8"
            bucket = f"netns-{pipe.prefix.lower()}"
            assert _can_create(s3, bucket)
            with (pipe.tmp / "workers.log").open("ab") as log:
                for host in hosts:
                    (pipe.tmp / host.name).mkdir()
                    env = net.env | {"TMPDIR": str((pipe.tmp / host.name).resolve())}
                    cmd = host.wrap(worker_command(concurrency=4, queue=pipe.prefix, name=f"{host.name}@%h"))
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            manifest, _ = catalog(pipe.tmp, sandbox, 30)
            output = f"s3://{bucket}/netns"
            started = net.cli("run", str(manifest), "--output", output, "--no-wait")
            assert started.returncode == 0, started.stderr
            run_id = run_id_of(started.stdout)
            wait_for(lambda: sandbox.accounting()["created"] >= 8, timeout=60, what="submits")
            wait_for(lambda: by_host(sandbox, hosts[0].address) >= 2, timeout=60, what="host A to submit")
            hosts[0].cut()
            cut_at = sandbox.accounting()["created"]
            time.sleep(1.0)  # a call the sandbox was already serving when the link went down still counts
            a_before = by_host(sandbox, hosts[0].address)
            net.wait_done(run_id, timeout=150)  # host B finishes everything, host A's jobs included
            net.runs().report(run_id)
            assert procs[1].poll() is None
            assert by_host(sandbox, hosts[0].address) == a_before  # nothing from A while it was cut off
            hosts[0].reconnect()
            # Host A runs whatever it still held, now that it can reach everyone again: a POST that
            # hung in the outage may be answered now, and A adopts that prediction (its record, the
            # report again), which takes A a while after the link is back. The invariants must hold
            # once A has done so: they are checked until they do, for at most 90 s.
            deadline = time.monotonic() + 90.0
            while True:
                figures = Figures("8. two hosts (network namespaces), one cut off mid-run, then back")
                figures.faults_injected = 1
                figures.extra = {
                    "submitted_before_cut": cut_at,
                    "by_host_a": by_host(sandbox, hosts[0].address),
                    "by_host_b": by_host(sandbox, hosts[1].address),
                }
                try:
                    check(net, run_id, output, ids_of(manifest), figures)  # no duplicate once A was back
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            assert figures.extra["by_host_a"] + figures.extra["by_host_b"] == sandbox.accounting()["created"]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        sandbox.stop()
        server.stop()
        network.delete()
