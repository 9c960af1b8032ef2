"""Security checks of issue 5, through the real CLI in local mode (subprocesses on a temporary
root): only allowlisted buckets are touched; keys with traversal or control characters are refused
and nothing is ever written outside a bucket; no planted credential or token reaches stdout, stderr,
dead-letter envelopes, /metrics or the SQLite files; the HTTP server answers only /health, /ready
and /metrics, survives slow and malformed clients without blocking transfers, and bounds request
size. Every wait is a bounded poll."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.campaigns.common import (
    WorkerProcess,
    base_env,
    body,
    cli,
    dlq_list,
    free_port,
    http_get,
    make_event,
    put_local,
    sha,
    submit,
    wait_until,
)

SRC = ("aws_s3", "src-bucket")
DST = ("gcp_gcs", "dst-bucket")
ALLOWED = "aws_s3:src-bucket,gcp_gcs:dst-bucket"
# What local mode keeps at its root besides the buckets: the SQLite queue and metadata (with their
# WAL files) and the commit lock that every worker on the root takes.
ROOT_FILES = ("-wal", "-shm", ".db", "commit.lock")


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def run_once(root: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    result = cli(root, "run", "--once", *args, env=env or base_env(root), timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


# -------------------------------------------------------------------------------------------------
# allowlist
# -------------------------------------------------------------------------------------------------


def test_only_allowlisted_buckets_are_touched(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    put_local(root, *SRC, "in/ok", b"allowed payload")
    put_local(root, "aws_s3", "secret-bucket", "in/ok", b"must never be read")
    put_local(root, "gcp_gcs", "src-bucket", "in/ok", b"same name, other provider")
    cases = {
        "forbidden-source": make_event(("aws_s3", "secret-bucket", "in/ok"), (*DST, "a")),
        "forbidden-destination": make_event((*SRC, "in/ok"), ("gcp_gcs", "evil-bucket", "b")),
        "provider-swapped": make_event(("gcp_gcs", "src-bucket", "in/ok"), (*DST, "c")),
        "destination-is-source-bucket-other-provider": make_event(
            (*SRC, "in/ok"), ("aws_s3", "dst-bucket", "d")
        ),
        "both-outside": make_event(("aws_s3", "x-bucket", "k"), ("gcp_gcs", "y-bucket", "k")),
    }
    good = make_event((*SRC, "in/ok"), (*DST, "good"))
    submit(root, [body(e) for e in cases.values()] + [body(good)])
    before = files_under(root)
    run_once(root, "--allowed-buckets", ALLOWED)
    envelopes = {e["event_id"]: e for e in dlq_list(root)}
    for name, event in cases.items():
        assert envelopes[event["eventId"]]["reason"] == "forbidden", name
    assert good["eventId"] not in envelopes
    assert (root / "gcp_gcs" / "dst-bucket" / "good").read_bytes() == b"allowed payload"
    created = files_under(root) - before
    allowed_new = {"gcp_gcs/dst-bucket", "gcp_gcs/dst-bucket/good", ".tmp"}
    assert {p for p in created if not p.endswith(ROOT_FILES)} <= allowed_new
    assert not (root / "gcp_gcs" / "evil-bucket").exists()
    assert not (root / "aws_s3" / "dst-bucket").exists()
    assert files_under(outside) == set()


# -------------------------------------------------------------------------------------------------
# keys
# -------------------------------------------------------------------------------------------------

TRAVERSAL_KEYS = [
    "../escape",
    "../../../../tmp/escape",
    "a/../../escape",
    "a/b/../../../escape",
    "/etc/passwd",
    "//double-leading",
    "..",
    ".",
    "a/./b",
    "a/..",
    "./a",
    "a\\..\\..\\escape",
    "..\\escape",
    "\\\\server\\share",
]
CONTROL_KEYS = [
    "a\x00b",
    "nul\x00/../../escape",
    "line\nbreak",
    "carriage\rreturn",
    "tab\tkey",
    "esc\x1b[31mred",
    "bell\x07",
    "del\x7f",
    "\x01",
    "unit\x1fsep",
]
# Keys that look like traversal to a human or a decoder but are plain names on a POSIX filesystem:
# accepting them is fine as long as the file lands inside the bucket.
LOOKALIKE_KEYS = [
    "%2e%2e/escape",
    "%2e%2e%2fescape",
    "..%2fescape",
    "%252e%252e/escape",
    "\uff0e\uff0e/escape",  # fullwidth full stops
    "\u2025/escape",  # two dot leader
    "..\u2215escape",  # division slash
    "..\u2044escape",  # fraction slash
    "\ufeff../escape",  # BOM in front of ..
    "a\u200b/..\u200b/escape",  # zero-width spaces
    "...",
    "....//escape",
    "a/.../b",
    "\u202eevil",  # right-to-left override
    "d\u00e9j\u00e0/\u65e5\u672c/\U0001f600",
]


def _key_events(keys: list[str], side: str) -> list[dict[str, Any]]:
    events = []
    for key in keys:
        if side == "destination":
            events.append(make_event((*SRC, "in/ok"), (*DST, key)))
        else:
            events.append(make_event((*SRC, key), (*DST, "from-bad-source")))
    return events


@pytest.mark.parametrize("side", ["source", "destination"])
def test_traversal_and_control_character_keys_are_rejected(tmp_path: Path, side: str):
    root, outside = tmp_path / "root", tmp_path / "outside"
    put_local(root, *SRC, "in/ok", b"payload")
    # Files a traversal source key would read if it could escape.
    (tmp_path / "escape").write_bytes(b"outside secret")
    put_local(root, "aws_s3", "escape", "x", b"sibling bucket")
    outside.mkdir()
    events = _key_events(TRAVERSAL_KEYS + CONTROL_KEYS, side)
    submit(root, [body(e) for e in events])
    before = files_under(tmp_path)
    result = run_once(root, "--allowed-buckets", ALLOWED)
    envelopes = {e["event_id"]: e for e in dlq_list(root)}
    for event, key in zip(events, TRAVERSAL_KEYS + CONTROL_KEYS, strict=True):
        envelope = envelopes.get(event["eventId"])
        assert envelope is not None, f"{key!r} was not dead-lettered"
        # control characters are refused by the schema's key pattern (invalid_event) or by
        # check_key (invalid_key); traversal always by check_key
        expected = {"invalid_key"} if key in TRAVERSAL_KEYS else {"invalid_key", "invalid_event"}
        assert envelope["reason"] in expected, (key, envelope)
    created = {p for p in files_under(tmp_path) - before if "/.tmp" not in p}
    assert all(p.startswith("root/") and p.endswith(ROOT_FILES) for p in created), created
    assert not (root / "gcp_gcs" / "dst-bucket" / "from-bad-source").exists()
    assert b"Unexpected error" not in result.stdout


@pytest.mark.parametrize("side", ["source", "destination"])
def test_lookalike_keys_never_leave_their_bucket(tmp_path: Path, side: str):
    root = tmp_path / "root"
    put_local(root, *SRC, "in/ok", b"payload")
    for key in LOOKALIKE_KEYS:
        with contextlib.suppress(OSError):
            put_local(root, *SRC, key, b"lookalike " + key.encode())
    events = _key_events(LOOKALIKE_KEYS, side)
    submit(root, [body(e) for e in events])
    before = files_under(tmp_path)
    run_once(root, "--allowed-buckets", ALLOWED)
    created = files_under(tmp_path) - before
    for path in created:
        inside_bucket = path == "root/gcp_gcs" or path.startswith(
            ("root/gcp_gcs/dst-bucket", "root/.tmp")
        )
        assert inside_bucket or path.endswith(ROOT_FILES), path
    envelopes = {e["event_id"]: e["reason"] for e in dlq_list(root)}
    for event, key in zip(events, LOOKALIKE_KEYS, strict=True):
        if event["eventId"] in envelopes:
            assert envelopes[event["eventId"]] in ("invalid_key", "invalid_event"), (key, envelopes)
        if "//" in key:  # an empty component: one path for two keys, refused in local mode
            assert envelopes.get(event["eventId"]) == "invalid_key", (key, envelopes)


def test_c1_control_characters_are_rejected(tmp_path: Path):
    root = tmp_path / "root"
    put_local(root, *SRC, "in/ok", b"payload")
    keys = ["csi\u009b31m", "nel\u0085line", "c1\u0080"]
    events = _key_events(keys, "destination")
    submit(root, [body(e) for e in events])
    run_once(root, "--allowed-buckets", ALLOWED)
    reasons = {e["event_id"]: e["reason"] for e in dlq_list(root)}
    assert all(reasons.get(e["eventId"]) in ("invalid_key", "invalid_event") for e in events)


def test_lone_surrogate_key_is_invalid_key_not_internal_error(tmp_path: Path):
    root = tmp_path / "root"
    put_local(root, *SRC, "in/ok", b"payload")
    raw = body(make_event((*SRC, "in/ok"), (*DST, "x"))).replace(b'"x"', b'"\\ud800"')
    submit(root, [raw])
    run_once(root, "--allowed-buckets", ALLOWED)
    (envelope,) = dlq_list(root)
    assert envelope["reason"] in ("invalid_key", "invalid_event")


def test_symlinks_planted_in_a_bucket_are_not_followed(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside secret")
    put_local(root, *SRC, "in/ok", b"payload")
    src_dir = root / "aws_s3" / "src-bucket"
    (src_dir / "link-to-file").symlink_to(outside / "secret.txt")
    (src_dir / "link-dir").symlink_to(outside, target_is_directory=True)
    dst_dir = root / "gcp_gcs" / "dst-bucket"
    dst_dir.mkdir(parents=True)
    (dst_dir / "out").symlink_to(outside, target_is_directory=True)
    (dst_dir / "file-link").symlink_to(outside / "secret.txt")
    events = [
        make_event((*SRC, "link-to-file"), (*DST, "a")),
        make_event((*SRC, "link-dir/secret.txt"), (*DST, "b")),
        make_event((*SRC, "in/ok"), (*DST, "out/planted")),
        make_event((*SRC, "in/ok"), (*DST, "file-link")),
        make_event((*SRC, "in/ok"), (*DST, "out/deeper/planted")),
    ]
    submit(root, [body(e) for e in events])
    run_once(root, "--allowed-buckets", ALLOWED)
    reasons = {e["event_id"]: e["reason"] for e in dlq_list(root)}
    for event in events:
        # a source symlink is refused (invalid_key) or looks absent (source_not_found)
        assert reasons.get(event["eventId"]) in ("invalid_key", "source_not_found"), (
            event["source"]["key"],
            event["destination"]["key"],
            reasons,
        )
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"outside secret"
    assert not (dst_dir / "a").exists() and not (dst_dir / "b").exists()


# -------------------------------------------------------------------------------------------------
# secrets
# -------------------------------------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEPLANTED0001",
    "AWS_SECRET_ACCESS_KEY": "FAKESECRETaws/Planted+Value0123456789abcd",
    "AWS_SESSION_TOKEN": "FAKETOKENsession-IQoJb3JpZ2luX2VjEPlanted",
    "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.FAKETOKENgoogle-planted-access-token",
    "CLOUDSDK_AUTH_ACCESS_TOKEN": "ya29.FAKETOKENcloudsdk-planted",
}
NEEDLES = [
    *SECRETS.values(),
    "FAKESECRET",
    "FAKETOKEN",
    "FAKEKEYMATERIAL",
]


def test_planted_secrets_never_reach_any_output(tmp_path: Path):
    root = tmp_path / "root"
    # The deployment's AWS->GCP form: an external_account config whose subject token (planted)
    # sits in a file the config points to.
    token_file = tmp_path / "subject-token"
    token_file.write_text("FAKETOKENsubject-FAKEKEYMATERIAL-planted")
    key_file = tmp_path / "gcp-external-account.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/"
                "workloadIdentityPools/p/providers/x",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": str(token_file)},
            }
        )
    )
    env = base_env(
        root,
        GOOGLE_APPLICATION_CREDENTIALS=str(key_file),
        TRANSFER_WORKER_LOG_LEVEL="DEBUG",
        **SECRETS,
    )
    data = os.urandom(300 * 1024)
    put_local(root, *SRC, "in/ok", data)
    events = [
        make_event((*SRC, "in/ok"), (*DST, "ok")),  # succeeds
        make_event((*SRC, "in/missing"), (*DST, "x")),  # source_not_found
        make_event((*SRC, "in/ok"), (*DST, "y"), checksum="0" * 64),  # checksum_mismatch
        make_event((*SRC, "in/ok"), ("gcp_gcs", "not-allowed", "z")),  # forbidden
        make_event((*SRC, "../escape"), (*DST, "w")),  # invalid_key
    ]
    raws = [body(e) for e in events] + [b"not json at all", b'{"eventId": 5}']
    result_submit = cli(root, "submit", "--no-validate", "-", stdin=b"\n".join(raws), env=env)
    assert result_submit.returncode == 0
    port = free_port()
    worker = WorkerProcess(
        root,
        tmp_path / "logs",
        "secret-worker",
        "--allowed-buckets",
        ALLOWED,
        http_port=port,
        env=env,
    )
    try:
        worker.wait_http()
        wait_until(
            lambda: (root / "gcp_gcs" / "dst-bucket" / "ok").exists() and len(dlq_list(root)) == 6,
            60,
            "all events settled",
        )
        metrics = worker.http("/metrics")[1]
        ready = worker.http("/ready")[1]
        not_found = worker.http("/env")[1]
    finally:
        assert worker.stop() == 0
    # GCP->AWS start-up: the worker fetches a Google ID token at start and fails here (no
    # metadata server, a service-account key file with a fake private key): the error must not
    # carry the key material or the AWS secrets either.
    role_env = {**env, "TRANSFER_WORKER_AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/x"}
    role_run = cli(root, "run", "--once", env=role_env, timeout=60)
    outputs = {
        "start-up with a role": role_run.stdout + role_run.stderr,
        "submit stdout+stderr": result_submit.stdout + result_submit.stderr,
        "worker stdout": worker.stdout_path.read_bytes(),
        "worker stderr": worker.stderr_path.read_bytes(),
        "dlq list": cli(root, "dlq", "list", env=env).stdout,
        "metrics": metrics,
        "ready": ready,
        "404": not_found,
        "validate": cli(root, "validate", "-", stdin=raws[-1], env=env).stderr,
    }
    for path in root.rglob("*"):
        if path.is_file() and ".db" in path.name:  # queue.db, metadata.db and their -wal files
            outputs[str(path)] = path.read_bytes()
    assert b"Transfer completed successfully" in outputs["worker stdout"]
    assert len(outputs["dlq list"].splitlines()) == 6
    for name, blob in outputs.items():
        for needle in NEEDLES:
            assert needle.encode() not in blob, f"{needle!r} leaked into {name}"


# -------------------------------------------------------------------------------------------------
# HTTP server
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_worker(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("http")
    root = base / "root"
    port = free_port()
    worker = WorkerProcess(root, base / "logs", "http-worker", http_port=port)
    worker.wait_http()
    yield worker, root
    assert worker.stop() == 0


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` (ignoring a reset while sending) and return what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/healthz",
        "/health/",
        "/metrics/",
        "/ready/x",
        "/admin",
        "/env",
        "/debug/vars",
        "/../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/health/../metrics/../../x",
        "//evil.example/health",  # http.server folds leading slashes: still not a served path
        "/HEALTH",
        "/metrics%00",
        "/favicon.ico",
        "/.git/config",
    ],
)
def test_only_three_paths_are_served(http_worker, path: str):
    worker, _ = http_worker
    answer = raw_request(
        worker.http_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(answer) == 404, answer[:200]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_other_methods_are_405(http_worker, method: str, path: str):
    worker, _ = http_worker
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    answer = raw_request(worker.http_port, request.encode())
    assert status_of(answer) in (405, 501), answer[:200]
    assert b"Traceback" not in answer


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health\r\n\r\n",  # HTTP/0.9
        b"GET /health HTTP/9.9\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno colon header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64),  # a TLS ClientHello
        b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
    ],
)
def test_malformed_requests_get_an_error_and_the_server_stays_up(http_worker, data: bytes):
    worker, _ = http_worker
    answer = raw_request(worker.http_port, data)
    assert b"Traceback" not in answer
    assert worker.http("/health")[0] == 200
    assert worker.alive()


@pytest.mark.parametrize(
    "data",
    [
        b"GET /" + b"a" * (1024 * 1024) + b" HTTP/1.1\r\n\r\n",  # 1 MiB request line
        b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * (1024 * 1024) + b"\r\n\r\n",  # 1 MiB header
        b"GET /health HTTP/1.1\r\n" + b"X-Many: c\r\n" * 100_000 + b"\r\n",  # ~1 MiB of headers
    ],
    ids=["request-line", "one-header", "many-headers"],
)
def test_request_size_is_bounded(http_worker, data: bytes):
    worker, _ = http_worker
    answer = raw_request(worker.http_port, data)
    assert status_of(answer) in (400, 414, 431), answer[:300]
    assert worker.http("/health")[0] == 200
    assert worker.alive()


def test_a_large_request_body_is_not_read_into_memory(http_worker):
    worker, _ = http_worker
    head = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
    answer = raw_request(worker.http_port, head + b"z" * 65536, timeout=10)
    assert status_of(answer) == 405
    assert worker.http("/health")[0] == 200


def test_slow_clients_do_not_block_transfers_or_health(http_worker):
    """20 slowloris clients send one byte per second; meanwhile a transfer completes and /health
    answers promptly."""
    worker, root = http_worker
    stop = threading.Event()
    sockets = [
        socket.create_connection(("127.0.0.1", worker.http_port), timeout=5) for _ in range(20)
    ]
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100

    def dribble() -> None:
        for index in range(len(request)):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(request[index : index + 1])
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=dribble, name="slowloris", daemon=True)
    thread.start()
    try:
        stop.wait(1.5)  # every slow client has sent a byte or two and holds a server thread
        data = os.urandom(2 * 1024 * 1024)
        put_local(root, *SRC, "slow/in", data)
        submit(root, [body(make_event((*SRC, "slow/in"), (*DST, "slow/out")))])
        target = root / "gcp_gcs" / "dst-bucket" / "slow/out"
        started = time.monotonic()
        wait_until(
            lambda: target.exists() and sha(target.read_bytes()) == sha(data), 30, "transfer"
        )
        for _ in range(5):
            t0 = time.monotonic()
            assert http_get(worker.http_port, "/health", timeout=2)[0] == 200
            assert time.monotonic() - t0 < 1.0
        assert http_get(worker.http_port, "/metrics", timeout=2)[0] == 200
        assert time.monotonic() - started < 30
        assert thread.is_alive(), "the slow clients must still be hanging during the checks"
    finally:
        stop.set()
        thread.join(5)
        for sock in sockets:
            sock.close()
    assert worker.alive()
