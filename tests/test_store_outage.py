"""A store's endpoint that cannot be reached (refused, DNS, connect timeout) is down for every
event, not this one's fault: attempts that meet it do not use up the event's retries while the
outage is younger than --unreachable-grace (found by the outage-cloud campaign: 8 s of connection
refused on S3 dead-lettered the transfers in flight as retries_exhausted)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from conftest import Clock


class Unreachable:
    """The real local source store, whose first ``failures`` heads fail as a refused
    connection does once the adapter translated it."""

    def __init__(self, inner: Any, failures: int, reason: str = "unreachable") -> None:
        self.inner, self.failures, self.reason = inner, failures, reason
        self.late_metadata_limit = inner.late_metadata_limit

    def head(self, ref: tw.ObjectRef) -> tw.ObjectInfo | None:
        if self.failures > 0:
            self.failures -= 1
            raise tw.RetryableError("Could not connect to the endpoint URL", reason=self.reason)
        return self.inner.head(ref)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_one(root: Path, failures: int, reason: str = "unreachable", **settings: Any) -> Any:
    clock = Clock()
    config = tw.Config(local_root=str(root), http_port=0, max_retries=3, **settings)
    stores = tw.build_stores(config)
    source = Unreachable(stores["aws_s3"], failures, reason)
    queue = tw.LocalQueue(root / "queue.db", poll_interval=0.01, clock=clock)
    (root / "aws_s3" / "src").mkdir(parents=True)
    (root / "aws_s3" / "src" / "k").write_bytes(b"payload")
    document = {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2026-01-01T00:00:00Z",
        "source": {"provider": "aws_s3", "bucket": "src", "key": "k"},
        "destination": {"provider": "gcp_gcs", "bucket": "dst", "key": "k"},
        "metadata": {"maxRetries": 3},
    }
    queue.publish(json.dumps(document).encode())
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the backoff passes on the injected clock
        sleeps.append(seconds)
        clock.now += seconds

    worker = tw.Worker(
        config,
        queue,
        tw.TransferEngine({**stores, "aws_s3": source}),
        tw.Metrics(),
        tw.make_logger("INFO", io.StringIO()),
        clock=clock,
        sleep=sleep,
    )
    worker.run(once=True)
    return queue, sleeps


def test_an_outage_shorter_than_the_grace_does_not_use_up_the_retries(tmp_path: Path) -> None:
    """Ten refused attempts (backoff 1, 2, 4, ... 30 s: about three minutes) against a budget
    of four: the event is transferred once the endpoint answers."""
    queue, sleeps = run_one(tmp_path, failures=10)
    assert queue.dead_letters() == []
    assert (tmp_path / "gcp_gcs" / "dst" / "k").read_bytes() == b"payload"
    assert len(sleeps) == 10 and sum(sleeps) < 300


def test_an_outage_past_the_grace_counts_and_ends_in_the_dead_letter_queue(
    tmp_path: Path,
) -> None:
    queue, sleeps = run_one(tmp_path, failures=1000, unreachable_grace=60)
    [(_, envelope)] = queue.dead_letters()
    assert envelope["reason"] == "retries_exhausted"
    # the grace (60 s of backoff) and then the budget of four attempts
    assert sum(sleeps[:-3]) >= 60 and len(sleeps) < 20


@pytest.mark.parametrize("reason", ["network", "timeout", "throttled", "unavailable"])
def test_other_transient_failures_still_count(tmp_path: Path, reason: str) -> None:
    """A reset mid-body, a read timeout, throttling, a 5xx: the service was reached, and these
    can be about this object; they use up the budget as before."""
    queue, sleeps = run_one(tmp_path, failures=10, reason=reason)
    [(_, envelope)] = queue.dead_letters()
    assert envelope["reason"] == "retries_exhausted"
    assert len(sleeps) == 3
