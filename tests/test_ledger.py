"""`reconcile`: the run's own ledger beside the service's daily one, and every difference."""

from __future__ import annotations

import datetime as dt
import json

import httpx

from jobs.ledger import Ledger, available_micros, money_micros, run_side, service_side
from jobs.secret import Secret
from manifests.errors import NotFound
from sandbox.server import SandboxProcess
from tests.conftest import API_KEY, make_client
from tests.helpers import image_bytes, wait_for
from tests.pipeline import V4, V45, Pipeline, run_id_of, write_manifest

TODAY = dt.datetime.now(dt.UTC).date()


def test_balance_and_ledger_amounts_are_read_in_every_shape_seen() -> None:
    assert (
        available_micros({"available": {"value": "125.500000", "currency": "usd"}, "object": "balance"}) == 125_500_000
    )
    assert available_micros({"available": 125.5}) == 125_500_000  # the old enveloped body's `data`
    assert available_micros({"available": "0.05"}) == 50_000
    assert available_micros({"available": {"value": "3.0", "currency": "eur"}}) is None
    assert available_micros({"cash": 1}) is None and available_micros(None) is None
    assert money_micros(True) is None and money_micros("n/a") is None and money_micros("$0.027") == 27_000


def test_the_runs_side_counts_every_paid_attempt_on_its_day() -> None:
    noon = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
    earlier = {"attempt": 1, "state": "failed", "cost_micros": 27_000, "finished_at": noon - 86_400}
    records = [
        {"model": V4, "state": "succeeded", "cost_micros": 27_000, "prior_cost_micros": 27_000,
         "history": [earlier], "finished_at": noon},
        {"model": V4, "state": "uncertain", "cost_micros": 27_000, "finished_at": noon},
        {"model": V4, "state": "failed", "cost_micros": 0, "finished_at": noon},  # not billed
        {"model": V45, "state": "submitted", "prediction_id": "p1", "cost_micros": 0, "submitted_at": noon},
        {"model": V45, "state": "succeeded", "cost_micros": 36_000, "prior_cost_micros": 36_000},
    ]  # fmt: skip
    ledger = Ledger(run_id="r", source="storage")
    run_side(ledger, records)
    today, yesterday = ledger.cells[("2026-12-01", V4)], ledger.cells[("2026-11-30", V4)]
    assert (today.run_count, today.run_micros, today.unsure_count, today.unsure_micros) == (1, 27_000, 1, 27_000)
    assert (yesterday.run_count, yesterday.run_micros) == (1, 27_000)
    assert ledger.undated == 2  # the last record: its attempt has no time, its earlier one no history
    assert "1 jobs hold a prediction without a verdict" in ledger.notes[0]


def test_service_rows_are_read_tolerantly_and_only_this_keys_count() -> None:
    key = Secret("sk-live-abcdef0123456789")
    ledger = Ledger(run_id="r", source="redis", start="2026-12-01", end="2026-12-03")
    costs = [
        {"date": "2026-12-01", "partial": False, "results": [
            {"model": V4, "api_key": "sk-...6789", "cost": "0.054"},
            {"model_id": V45, "api_key_id": key.fingerprint(), "amount": {"value": "0.036000", "currency": "usd"}},
            {"model": V4, "api_key": "sk-...ffff", "cost": 9},  # another key of the account
            {"model": V4, "api_key": "sk-...6789"},  # no amount: unknown, not zero
            "not a row",
        ]},
        {"date": "2026-12-02", "partial": True, "results": None},
        {"date": "2026-11-30", "results": [{"model": V4, "api_key": "sk-...6789", "cost": 1}]},  # outside the days
    ]  # fmt: skip
    usage = [{"date": "2026-12-01", "results": [
        {"model": V4, "api_key": "sk-...6789", "requests": "2"},
        {"model_id": V45, "api_key_id": key.fingerprint(), "images": 1.0},
        {"model": V4, "api_key": "sk-...ffff", "requests": 300},
    ]}]  # fmt: skip
    service_side(ledger, costs, usage, key.shown_as)
    assert ledger.cells[("2026-12-01", V4)].service_micros == 54_000
    assert ledger.cells[("2026-12-01", V4)].service_count == 2
    assert ledger.cells[("2026-12-01", V45)].service_micros == 36_000
    assert ledger.cells[("2026-12-01", V45)].service_count == 1
    assert ledger.partial_days == {"2026-12-02"} and ledger.notes == []
    unnamed = Ledger(run_id="r", source="redis", start="2026-12-01", end="2026-12-03")
    service_side(unnamed, [{"date": "2026-12-01", "results": [{"model": V4, "total_cost": 0.027}]}], [], key.shown_as)
    assert unnamed.cells[("2026-12-01", V4)].service_micros == 27_000
    assert "compared with every key" in unnamed.notes[0]


def test_the_sandbox_ledger_pages_and_refuses_what_the_service_refuses(sandbox: SandboxProcess) -> None:
    day = TODAY.isoformat()
    for name in ("model-costs", "model-usage"):
        anonymous = httpx.get(
            f"{sandbox.url}/public/v1/{name}",
            params={"start_date": day, "end_date": day},
            headers={"User-Agent": "ledger-test/1"},  # not a library default: the CDN would refuse that
            timeout=5,
        )
        assert anonymous.status_code == 401
    with make_client(sandbox) as client:
        start, end = (TODAY - dt.timedelta(days=4)).isoformat(), (TODAY + dt.timedelta(days=1)).isoformat()
        buckets = client.model_costs(start, end, limit=1)  # a page a day: five pages, followed
        assert [b["date"] for b in buckets] == [(TODAY - dt.timedelta(days=n)).isoformat() for n in range(4, -1, -1)]
        assert [b["partial"] for b in buckets] == [False] * 4 + [True]
        assert client.model_usage(start, end)[-1]["results"] == []
        too_long = (TODAY + dt.timedelta(days=200)).isoformat()
        try:
            client.model_usage(start, too_long)
        except Exception as exc:
            assert "180 days" in str(exc)
        else:
            raise AssertionError("a range of more than 180 days was answered")


def _predict_outside_the_run(sandbox: SandboxProcess, model: str) -> None:
    with make_client(sandbox) as client:
        url = client.upload("extra.png", image_bytes(40, 40), "image/png")
        pid = client.submit(model, {"prompt": "outside the run", "images": [url]}).id

        def ended() -> bool:
            try:
                return client.get_prediction(pid).done
            except NotFound:  # the service's warm-up right after a submit
                return False

        wait_for(ended, timeout=20, what="the extra prediction")


def test_reconcile_shows_no_difference_then_the_extra_prediction(pipe: Pipeline) -> None:
    (pipe.tmp / "a.png").write_bytes(image_bytes())
    rows = [{"id": f"sku-{i}", "prompt": f"marble {i}", "images": ["a.png"], "model": V45 if i == 0 else V4}
            for i in range(3)]  # fmt: skip
    manifest = write_manifest(pipe.tmp, rows)
    out = pipe.tmp / "out"
    pipe.start_workers(1)
    done = pipe.cli("run", str(manifest), "--output", str(out), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = run_id_of(done.stdout)
    pipe.runs().wait_wrapped_up(run_id, notify=False)

    first = pipe.cli("reconcile", run_id)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 jobs with a prediction id and no verdict are polled again" in first.stdout
    assert "the ledgers agree" in first.stdout
    report = json.loads(pipe.cli("reconcile", run_id, "--json").stdout)["ledger"]
    by_model = {r["model"]: r for r in report["rows"]}
    assert report["agree"] and report["records_from"] == "redis" and set(by_model) == {V4, V45}
    assert (by_model[V4]["run_count"], by_model[V4]["service_count"], by_model[V4]["diff_usd"]) == (2, 2, "0.00")
    assert (by_model[V45]["run_usd"], by_model[V45]["service_usd"]) == ("0.036", "0.036")
    assert by_model[V4]["day"] == TODAY.isoformat() and by_model[V4]["partial"]  # today is still open

    _predict_outside_the_run(pipe.sandbox, V4)
    second = pipe.cli("reconcile", run_id, "--json")
    assert second.returncode == 3, second.stdout + second.stderr
    rows_after = {r["model"]: r for r in json.loads(second.stdout)["ledger"]["rows"]}
    assert (rows_after[V4]["diff_count"], rows_after[V4]["diff_usd"]) == (1, "+0.027")
    assert "the key served other traffic than this run" in rows_after[V4]["notes"]
    assert rows_after[V45]["agree"] and rows_after[V45]["diff_count"] == 0
    text = pipe.cli("reconcile", run_id)
    assert text.returncode == 3 and "the ledgers differ" in text.stdout
    line = next(line for line in text.stdout.splitlines() if line.startswith(TODAY.isoformat()) and V4 in line)
    assert "+1" in line and "+0.027" in line and "other traffic" in line

    pipe.extra_env["SEEDREAM_PREFIX"] = pipe.prefix + "-elsewhere"  # a Redis that does not know the run
    stored = pipe.cli("reconcile", run_id, "--output", str(out), "--json")
    assert stored.returncode == 3, stored.stdout + stored.stderr
    from_storage = json.loads(stored.stdout)
    assert from_storage["polled_again"] is None and from_storage["ledger"]["records_from"] == "storage"
    assert {r["model"]: r["diff_count"] for r in from_storage["ledger"]["rows"]} == {V4: 1, V45: 0}
    assert API_KEY not in first.stdout + second.stdout + stored.stdout
    rebuilt = pipe.cli("report", run_id, "--output", str(out))  # the same stored records, read for the report
    assert rebuilt.returncode == 0 and json.loads(rebuilt.stdout)["counts"] == {"succeeded": 3}, rebuilt.stderr
