"""Tests of tests/faultproxy.py against a real moto server: each fault kind happens at about its
rate and looks to a client the way it should, a 0-rate proxy is transparent to boto3 (single and
multipart objects), boto3 with retries gets correct bytes through 10 % faults, the proxy is
bounded and seeded. Every wait is bounded (socket timeouts)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import socket
import time
import urllib.parse
from typing import Any

import pytest

from tests.faultproxy import FaultProxy

BODY = os.urandom(256 * 1024)


def s3_client(endpoint: str, attempts: int = 1) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(
            retries={"mode": "standard", "max_attempts": attempts},
            connect_timeout=5,
            read_timeout=20,
            s3={"addressing_style": "path"},
        ),
    )


@pytest.fixture(scope="module")
def bucket(moto_server: str) -> str:
    name = f"faultproxy-{os.getpid()}"
    client = s3_client(moto_server)
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="blob", Body=BODY, ACL="public-read")
    return name


def fetch(url: str, path: str) -> str:
    """One GET on a fresh connection, classified as the client sees it."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    started = time.monotonic()
    try:
        try:
            conn.request("GET", path)
            response = conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            return "reset_before"
        try:
            data = response.read()
        except ConnectionResetError:
            return "reset_mid_body"
        except http.client.IncompleteRead as exc:
            return "truncate" if response.status == 200 and exc.partial is not None else "?"
        if response.status == 503 and b"<Code>SlowDown</Code>" in data:
            return "slowdown"
        if response.status in (429, 500):
            return {429: "throttle", 500: "error500"}[response.status]
        assert response.status == 200, (response.status, data[:200])
        assert data == BODY
        if response.getheader("X-Fault-Injected") == "latency":
            assert time.monotonic() - started >= 0.15  # the delay really happened
            return "latency"
        return "ok"  # not "slow means latency": a loaded machine is slow too
    finally:
        conn.close()


@pytest.mark.parametrize("kind", FaultProxy.KINDS)
def test_each_fault_kind_happens_at_about_its_rate(moto_server: str, bucket: str, kind: str):
    n, rate = 200, 0.25
    with FaultProxy(moto_server, rates={kind: rate}, seed=7, latency=0.2) as proxy:
        seen = [fetch(proxy.url, f"/{bucket}/blob") for _ in range(n)]
        counts = proxy.counts
    observed = seen.count(kind)
    # The proxy's counter and what the client saw agree exactly; both near n x rate (the seeded
    # draw gives the same figure every run; the bound is ~4.5 standard deviations).
    assert observed == counts[kind], (seen, counts)
    assert abs(observed - n * rate) <= 28, observed
    assert seen.count("ok") == n - observed
    assert counts["requests"] == n
    assert sum(counts[k] for k in FaultProxy.KINDS) == observed


def test_a_mix_of_faults_adds_up(moto_server: str, bucket: str):
    rates = {k: 0.04 for k in FaultProxy.KINDS}  # 28 % in all
    with FaultProxy(moto_server, rates=rates, seed=3, latency=0.2) as proxy:
        seen = [fetch(proxy.url, f"/{bucket}/blob") for _ in range(300)]
        counts = proxy.counts
    for kind in FaultProxy.KINDS:
        assert seen.count(kind) == counts[kind], (kind, counts)
        assert 2 <= counts[kind] <= 26, counts
    assert (
        counts["forwarded"]
        == 300 - sum(counts[k] for k in FaultProxy.STATUS) - counts["reset_before"]
    )


def test_same_seed_same_faults(moto_server: str, bucket: str):
    runs = []
    for _ in range(2):
        with FaultProxy(moto_server, rates={"error500": 0.3, "throttle": 0.2}, seed=11) as proxy:
            runs.append([fetch(proxy.url, f"/{bucket}/blob") for _ in range(40)])
    assert runs[0] == runs[1]
    assert "error500" in runs[0] and "throttle" in runs[0]


@pytest.mark.parametrize("size", [1024, 12 * 1024 * 1024])
def test_a_zero_rate_proxy_is_transparent_to_boto3(moto_server: str, bucket: str, size: int):
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(size)
    with FaultProxy(moto_server, rates={}, seed=1) as proxy:
        client = s3_client(proxy.url)
        config = TransferConfig(
            multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024**2
        )
        client.upload_fileobj(io.BytesIO(data), bucket, f"transparent/{size}", Config=config)
        got = client.get_object(Bucket=bucket, Key=f"transparent/{size}")
        assert hashlib.sha256(got["Body"].read()).hexdigest() == hashlib.sha256(data).hexdigest()
        head = client.head_object(Bucket=bucket, Key=f"transparent/{size}")
        assert head["ContentLength"] == size
        counts = proxy.counts
    assert counts["requests"] == counts["forwarded"] > 0
    assert proxy.injected == 0 and counts["upstream_errors"] == 0


def test_boto3_with_retries_gets_the_right_bytes_through_faults(moto_server: str, bucket: str):
    rates = {
        "slowdown": 0.02,
        "throttle": 0.02,
        "error500": 0.02,
        "reset_before": 0.02,
        "reset_mid_body": 0.01,
        "truncate": 0.01,
    }
    with FaultProxy(moto_server, rates=rates, seed=5) as proxy:
        client = s3_client(proxy.url, attempts=10)
        for number in range(30):
            data = os.urandom(64 * 1024 + number)
            key = f"retried/{number}"
            client.put_object(Bucket=bucket, Key=key, Body=data)
            body = None
            for _ in range(10):  # a body cut mid-stream is the reader's to retry
                with contextlib.suppress(Exception):
                    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                    break
            assert body == data
        assert proxy.injected > 0


def test_connections_are_bounded_and_the_proxy_stays_up(moto_server: str, bucket: str):
    with FaultProxy(moto_server, max_connections=4, client_timeout=5) as proxy:
        host, port = (
            urllib.parse.urlsplit(proxy.url).hostname,
            urllib.parse.urlsplit(proxy.url).port,
        )
        assert host == "127.0.0.1"
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(4)]
        extra = socket.create_connection((host, port), timeout=5)
        assert extra.recv(1) == b""  # closed at once: over the limit
        extra.close()
        for sock in idle:
            sock.close()
        assert proxy.counts["rejected"] >= 1
        # slots come back once the idle sockets close
        for _ in range(20):
            with contextlib.suppress(AssertionError):
                assert fetch(proxy.url, f"/{bucket}/blob") == "ok"
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the proxy did not recover its connection slots")
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


def test_bad_rates_are_refused(moto_server: str):
    with pytest.raises(ValueError, match="unknown"):
        FaultProxy(moto_server, rates={"meteor": 0.1})
    with pytest.raises(ValueError, match="at most 1"):
        FaultProxy(moto_server, rates={"slowdown": 0.7, "throttle": 0.5})
