"""A job's durable record is replaced only by a later one (jobs/records.record_order), and the
stores make the read, the judgement and the write one step: a folder under a lock of the
record's own, S3 with a put conditional on the object read (a real S3 endpoint: moto's server)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from jobs.records import FAILED, FETCHING, PENDING, SKIPPED, SUBMITTED, SUBMITTING, SUCCEEDED, UNCERTAIN, replaces
from jobs.storage import LocalStorage, S3Storage, Storage


def rec(epoch: int | None, state: str, prediction_id: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"state": state, "prediction_id": prediction_id}
    if epoch is not None:
        out["epoch"] = epoch
    return out


@pytest.mark.parametrize(
    ("new", "stored", "written"),
    [
        (rec(1, PENDING), None, True),
        (rec(1, PENDING), rec(1, SUBMITTING), True),  # a refused POST's hand-back, after its own claim
        (rec(1, PENDING), rec(2, SUBMITTING), False),  # ... landing after the next claim's POST
        (rec(1, PENDING), rec(2, SUBMITTED, "p"), False),
        (rec(1, SUBMITTING), rec(2, SUBMITTED, "p"), False),  # an old claim's record after a newer sent one
        (rec(1, SUBMITTING), rec(1, PENDING), False),  # a claim handed back by another copy, written late
        (rec(1, SUBMITTED, "p"), rec(1, SUCCEEDED, "p"), False),  # a retried write after the ending
        (rec(1, SUCCEEDED, "p"), rec(1, FETCHING, "p"), True),
        (rec(1, SUBMITTED, "p"), rec(1, UNCERTAIN), True),  # the answer that arrived after the job was given up
        (rec(1, UNCERTAIN), rec(1, SUBMITTED, "p"), False),
        (rec(1, SKIPPED), rec(1, PENDING), True),
        (rec(2, SKIPPED), rec(1, FAILED, "p"), True),  # a retried job's new ending, in its reopened epoch
        (rec(1, SUCCEEDED, "p"), rec(1, SUCCEEDED, "p"), True),  # the same write again
        (rec(1, SUBMITTING), rec(None, SUBMITTED, "p"), True),  # a record from before epochs is the oldest
        (rec(0, SUBMITTING), rec(None, SUBMITTED, "p"), False),
        (rec(1, PENDING), "not a record", True),
        ({**rec(1, SUBMITTING), "claim": "b"}, {**rec(1, SUBMITTING), "claim": "a"}, False),  # Redis gave epoch 1 again
        ({**rec(1, PENDING), "claim": "a"}, {**rec(1, SUBMITTING), "claim": "a"}, True),
        ({**rec(2, SUBMITTING), "claim": "b"}, {**rec(1, SUBMITTING), "claim": "a"}, True),
    ],
)
def test_a_record_replaces_only_an_earlier_one(new: dict[str, Any], stored: Any, written: bool) -> None:
    assert replaces(new, stored) is written


def _write_if_later(store: Storage, new: dict[str, Any]) -> bool:
    return store.put_json_if("records/sku-1.json", new, lambda stored: replaces(new, stored))


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "folder":
        return LocalStorage(tmp_path / "run")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"records-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return S3Storage(bucket, "out/run-1", endpoint_url=endpoint)


def test_a_late_write_leaves_the_later_record_and_says_so(store: Storage) -> None:
    assert _write_if_later(store, rec(1, SUBMITTING)) is True
    assert _write_if_later(store, rec(2, SUBMITTED, "p2")) is True
    assert _write_if_later(store, rec(1, PENDING)) is False
    assert store.get_json("records/sku-1.json") == rec(2, SUBMITTED, "p2")
    assert not [k for k in store.list("records") if not k.endswith("sku-1.json")]  # no lock or temp file listed


def test_a_write_that_lands_between_the_read_and_the_put_is_judged_again(store: Storage) -> None:
    """Another writer's record lands after this write read the stored one and judged it: the
    put must not go through on the old judgement (S3: its If-Match fails; a folder: the other
    writer waits for the lock)."""
    _write_if_later(store, rec(1, SUBMITTING))
    seen: list[Any] = []
    other: list[threading.Thread] = []

    def allowed(stored: Any) -> bool:
        seen.append(stored)
        if len(seen) == 1:  # between this write's read and its put, a later claim's record is written
            t = threading.Thread(target=_write_if_later, args=(store, rec(2, SUBMITTED, "p2")))
            other.append(t)
            t.start()
            t.join(0.5 if isinstance(store, LocalStorage) else 30)  # the folder's writer waits for the lock
        return replaces(rec(1, PENDING), stored)

    written = store.put_json_if("records/sku-1.json", rec(1, PENDING), allowed)
    other[0].join(30)
    final = store.get_json("records/sku-1.json")
    if isinstance(store, LocalStorage):  # the lock held the other writer back: it came after, and won
        assert written is True and len(seen) == 1
    else:  # the put conditional on the ETag read failed: read again, and the later record stands
        assert written is False and seen[-1] == rec(2, SUBMITTED, "p2")
    assert final == rec(2, SUBMITTED, "p2")
