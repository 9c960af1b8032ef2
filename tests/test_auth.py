"""Cross-cloud authentication (issue 6): GCP -> AWS web identity against moto's STS, AWS -> GCP
external_account against a local stand-in for Google's STS, start-up messages, and redaction.

Every server listens on 127.0.0.1; the clock is injected, nothing sleeps."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import transfer_worker as tw
from transfer_worker import (
    CredentialsError,
    aws_session,
    check_credentials,
    redact,
    role_session_name,
    uses_google_identity,
)

ROLE = "arn:aws:iam::123456789012:role/transfer-worker"
# A syntactically real JWT (header {"alg":"RS256","typ":"JWT"}); never a real credential.
ID_TOKEN = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJhdWQiOiJzdHMuYW1hem9uYXdzLmNvbSIsInN1YiI6IjEwMDAwMDAwMDAwMDAwMDAwMDAwMSJ9."
    "c2lnbmF0dXJlLW5vdC1yZWFs"
)
WIF_AUDIENCE = (
    "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/aws"
)
SERVICE_ACCOUNT = "transfer-worker@example-project.iam.gserviceaccount.com"


# -- fixtures -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def _moto_local() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_endpoint(request: pytest.FixtureRequest) -> str:
    """The shared moto server of conftest.py when there is one (and it starts), else our own."""
    try:
        return str(request.getfixturevalue("moto_server"))
    except (pytest.FixtureLookupError, TimeoutError):
        return str(request.getfixturevalue("_moto_local"))


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, aws_endpoint: str, tmp_path: Path) -> str:
    """An environment with no AWS credentials of its own, pointed at moto."""
    for name in (
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL_STS",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a refused connection fails at once
    return aws_endpoint


class TokenSource:
    """Stands in for the metadata server: records each audience, returns a fake ID token."""

    def __init__(self, token: str = ID_TOKEN) -> None:
        self.token = token
        self.audiences: list[str] = []
        self.error: Exception | None = None

    def __call__(self, audience: str) -> str:
        self.audiences.append(audience)
        if self.error is not None:
            raise self.error
        return self.token


class Clock:
    """Epoch seconds moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Route = Callable[["Request"], tuple[int, dict[str, str], bytes]]


class Request:
    """One recorded request; header names lower-cased."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body

    @property
    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in urllib.parse.parse_qs(self.body.decode()).items()}


class FakeHttp:
    """A local HTTP server with a route table (method, path prefix) -> handler, recording every
    request. Stands in for Google's STS and IAM Credentials, GCS, EC2 metadata or AWS STS."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(self.command, self.path, headers, body)
                fake.requests.append(request)
                status, headers, payload = fake.dispatch(request)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-http")
        self.thread.daemon = True
        self.thread.start()

    def dispatch(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        matches = [
            (prefix, route)
            for (method, prefix), route in self.routes.items()
            if method == request.method and request.path.startswith(prefix)
        ]
        if not matches:
            return 404, {}, b"no route"
        return max(matches, key=lambda m: len(m[0]))[1](request)  # longest prefix wins

    def json(self, method: str, prefix: str, document: Any, status: int = 200) -> None:
        payload = json.dumps(document).encode()
        self.routes[(method, prefix)] = lambda r: (
            status,
            {"Content-Type": "application/json"},
            payload,
        )

    def text(self, method: str, prefix: str, text: str, status: int = 200, **headers: str) -> None:
        self.routes[(method, prefix)] = lambda r: (status, headers, text.encode())

    def hits(self, method: str, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_http() -> Iterator[FakeHttp]:
    fake = FakeHttp()
    yield fake
    fake.close()


def sts_error(fake: FakeHttp, code: str, message: str, status: int = 400) -> None:
    fake.text(
        "POST",
        "/",
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        f"<Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>",
        status=status,
        **{"Content-Type": "text/xml"},
    )


def config(**settings: Any) -> tw.Config:
    settings.setdefault("aws_role_arn", ROLE)
    settings.setdefault("worker_id", "transfer-worker-7d9f-abcde-1")
    return tw.Config(http_port=0, **settings)


# -- GCP -> AWS -----------------------------------------------------------------------------------


def test_exchange_gives_the_session_assumed_role_credentials(aws_env: str):
    source, cfg = TokenSource(), config(worker_id="pod/äb:c")
    session = aws_session(cfg, id_token_source=source)

    credentials = session.get_credentials()
    frozen = credentials.get_frozen_credentials()
    assert credentials.method == "gcp-web-identity"
    assert frozen.access_key.startswith("ASIA")  # temporary keys, as STS issues them
    assert frozen.token
    assert source.audiences == ["sts.amazonaws.com"]

    identity = session.client("sts").get_caller_identity()
    assert identity["Arn"] == (
        "arn:aws:sts::123456789012:assumed-role/transfer-worker/transfer-worker-pod--b-c"
    )
    s3 = session.client("s3")
    s3.create_bucket(Bucket="auth-test-bucket")
    s3.put_object(Bucket="auth-test-bucket", Key="k", Body=b"signed with assumed-role keys")
    assert s3.get_object(Bucket="auth-test-bucket", Key="k")["Body"].read().startswith(b"signed")


def test_the_exchanged_credentials_win_over_stray_environment_keys(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    session = aws_session(config(), id_token_source=TokenSource())
    assert session.get_credentials().get_frozen_credentials().access_key.startswith("ASIA")
    assert "assumed-role" in session.client("sts").get_caller_identity()["Arn"]


def test_every_client_of_the_session_shares_one_exchange(aws_env: str):
    source = TokenSource()
    session = aws_session(config(), id_token_source=source)
    for service in ("s3", "sqs", "sts"):
        client = session.client(service)
        client._request_signer._credentials.get_frozen_credentials()
    assert len(source.audiences) == 1


@pytest.mark.parametrize(
    ("worker_id", "expected"),
    [
        ("host-123", "transfer-worker-host-123"),
        ("pod name/with:odd*chars", "transfer-worker-pod-name-with-odd-chars"),
        ("a" * 100, "transfer-worker-" + "a" * 48),
        ("mail+tag=1,x.y@z", "transfer-worker-mail+tag=1,x.y@z"),
    ],
)
def test_role_session_name_fits_sts_rules(worker_id: str, expected: str):
    assert role_session_name(worker_id) == expected
    assert len(role_session_name(worker_id)) <= 64


def test_credentials_refresh_in_the_advisory_window_before_expiry(aws_env: str):
    import time

    clock, source = Clock(time.time()), TokenSource()
    session = aws_session(config(), id_token_source=source, clock=clock)
    credentials = session.get_credentials()
    first = credentials.get_frozen_credentials()
    expiry = credentials._expiry_time.timestamp()
    assert expiry - clock.now == pytest.approx(3600, abs=60)

    clock.now = expiry - 16 * 60  # outside botocore's 15 minute advisory window: no refresh
    assert credentials.get_frozen_credentials() == first
    assert len(source.audiences) == 1

    clock.now = expiry - 14 * 60  # inside it: a new token, a new exchange, new keys
    second = credentials.get_frozen_credentials()
    assert len(source.audiences) == 2
    assert second.access_key != first.access_key


def test_a_failed_advisory_refresh_keeps_the_current_credentials(aws_env: str):
    import time

    clock, source = Clock(time.time()), TokenSource()
    credentials = aws_session(config(), id_token_source=source, clock=clock).get_credentials()
    first = credentials.get_frozen_credentials()
    source.error = RuntimeError("metadata server unavailable")
    clock.now = credentials._expiry_time.timestamp() - 14 * 60
    assert credentials.get_frozen_credentials() == first  # botocore tries again on next use
    assert len(source.audiences) == 2


def test_no_role_means_boto3s_own_provider_chain(aws_env: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    source = TokenSource()
    session = aws_session(config(aws_role_arn=""), id_token_source=source)
    assert session.get_credentials().method == "env"
    assert source.audiences == []
    assert check_credentials(config(aws_role_arn=""), session) == []


def test_eks_irsa_environment_wins_over_the_google_exchange(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    token_file = tmp_path / "token"
    token_file.write_text(ID_TOKEN)
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/irsa")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    source, cfg = TokenSource(), config()
    assert not uses_google_identity(cfg)

    session = aws_session(cfg, id_token_source=source)
    assert session.get_credentials().method == "assume-role-with-web-identity"
    check_credentials(cfg, session)
    assert "assumed-role/irsa/" in session.client("sts").get_caller_identity()["Arn"]
    assert source.audiences == []


def test_sts_access_denied_names_the_role_setting(
    aws_env: str, fake_http: FakeHttp, monkeypatch: pytest.MonkeyPatch
):
    sts_error(fake_http, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", fake_http.url)
    cfg = config()
    with pytest.raises(CredentialsError) as caught:
        check_credentials(cfg, aws_session(cfg, id_token_source=TokenSource()))
    message = str(caught.value)
    assert message.startswith("--aws-role-arn / TRANSFER_WORKER_AWS_ROLE_ARN:")
    assert ROLE in message and "AccessDenied" in message
    assert ID_TOKEN not in message
    assert caught.value.reason == "credentials" and caught.value.retryable
    assert isinstance(caught.value, ValueError)  # main() prints it and exits 2
    sent = fake_http.hits("POST", "/")[0]
    assert "authorization" not in sent.headers  # the exchange is unsigned
    assert sent.form["WebIdentityToken"] == ID_TOKEN
    assert sent.form["RoleSessionName"] == "transfer-worker-transfer-worker-7d9f-abcde-1"


def test_sts_wrong_audience_names_the_audience_setting(
    aws_env: str, fake_http: FakeHttp, monkeypatch: pytest.MonkeyPatch
):
    sts_error(fake_http, "InvalidIdentityToken", "Incorrect token audience")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", fake_http.url)
    cfg = config(aws_role_audience="wrong-audience")
    with pytest.raises(CredentialsError, match="TRANSFER_WORKER_AWS_ROLE_AUDIENCE") as caught:
        check_credentials(cfg, aws_session(cfg, id_token_source=TokenSource()))
    assert "'wrong-audience'" in str(caught.value)
    assert "accounts.google.com:oaud" in str(caught.value)


def test_missing_identity_provider_names_the_role_setting(
    aws_env: str, fake_http: FakeHttp, monkeypatch: pytest.MonkeyPatch
):
    sts_error(
        fake_http,
        "InvalidIdentityToken",
        "No OpenIDConnect provider found in your account for https://accounts.google.com",
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", fake_http.url)
    cfg = config()
    with pytest.raises(CredentialsError, match=r"^--aws-role-arn / TRANSFER_WORKER_AWS_ROLE_ARN"):
        check_credentials(cfg, aws_session(cfg, id_token_source=TokenSource()))


def test_unreachable_sts_is_reported_without_the_token(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{_free_port()}")
    cfg = config()
    with pytest.raises(CredentialsError, match="AWS STS could not be reached") as caught:
        check_credentials(cfg, aws_session(cfg, id_token_source=TokenSource()))
    assert ID_TOKEN not in str(caught.value)


def test_token_source_failure_names_the_metadata_server_and_audience(aws_env: str):
    source = TokenSource()
    source.error = RuntimeError(f"HTTP 404 from metadata.google.internal; stale token {ID_TOKEN}")
    cfg = config(aws_role_audience="aws-federation")
    with pytest.raises(CredentialsError) as caught:
        check_credentials(cfg, aws_session(cfg, id_token_source=source))
    message = str(caught.value)
    assert "metadata server" in message
    assert "'aws-federation'" in message and "TRANSFER_WORKER_AWS_ROLE_AUDIENCE" in message
    assert ID_TOKEN not in message and "[REDACTED]" in message


def test_no_aws_credentials_at_all_is_explained(aws_env: str):
    cfg = config(aws_role_arn="", storage="cloud")
    with pytest.raises(CredentialsError, match=r"no AWS credentials found.*IRSA"):
        check_credentials(cfg, aws_session(cfg))


def test_local_mode_needs_no_aws_credentials(aws_env: str):
    cfg = config(aws_role_arn="")
    assert check_credentials(cfg, aws_session(cfg)) == []


# -- AWS -> GCP -----------------------------------------------------------------------------------

IMDS_CREDENTIALS = {
    "Code": "Success",
    "Type": "AWS-HMAC",
    "AccessKeyId": "ASIAIMDSEXAMPLE00001",
    "SecretAccessKey": "imdsSecretAccessKeyExample/0000000000000",
    "Token": "IQoJb3JpZ2luX2VjEXAMPLEsessionTOKENfromIMDS==",
    "Expiration": "2099-01-01T00:00:00Z",
}


def external_account_config(fake: FakeHttp) -> dict[str, Any]:
    """What `gcloud iam workload-identity-pools create-cred-config ... --aws --enable-imdsv2
    --service-account=...` writes, with every URL pointed at the local fake."""
    return {
        "type": "external_account",
        "audience": WIF_AUDIENCE,
        "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
        "token_url": f"{fake.url}/v1/token",
        "service_account_impersonation_url": (
            f"{fake.url}/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken"
        ),
        "credential_source": {
            "environment_id": "aws1",
            "region_url": f"{fake.url}/latest/meta-data/placement/availability-zone",
            "url": f"{fake.url}/latest/meta-data/iam/security-credentials",
            "regional_cred_verification_url": (
                "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
            ),
            "imdsv2_session_token_url": f"{fake.url}/latest/api/token",
        },
    }


@pytest.fixture
def google_side(
    fake_http: FakeHttp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeHttp, Path]:
    """EC2 metadata, Google STS, IAM Credentials and GCS, all on one local fake."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "STORAGE_EMULATOR_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    fake = fake_http
    fake.text("PUT", "/latest/api/token", "imdsv2-session-token")
    fake.text("GET", "/latest/meta-data/placement/availability-zone", "us-east-1b")
    fake.text("GET", "/latest/meta-data/iam/security-credentials", "worker-node-role")
    fake.json(
        "GET", "/latest/meta-data/iam/security-credentials/worker-node-role", IMDS_CREDENTIALS
    )
    fake.json(
        "POST",
        "/v1/token",
        {
            "access_token": "ya29.federated-token-from-fake-sts",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": 3600,
        },
    )
    fake.json(
        "POST",
        "/v1/projects/-/serviceAccounts/",
        {"accessToken": "ya29.service-account-token", "expireTime": "2099-01-01T00:00:00Z"},
    )
    fake.json(
        "GET",
        "/storage/v1/b/dest-bucket/o/imports%2Ffile.parquet",
        {
            "kind": "storage#object",
            "bucket": "dest-bucket",
            "name": "imports/file.parquet",
            "generation": "1",
            "size": "3",
        },
    )
    path = tmp_path / "gcp-credentials.json"
    path.write_text(json.dumps(external_account_config(fake)))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    return fake, path


def test_external_account_exchange_and_bearer_on_gcs(google_side: tuple[FakeHttp, Path]):
    import google.auth
    from google.cloud import storage

    fake, _ = google_side
    # ADC, as the clients use it: GOOGLE_APPLICATION_CREDENTIALS names the file. (Without scopes:
    # with them, ADC would also look the project up at cloudresourcemanager.googleapis.com.)
    credentials, _ = google.auth.default()
    assert type(credentials).__module__ == "google.auth.aws"
    client = storage.Client(
        project="example-project",
        credentials=credentials,
        client_options={"api_endpoint": fake.url},
    )
    blob = client.bucket("dest-bucket").get_blob("imports/file.parquet")
    assert blob is not None and blob.size == 3

    # IMDSv2: a session token first, then sent with every metadata request.
    assert fake.hits("PUT", "/latest/api/token")
    for hit in fake.hits("GET", "/latest/meta-data"):
        assert hit.headers["x-aws-ec2-metadata-token"] == "imdsv2-session-token"

    exchange = fake.hits("POST", "/v1/token")[0].form
    assert exchange["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert exchange["subject_token_type"] == "urn:ietf:params:aws:token-type:aws4_request"
    assert exchange["audience"] == WIF_AUDIENCE
    assert exchange["requested_token_type"] == "urn:ietf:params:oauth:token-type:access_token"

    # The subject token is a signed GetCallerIdentity request Google replays to AWS.
    subject = json.loads(urllib.parse.unquote(exchange["subject_token"]))
    headers = {h["key"].lower(): h["value"] for h in subject["headers"]}
    assert subject["url"].startswith("https://sts.us-east-1.amazonaws.com")
    assert headers["x-goog-cloud-target-resource"] == WIF_AUDIENCE
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIAIMDSEXAMPLE00001/")
    assert headers["x-amz-security-token"] == IMDS_CREDENTIALS["Token"]

    # The federated token buys the service account's token, which GCS then sees.
    impersonation = fake.hits("POST", "/v1/projects/-/serviceAccounts/")[0]
    assert impersonation.headers["authorization"] == "Bearer ya29.federated-token-from-fake-sts"
    assert f"{SERVICE_ACCOUNT}:generateAccessToken" in impersonation.path
    gcs = fake.hits("GET", "/storage/v1/b/dest-bucket/o/")
    assert gcs and gcs[0].headers["authorization"] == "Bearer ya29.service-account-token"


def test_external_account_config_passes_the_start_up_check(
    google_side: tuple[FakeHttp, Path],
):
    fake, _ = google_side
    assert check_credentials(config(aws_role_arn=""), None) == []
    assert fake.requests == []  # the check only loads the file: no token is fetched


def test_aws_sourced_config_under_irsa_gets_a_warning(
    google_side: tuple[FakeHttp, Path], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/eks.amazonaws.com/token")
    notes = check_credentials(config(aws_role_arn=""), None)
    assert len(notes) == 1 and "IRSA" in notes[0] and "Kubernetes OIDC provider" in notes[0]


def test_unreadable_google_credentials_file_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    missing = tmp_path / "nowhere" / "gcp-credentials.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(CredentialsError) as caught:
        check_credentials(config(aws_role_arn=""), None)
    assert str(caught.value).startswith(f"GOOGLE_APPLICATION_CREDENTIALS={missing}: cannot read")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json at all", "the file is not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"type": "external_account", "audience": WIF_AUDIENCE}), "google-auth cannot"),
        (json.dumps({"type": "mystery"}), "type 'mystery' is not one the worker uses"),
    ],
)
def test_google_credentials_file_that_does_not_load_is_named(
    content: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    path = tmp_path / "gcp-credentials.json"
    path.write_text(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(CredentialsError, match=expected) as caught:
        check_credentials(config(aws_role_arn=""), None)
    assert f"GOOGLE_APPLICATION_CREDENTIALS={path}" in str(caught.value)


def test_kubernetes_oidc_config_needs_its_projected_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    token = tmp_path / "token"
    path = tmp_path / "gcp-credentials.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": WIF_AUDIENCE.replace("providers/aws", "providers/eks"),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": str(token), "format": {"type": "text"}},
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(CredentialsError, match=f"credential_source.file {token} is not readable"):
        check_credentials(config(aws_role_arn=""), None)
    token.write_text(ID_TOKEN)
    assert check_credentials(config(aws_role_arn=""), None) == []


# -- redaction ------------------------------------------------------------------------------------

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzPLANTED"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEPLANTEDsessiontoken//AAAAAAAAAAAAAAAAAA=="
ENV_SECRET = "hunter2-planted-password"
PLANTED = (
    ID_TOKEN,
    AWS_SECRET,
    SESSION_TOKEN,
    ENV_SECRET,
    "ya29.a0AfPLANTEDaccesstoken",
    "ASIAPLANTED000000001",
    "Signature=0123abcd",
)
SECRET_TEXTS = (
    f"token exchange failed for {ID_TOKEN}",
    "GET /storage/v1/b HTTP/1.1\r\nAuthorization: Bearer ya29.a0AfPLANTEDaccesstoken\r\nHost: x",
    "Authorization: AWS4-HMAC-SHA256 Credential=ASIAPLANTED000000001/20240115/us-east-1/s3/"
    "aws4_request, SignedHeaders=host, Signature=0123abcd",
    f"aws_secret_access_key={AWS_SECRET} aws_session_token={SESSION_TOKEN}",
    json.dumps({"SecretAccessKey": AWS_SECRET, "SessionToken": SESSION_TOKEN}),
    f"https://b.s3.amazonaws.com/k?X-Amz-Security-Token={SESSION_TOKEN}&X-Amz-Signature=0123abcd",
    f"the database said no to {ENV_SECRET}",
)
HARMLESS = (
    "s3://source-data-bucket/data/2024/01/file.parquet",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "sts.amazonaws.com schema 1.0.0",
    "InvalidIdentityToken: Incorrect token audience",
    '{"key": "imports/2024/01/file.parquet", "bucket": "destination-data-bucket"}',
    "AWS_WEB_IDENTITY_TOKEN_FILE=/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
)


@pytest.fixture
def planted_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFER_WORKER_TEST_DB_PASSWORD", ENV_SECRET)
    monkeypatch.setenv(
        "AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
    )


@pytest.mark.parametrize("text", SECRET_TEXTS)
def test_redact_removes_tokens_keys_and_headers(text: str, planted_env: None):
    cleaned = redact(text)
    assert "[REDACTED]" in cleaned
    assert not [secret for secret in PLANTED if secret in cleaned]


@pytest.mark.parametrize("text", HARMLESS)
def test_redact_leaves_ordinary_text_alone(text: str, planted_env: None):
    assert redact(text) == text


def _logger_with_redaction(stream: io.StringIO) -> Any:
    """The worker's own logger: make_logger puts RedactSecrets after format_exc_info."""
    return tw.make_logger("DEBUG", stream)


def test_logs_carry_no_secret(planted_env: None):
    stream = io.StringIO()
    log = _logger_with_redaction(stream)
    for text in SECRET_TEXTS:
        log.warning("Transfer attempt failed", error=text, detail={"nested": [text]})
    try:
        raise RuntimeError(f"refresh failed with {ID_TOKEN}")
    except RuntimeError as exc:
        log.exception("Credentials refresh failed", cause=exc)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(SECRET_TEXTS) + 1
    assert all(json.loads(line)["service"] == "transfer-worker" for line in lines)
    assert not [secret for secret in PLANTED if secret in stream.getvalue()]


def test_dead_letter_envelope_error_carries_no_secret(planted_env: None):
    event_body = json.dumps({"eventId": "e-1", "source": {"key": "data/2024/file.parquet"}})
    message = tw.Message(body=event_body.encode(), message_id="m-1", receive_count=1, handle=None)
    error = tw.PermanentError(
        f"AWS GetObject: AccessDenied for {SECRET_TEXTS[5]}", reason="access_denied"
    )
    envelope = tw.make_envelope(message, error, attempts=1, worker_id="w-1")
    assert envelope["body"] == event_body  # the body is redriven verbatim, never rewritten
    assert not [secret for secret in PLANTED if secret in json.dumps(envelope)]


def test_an_authenticated_transfer_logs_and_dead_letters_no_token(
    aws_env: str, tmp_path: Path, planted_env: None
):
    """S3 (moto) through the exchanged session -> a local gcp_gcs bucket, plus one event whose
    source is missing: every log line and the envelope are searched for the credentials."""
    source = TokenSource()
    session = aws_session(config(), id_token_source=source)
    frozen = session.get_credentials().get_frozen_credentials()
    s3 = session.client("s3")
    s3.create_bucket(Bucket="auth-source-bucket")
    s3.put_object(Bucket="auth-source-bucket", Key="in/data.bin", Body=b"cross-cloud bytes")

    cfg = tw.Config(local_root=str(tmp_path), http_port=0, aws_role_arn=ROLE, worker_id="w-1")
    clients = tw.AwsClients(pool=4, session=session)  # every boto3 client from one session
    stores = {
        "aws_s3": tw.S3Store(clients=clients),
        "gcp_gcs": tw.LocalObjectStore(tmp_path, "gcp_gcs"),
    }
    queue = tw.LocalQueue(tmp_path / "queue.db", poll_interval=0.01)
    for key in ("in/data.bin", "in/missing.bin"):
        queue.publish(json.dumps(_event(key)).encode())
    stream = io.StringIO()
    worker = tw.Worker(
        cfg,
        queue,
        tw.TransferEngine(stores),
        tw.Metrics(),
        _logger_with_redaction(stream),
        sleep=lambda seconds: None,
    )
    worker.run(once=True)

    assert (tmp_path / "gcp_gcs" / "dest-bucket" / "out/in/data.bin").read_bytes() == (
        b"cross-cloud bytes"
    )
    envelopes = [envelope for _, envelope in tw.LocalQueue(tmp_path / "queue.db").dead_letters()]
    assert [e["reason"] for e in envelopes] == ["source_not_found"]
    captured = stream.getvalue() + json.dumps(envelopes)
    for secret in (frozen.access_key, frozen.secret_key, frozen.token, ID_TOKEN, ENV_SECRET):
        assert secret not in captured


def _event(key: str) -> dict[str, Any]:
    import uuid

    return {
        "schemaVersion": "1.0.0",
        "eventId": str(uuid.uuid4()),
        "correlationId": str(uuid.uuid4()),
        "timestamp": "2024-01-15T10:30:00Z",
        "source": {"provider": "aws_s3", "bucket": "auth-source-bucket", "key": key},
        "destination": {"provider": "gcp_gcs", "bucket": "dest-bucket", "key": f"out/{key}"},
        "metadata": {"contentType": "application/octet-stream"},
    }


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJlLW5vdC1yZWFs"


def submit_and_run_once(event: dict[str, Any], env: dict[str, str]) -> Any:
    """The real CLI in subprocesses: submit one event to the local queue, then `run --once`."""
    script = str(Path(tw.__file__))
    submitted = subprocess.run(
        [sys.executable, script, "submit", "-"],
        env=env,
        timeout=60,
        input=json.dumps(event).encode(),
        capture_output=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    run = subprocess.run(
        [sys.executable, script, "run", "--once"], env=env, timeout=120, capture_output=True
    )
    assert run.returncode == 0, run.stderr
    return run


def test_cli_gcp_to_aws_transfer_with_no_key_in_any_file_or_variable(
    aws_env: str, fake_http: FakeHttp, gcs_emulator: str, tmp_path: Path
):
    """The real CLI as a GKE pod would run it: the only identity is the Google ID token from the
    metadata server (a local stand-in, found through GCE_METADATA_HOST as on GKE), exchanged with
    moto's STS for the role; the S3 object then crosses to GCS (the emulator)."""
    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    now = int(time.time())
    token = _unsigned_jwt(
        {"aud": "sts.amazonaws.com", "sub": "1234567890", "iat": now, "exp": now + 3600}
    )
    flavor = {"Metadata-Flavor": "Google", "Content-Type": "text/plain"}
    fake_http.text("GET", "/", "", **flavor)
    fake_http.json(
        "GET",
        "/computeMetadata/v1/instance/service-accounts/default/",
        {"email": SERVICE_ACCOUNT, "aliases": ["default"], "scopes": []},
    )
    fake_http.text(
        "GET", "/computeMetadata/v1/instance/service-accounts/default/identity", token, **flavor
    )
    data = os.urandom(100_000)
    s3 = boto3.client("s3", aws_access_key_id="setup-only", aws_secret_access_key="setup-only")
    s3.create_bucket(Bucket="wif-source-bucket")
    s3.put_object(Bucket="wif-source-bucket", Key="in/data.bin", Body=data)
    gcs = storage.Client(
        project="test-project",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_emulator},
    )
    gcs.create_bucket("wif-dest-bucket")

    host = fake_http.url.removeprefix("http://")
    env = {
        k: v for k, v in os.environ.items() if not re.search(r"SECRET|TOKEN|KEY_ID|CREDENTIALS", k)
    }
    env.update(
        GCE_METADATA_HOST=host,
        GCE_METADATA_IP=host,
        STORAGE_EMULATOR_HOST=gcs_emulator,
        GOOGLE_CLOUD_PROJECT="test-project",
        TRANSFER_WORKER_AWS_ROLE_ARN=ROLE,
        TRANSFER_WORKER_STORAGE="cloud",
        TRANSFER_WORKER_ALLOWED_BUCKETS="aws_s3:wif-source-bucket,gcp_gcs:wif-dest-bucket",
        TRANSFER_WORKER_LOCAL_ROOT=str(tmp_path),
        TRANSFER_WORKER_HTTP_PORT="0",
    )
    assert not [k for k in env if k.startswith("AWS_") and ("KEY" in k or "TOKEN" in k)]
    event = _event("in/data.bin")
    event["source"]["bucket"], event["destination"]["bucket"] = (
        "wif-source-bucket",
        "wif-dest-bucket",
    )
    run = submit_and_run_once(event, env)
    assert gcs.bucket("wif-dest-bucket").blob("out/in/data.bin").download_as_bytes() == data
    identity = fake_http.hits(
        "GET", "/computeMetadata/v1/instance/service-accounts/default/identity"
    )
    assert identity and "audience=sts.amazonaws.com" in identity[0].path
    assert token not in (run.stdout + run.stderr).decode()
    assert b'"outcome": "success"' in run.stdout


def test_cli_aws_to_gcp_transfer_with_no_key_in_any_file_or_variable(
    aws_env: str, google_side: tuple[FakeHttp, Path], gcs_emulator: str, tmp_path: Path
):
    """The real CLI as an EC2 worker would run it: boto3 and google-auth both take the instance
    role from (a local stand-in for) EC2 metadata; google-auth trades it at (a stand-in for)
    Google's STS through the external_account file; GCS requests go through a recording relay to
    the emulator, so the bearer token the worker sends can be checked."""
    import http.client

    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    fake, credentials_file = google_side
    emulator = urllib.parse.urlsplit(gcs_emulator).netloc

    def relay(request: Request) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(emulator, timeout=30)
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "connection")}
        connection.request(request.method, request.path, body=request.body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        skip = ("content-length", "transfer-encoding", "connection")
        return (
            response.status,
            {k: v for k, v in response.getheaders() if k.lower() not in skip},
            payload,
        )

    for method in ("GET", "POST", "PUT"):
        for prefix in ("/storage/v1/b/wif-gcs-dest/", "/upload/storage/v1/b/wif-gcs-dest/"):
            fake.routes[(method, prefix)] = relay
    data = os.urandom(50_000)
    s3 = boto3.client("s3", aws_access_key_id="setup-only", aws_secret_access_key="setup-only")
    s3.create_bucket(Bucket="wif-s3-source")
    s3.put_object(Bucket="wif-s3-source", Key="in/data.bin", Body=data)
    direct = storage.Client(
        project="test-project",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_emulator},
    )
    direct.create_bucket("wif-gcs-dest")

    env = {
        k: v
        for k, v in os.environ.items()
        if not re.search(r"SECRET|TOKEN|KEY_ID|EMULATOR_HOST", k)
    }
    env.update(
        AWS_EC2_METADATA_DISABLED="false",
        AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url,
        AWS_DEFAULT_REGION="us-east-1",
        API_ENDPOINT_OVERRIDE=fake.url,
        GOOGLE_APPLICATION_CREDENTIALS=str(credentials_file),
        GOOGLE_CLOUD_PROJECT="test-project",
        TRANSFER_WORKER_STORAGE="cloud",
        TRANSFER_WORKER_ALLOWED_BUCKETS="aws_s3:wif-s3-source,gcp_gcs:wif-gcs-dest",
        TRANSFER_WORKER_LOCAL_ROOT=str(tmp_path),
        TRANSFER_WORKER_HTTP_PORT="0",
    )
    assert "private_key" not in credentials_file.read_text()
    event = _event("in/data.bin")
    event["source"]["bucket"], event["destination"]["bucket"] = "wif-s3-source", "wif-gcs-dest"
    run = submit_and_run_once(event, env)
    assert direct.bucket("wif-gcs-dest").blob("out/in/data.bin").download_as_bytes() == data
    exchange = fake.hits("POST", "/v1/token")
    assert exchange and exchange[0].form["audience"] == WIF_AUDIENCE
    gcs_requests = [r for r in fake.requests if "wif-gcs-dest" in r.path]
    assert gcs_requests
    assert {r.headers.get("authorization") for r in gcs_requests} == {
        "Bearer ya29.service-account-token"
    }
    output = (run.stdout + run.stderr).decode()
    assert "ya29." not in output and IMDS_CREDENTIALS["SecretAccessKey"] not in output


def test_ready_answers_503_while_credentials_cannot_be_obtained(aws_env: str):
    """/ready runs the same check as start-up (cmd_run wires it in): with the metadata server
    gone, the exchange cannot happen and the pod is taken out of service, naming the reason."""
    import functools

    def metadata_server_down(audience: str) -> str:
        raise ConnectionError("metadata.google.internal unreachable")

    cfg = config()
    session = aws_session(cfg, id_token_source=metadata_server_down)
    readiness = tw.Readiness({"credentials": functools.partial(check_credentials, cfg, session)})
    app = tw.make_wsgi_app(tw.Metrics(), readiness)
    status: list[str] = []
    body = b"".join(
        app({"PATH_INFO": "/ready", "REQUEST_METHOD": "GET"}, lambda s, h: status.append(s))
    )
    assert status == ["503 Service Unavailable"]
    assert body == b"not ready: credentials: CredentialsError\n"
