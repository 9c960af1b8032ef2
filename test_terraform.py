"""Static checks of terraform/ (providers cannot be downloaded here, so `terraform validate`
cannot run): every .tf file is parsed with python-hcl2 and the parsed content is held to the
README's "Permissions the worker needs" and to the queue / dead-letter settings the worker
relies on.

Each check is a function over the parsed configuration; the real configuration must pass it and a
mutated copy (a wildcard, an extra action, a missing dead_letter_policy ...) must fail it, so the
checks are shown to be able to fail.

python-hcl2 missing: skipped with a reason locally, a failure under CI=true.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

try:
    import hcl2
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip(
        "python-hcl2 is not installed (pip install python-hcl2==8.1.4)", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parent
TF = ROOT / "terraform"
CHECK_SCRIPT = ROOT / ".ci" / "check-terraform"

# The README's permission table, statement by statement: (actions, resources the statement is on).
EXPECTED_AWS_STATEMENTS = {
    "source_objects": ["s3:GetObject"],
    "source_buckets": ["s3:ListBucket"],
    "destination_objects": [
        "s3:PutObject",
        "s3:GetObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    ],
    "destination_buckets": ["s3:ListBucket", "s3:ListBucketMultipartUploads"],
    "queue": [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
    ],
    "dead_letter_queue": ["sqs:SendMessage"],
}
EXPECTED_GCP_ROLES = {
    "source": ["storage.objects.get", "storage.objects.list"],
    "destination": ["storage.objects.create", "storage.objects.get", "storage.objects.delete"],
}
WORKER_MAX_RETRIES = 3


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def _unquote(value: Any) -> Any:
    """python-hcl2 8 keeps string quotes and adds bookkeeping keys; strip both."""
    if isinstance(value, dict):
        return {
            _unquote(k): _unquote(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _tf_files() -> list[Path]:
    return sorted(TF.rglob("*.tf"))


def _load() -> dict[str, Any]:
    """All files merged: {"resource": {type: {name: body}}, "data": ..., "variable": {name: body},
    "output": ..., "locals": {name: expr}, "terraform": [blocks], "provider": {name: body}}."""
    merged: dict[str, Any] = {
        "resource": {},
        "data": {},
        "variable": {},
        "output": {},
        "locals": {},
        "terraform": [],
        "provider": {},
    }
    for path in _tf_files():
        with path.open(encoding="utf-8") as f:
            parsed = _unquote(hcl2.load(f))
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        key = (rtype, name)
                        assert name not in merged[kind].setdefault(rtype, {}), key
                        merged[kind][rtype][name] = body
        for kind in ("variable", "output", "provider"):
            for block in parsed.get(kind, []):
                merged[kind].update(block)
        for block in parsed.get("locals", []):
            merged["locals"].update(block)
        merged["terraform"].extend(parsed.get("terraform", []))
    return merged


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    return _load()


def _expr(value: Any) -> str:
    """An HCL expression or literal as one string, for reference checks."""
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------------------------
# Checks (pure functions over the parsed configuration)
# ------------------------------------------------------------------------------------------------


def _classify_aws_resources(resources: Any) -> str:
    text = _expr(resources)
    objects = "/*" in text
    if "aws_source_bucket_arns" in text and "aws_destination_bucket_arns" not in text:
        return "source_objects" if objects else "source_buckets"
    if "aws_destination_bucket_arns" in text and "aws_source_bucket_arns" not in text:
        return "destination_objects" if objects else "destination_buckets"
    if resources == ["${aws_sqs_queue.events.arn}"]:
        return "queue"
    if resources == ["${aws_sqs_queue.dead_letter.arn}"]:
        return "dead_letter_queue"
    raise AssertionError(f"worker statement on unexpected resources: {text}")


def check_worker_policy(c: dict[str, Any]) -> None:
    doc = c["data"]["aws_iam_policy_document"]["worker"]
    assert "dynamic" not in doc, "the worker policy must be static"
    seen: dict[str, list[str]] = {}
    for st in doc["statement"]:
        assert st.get("effect", "Allow") == "Allow", st
        assert not {"not_actions", "not_resources", "principals", "not_principals"} & set(st), st
        actions = st["actions"]
        assert isinstance(actions, list), f"actions must be a literal list: {actions}"
        for action in actions:
            assert "*" not in action and "?" not in action, f"wildcard action {action}"
            assert action != "s3:DeleteObject", "the worker never deletes objects on S3"
        kind = _classify_aws_resources(st["resources"])
        assert kind not in seen, f"two statements on {kind}"
        seen[kind] = actions
        if "sqs:SendMessage" in actions:
            assert kind == "dead_letter_queue", "sqs:SendMessage is for the dead-letter queue only"
    assert seen == EXPECTED_AWS_STATEMENTS


def check_worker_role_has_only_that_policy(c: dict[str, Any]) -> None:
    role = c["resource"]["aws_iam_role"]["worker"]
    assert not {"inline_policy", "managed_policy_arns"} & set(role)
    assert role["assume_role_policy"] == "${data.aws_iam_policy_document.worker_trust.json}"
    assert not c["resource"].get("aws_iam_role_policy_attachment")
    assert not c["resource"].get("aws_iam_policy_attachment")
    assert not c["resource"].get("aws_iam_role_policies_exclusive")
    policies = c["resource"]["aws_iam_role_policy"]
    assert list(policies) == ["worker"], policies
    assert policies["worker"]["role"] == "${aws_iam_role.worker.id}"
    assert policies["worker"]["policy"] == "${data.aws_iam_policy_document.worker.json}"


def _conditions(statement: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    return {
        cond["variable"]: (cond["test"], cond["values"]) for cond in statement.get("condition", [])
    }


def check_worker_trust(c: dict[str, Any]) -> None:
    doc = c["data"]["aws_iam_policy_document"]["worker_trust"]
    statements = list(doc.get("statement", []))
    for dyn in doc.get("dynamic", []):
        statements.extend(dyn["statement"]["content"])
    assert len(statements) == 2, statements
    by_principal = {}
    for st in statements:
        assert st["actions"] == ["sts:AssumeRoleWithWebIdentity"], st
        assert st.get("effect", "Allow") == "Allow"
        (principal,) = st["principals"]
        assert principal["type"] == "Federated"
        by_principal[principal["identifiers"][0]] = _conditions(st)

    google = by_principal["accounts.google.com"]
    unique_id = ["${google_service_account.worker.unique_id}"]
    assert google == {
        "accounts.google.com:aud": ("StringEquals", unique_id),
        "accounts.google.com:sub": ("StringEquals", unique_id),
        "accounts.google.com:oaud": ("StringEquals", ["${var.aws_role_audience}"]),
    }
    assert c["variable"]["aws_role_audience"]["default"] == "sts.amazonaws.com"

    eks = by_principal["${statement.value}"]
    assert eks == {
        "${local.eks_oidc_issuer_hostpath}:sub": ("StringEquals", ["${local.eks_subject}"]),
        "${local.eks_oidc_issuer_hostpath}:aud": ("StringEquals", ["sts.amazonaws.com"]),
    }
    assert c["locals"]["eks_subject"] == (
        "system:serviceaccount:${var.worker_namespace}:${var.worker_service_account}"
    )
    assert c["variable"]["worker_namespace"]["default"] == "transfer-worker"
    assert c["variable"]["worker_service_account"]["default"] == "transfer-worker-sa"


def _int_default(c: dict[str, Any], var: str) -> int:
    default = c["variable"][var]["default"]
    assert isinstance(default, int), (var, default)
    return default


def check_sqs(c: dict[str, Any]) -> None:
    queues = c["resource"]["aws_sqs_queue"]
    assert set(queues) == {"events", "dead_letter"}
    events, dlq = queues["events"], queues["dead_letter"]
    for q in (events, dlq):
        assert q.get("sqs_managed_sse_enabled") is True or q.get("kms_master_key_id"), q
    assert dlq["message_retention_seconds"] == 14 * 24 * 3600
    assert "redrive_policy" not in dlq
    assert events["visibility_timeout_seconds"] == "${var.visibility_timeout_seconds}"
    assert _int_default(c, "visibility_timeout_seconds") == 300

    redrive = re.fullmatch(r"\$\{jsonencode\(\{(.*)\}\)\}", events["redrive_policy"], re.S)
    assert redrive, events["redrive_policy"]
    fields = dict(
        (k.strip(), v.strip())
        for k, v in (item.split("=", 1) for item in redrive.group(1).split(","))
    )
    assert fields == {
        "deadLetterTargetArn": "aws_sqs_queue.dead_letter.arn",
        "maxReceiveCount": "var.sqs_max_receive_count",
    }
    assert _int_default(c, "sqs_max_receive_count") > WORKER_MAX_RETRIES + 1
    (validation,) = c["variable"]["sqs_max_receive_count"]["validation"]
    assert "var.sqs_max_receive_count > 4" in validation["condition"]


def check_s3_buckets(c: dict[str, Any]) -> None:
    res = c["resource"]
    bucket = res["aws_s3_bucket"]["transfer"]
    assert bucket["for_each"] == "${local.aws_buckets}"
    assert "var.aws_destination_buckets" in c["locals"]["aws_buckets"]
    assert "var.aws_source_buckets" in c["locals"]["aws_buckets"]
    every_bucket = "${aws_s3_bucket.transfer}"

    pab = res["aws_s3_bucket_public_access_block"]["transfer"]
    assert pab["for_each"] == every_bucket
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls"):
        assert pab[flag] is True, flag
    assert pab["restrict_public_buckets"] is True

    versioning = res["aws_s3_bucket_versioning"]["transfer"]
    assert versioning["for_each"] == every_bucket
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"

    sse = res["aws_s3_bucket_server_side_encryption_configuration"]["transfer"]
    assert sse["for_each"] == every_bucket
    algo = sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    assert algo == "${var.s3_sse_algorithm}"
    assert c["variable"]["s3_sse_algorithm"]["default"] in ("aws:kms", "AES256")

    lifecycle = res["aws_s3_bucket_lifecycle_configuration"]["transfer"]
    assert lifecycle["for_each"] == every_bucket  # so destination buckets too
    aborts = [
        r
        for r in lifecycle["rule"]
        if r.get("status") == "Enabled" and r.get("abort_incomplete_multipart_upload")
    ]
    assert len(aborts) == 1, lifecycle["rule"]
    assert aborts[0]["abort_incomplete_multipart_upload"][0]["days_after_initiation"] == 1
    assert aborts[0].get("filter") == [{}], "the abort rule must apply to every key"

    policy = res["aws_s3_bucket_policy"]["transfer"]
    assert policy["for_each"] == every_bucket
    (tls,) = c["data"]["aws_iam_policy_document"]["bucket_tls_only"]["statement"]
    assert tls["effect"] == "Deny"
    assert _conditions(tls) == {"aws:SecureTransport": ("Bool", ["false"])}


def check_gcp_roles(c: dict[str, Any]) -> None:
    roles = c["resource"]["google_project_iam_custom_role"]
    assert {name: r["permissions"] for name, r in roles.items()} == EXPECTED_GCP_ROLES
    # Bound on the buckets, never on the project.
    for kind in (
        "google_project_iam_member",
        "google_project_iam_binding",
        "google_project_iam_policy",
    ):
        assert not c["resource"].get(kind), kind
    (binding,) = c["resource"]["google_storage_bucket_iam_member"].values()
    assert binding["for_each"] == "${local.gcs_buckets}"
    assert binding["member"] == "${google_service_account.worker.member}"
    assert "google_project_iam_custom_role.source.id" in binding["role"]
    assert "google_project_iam_custom_role.destination.id" in binding["role"]


def check_gcp_worker_pubsub(c: dict[str, Any]) -> None:
    res = c["resource"]
    worker = "${google_service_account.worker.member}"
    sub_grants = [
        b for b in res["google_pubsub_subscription_iam_member"].values() if b["member"] == worker
    ]
    topic_grants = [
        b for b in res["google_pubsub_topic_iam_member"].values() if b["member"] == worker
    ]
    assert [(b["subscription"], b["role"]) for b in sub_grants] == [
        ("${google_pubsub_subscription.events.name}", "roles/pubsub.subscriber")
    ]
    assert [(b["topic"], b["role"]) for b in topic_grants] == [
        ("${google_pubsub_topic.dead_letter.name}", "roles/pubsub.publisher")
    ]
    # Pub/Sub's service agent, needed for dead lettering.
    agent = "${local.pubsub_service_agent}"
    assert "@gcp-sa-pubsub.iam.gserviceaccount.com" in c["locals"]["pubsub_service_agent"]
    assert {
        (b["topic"], b["role"])
        for b in res["google_pubsub_topic_iam_member"].values()
        if b["member"] == agent
    } == {("${google_pubsub_topic.dead_letter.name}", "roles/pubsub.publisher")}
    assert {
        (b["subscription"], b["role"])
        for b in res["google_pubsub_subscription_iam_member"].values()
        if b["member"] == agent
    } == {("${google_pubsub_subscription.events.name}", "roles/pubsub.subscriber")}


def check_subscription(c: dict[str, Any]) -> None:
    sub = c["resource"]["google_pubsub_subscription"]["events"]
    assert sub["topic"] == "${google_pubsub_topic.events.id}"
    assert sub["ack_deadline_seconds"] == "${var.visibility_timeout_seconds}"
    (dlp,) = sub["dead_letter_policy"]
    assert dlp["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}"
    assert dlp["max_delivery_attempts"] == "${var.pubsub_max_delivery_attempts}"
    assert _int_default(c, "pubsub_max_delivery_attempts") == 5
    assert sub["retry_policy"] == [{"minimum_backoff": "10s", "maximum_backoff": "600s"}]
    inspect = c["resource"]["google_pubsub_subscription"]["dead_letter_inspect"]
    assert inspect["topic"] == "${google_pubsub_topic.dead_letter.id}"


def check_gcs_buckets(c: dict[str, Any]) -> None:
    bucket = c["resource"]["google_storage_bucket"]["transfer"]
    assert bucket["for_each"] == "${local.gcs_buckets}"
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"] == [{"enabled": True}]
    assert any(
        r["action"] == [{"type": "AbortIncompleteMultipartUpload"}]
        for r in bucket["lifecycle_rule"]
    )


def check_workload_identity(c: dict[str, Any]) -> None:
    res = c["resource"]
    aws = res["google_iam_workload_identity_pool_provider"]["aws"]
    assert aws["attribute_mapping"] == {
        "google.subject": "assertion.arn",
        "attribute.aws_role": "assertion.arn.extract('assumed-role/{role}/')",
    }
    assert aws["attribute_condition"] == "attribute.aws_role == '${aws_iam_role.worker.name}'"
    assert aws["aws"] == [{"account_id": "${data.aws_caller_identity.current.account_id}"}]
    users = {
        name: b
        for name, b in res["google_service_account_iam_member"].items()
        if b["role"] == "roles/iam.workloadIdentityUser"
    }
    assert set(users) == set(res["google_service_account_iam_member"]), "only workloadIdentityUser"
    assert users["worker_aws_role"]["member"] == (
        "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.worker.name}"
        "/attribute.aws_role/${aws_iam_role.worker.name}"
    )
    gke = users["worker_gke"]
    assert gke["count"] == "${var.enable_gke_workload_identity ? 1 : 0}"
    assert gke["member"] == (
        "serviceAccount:${var.gcp_project_id}.svc.id.goog"
        "[${var.worker_namespace}/${var.worker_service_account}]"
    )


def check_versions(c: dict[str, Any]) -> None:
    (block,) = [b for b in c["terraform"] if "required_providers" in b]
    assert block["required_version"] == ">= 1.5.0"
    (providers,) = block["required_providers"]
    assert providers == {
        "aws": {"source": "hashicorp/aws", "version": "~> 5.80"},
        "google": {"source": "hashicorp/google", "version": "~> 6.10"},
    }


def check_descriptions(c: dict[str, Any]) -> None:
    assert c["variable"] and c["output"]
    for kind in ("variable", "output"):
        for name, body in c[kind].items():
            assert str(body.get("description", "")).strip(), f"{kind} {name} has no description"


# ------------------------------------------------------------------------------------------------
# Tests: the real configuration passes ...
# ------------------------------------------------------------------------------------------------

CHECKS = [
    check_worker_policy,
    check_worker_role_has_only_that_policy,
    check_worker_trust,
    check_sqs,
    check_s3_buckets,
    check_gcp_roles,
    check_gcp_worker_pubsub,
    check_subscription,
    check_gcs_buckets,
    check_workload_identity,
    check_versions,
    check_descriptions,
]


def test_expected_files_exist() -> None:
    names = {p.name for p in TF.iterdir()}
    for name in (
        "versions.tf",
        "variables.tf",
        "outputs.tf",
        "aws.tf",
        "gcp.tf",
        "terraform.tfvars.example",
    ):
        assert name in names, name
    assert not (TF / "terraform.tfvars").exists(), "terraform.tfvars must not be committed"


def test_every_tf_file_parses() -> None:
    files = _tf_files()
    assert len(files) >= 5
    for path in files:
        with path.open(encoding="utf-8") as f:
            assert isinstance(hcl2.load(f), dict), path


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_configuration(cfg: dict[str, Any], check: Any) -> None:
    check(cfg)


def test_outputs_cover_the_deployment_steps(cfg: dict[str, Any]) -> None:
    values = {name: _expr(o["value"]) for name, o in cfg["output"].items()}
    for ref in (
        "aws_sqs_queue.events.url",
        "aws_sqs_queue.dead_letter.url",
        "aws_iam_role.worker.arn",
        "google_service_account.worker.email",
        "google_iam_workload_identity_pool_provider.aws.name",
        "google_pubsub_subscription.events.id",
        "google_pubsub_topic.dead_letter.id",
        "aws_s3_bucket.transfer",
        "google_storage_bucket.transfer",
    ):
        assert any(ref in v for v in values.values()), ref


# ------------------------------------------------------------------------------------------------
# ... and the checks catch what they are meant to catch
# ------------------------------------------------------------------------------------------------


def _statement(c: dict[str, Any], sid: str) -> dict[str, Any]:
    for st in c["data"]["aws_iam_policy_document"]["worker"]["statement"]:
        if st["sid"] == sid:
            return st
    raise KeyError(sid)


MUTATIONS = {
    "wildcard action": (
        check_worker_policy,
        lambda c: _statement(c, "SourceObjectsRead")["actions"].append("s3:Get*"),
    ),
    "s3:DeleteObject on destinations": (
        check_worker_policy,
        lambda c: _statement(c, "DestinationObjectsWrite")["actions"].append("s3:DeleteObject"),
    ),
    "SendMessage on the main queue": (
        check_worker_policy,
        lambda c: _statement(c, "QueueConsume")["actions"].append("sqs:SendMessage"),
    ),
    "missing AbortMultipartUpload": (
        check_worker_policy,
        lambda c: _statement(c, "DestinationObjectsWrite")["actions"].remove(
            "s3:AbortMultipartUpload"
        ),
    ),
    "extra managed policy": (
        check_worker_role_has_only_that_policy,
        lambda c: c["resource"].setdefault("aws_iam_role_policy_attachment", {"x": {}}),
    ),
    "trust without oaud": (
        check_worker_trust,
        lambda c: c["data"]["aws_iam_policy_document"]["worker_trust"]["statement"][0][
            "condition"
        ].pop(),
    ),
    "maxReceiveCount 4": (
        check_sqs,
        lambda c: c["variable"]["sqs_max_receive_count"].update(default=4),
    ),
    "no abort lifecycle": (
        check_s3_buckets,
        lambda c: c["resource"]["aws_s3_bucket_lifecycle_configuration"]["transfer"].update(
            rule=[]
        ),
    ),
    "extra GCS permission": (
        check_gcp_roles,
        lambda c: c["resource"]["google_project_iam_custom_role"]["source"]["permissions"].append(
            "storage.objects.delete"
        ),
    ),
    "no dead_letter_policy": (
        check_subscription,
        lambda c: c["resource"]["google_pubsub_subscription"]["events"].pop("dead_letter_policy"),
    ),
    "unpinned provider": (
        check_versions,
        lambda c: c["terraform"][0]["required_providers"][0]["aws"].update(version=">= 5.0"),
    ),
    "variable without description": (
        check_descriptions,
        lambda c: c["variable"]["aws_region"].pop("description"),
    ),
    "open workload identity provider": (
        check_workload_identity,
        lambda c: c["resource"]["google_iam_workload_identity_pool_provider"]["aws"].pop(
            "attribute_condition"
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checks_fail_on_mutated_configuration(cfg: dict[str, Any], name: str) -> None:
    check, mutate = MUTATIONS[name]
    check(cfg)  # the real configuration passes ...
    mutated = copy.deepcopy(cfg)
    mutate(mutated)
    with pytest.raises((AssertionError, KeyError)):  # ... and the mutated one does not
        check(mutated)


# ------------------------------------------------------------------------------------------------
# Formatting, suppressions and the CI script
# ------------------------------------------------------------------------------------------------


def test_every_checkov_suppression_has_a_reason() -> None:
    pattern = re.compile(r"#\s*checkov:skip=(CKV2?_[A-Z0-9]+_\d+)(?::(.*))?")
    found = 0
    for path in TF.rglob("*.tf"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in pattern.finditer(line):
                found += 1
                reason = (m.group(2) or "").strip()
                assert len(reason) >= 20, f"{path.name}:{lineno}: {m.group(1)} without a reason"
    assert found, "expected the documented suppressions"


def test_check_script() -> None:
    text = CHECK_SCRIPT.read_text(encoding="utf-8")
    assert CHECK_SCRIPT.stat().st_mode & stat.S_IXUSR, "must be executable"
    assert "set -euo pipefail" in text
    assert "fmt -check -recursive terraform" in text
    assert re.search(
        r"checkov\S*\"? -d terraform --framework terraform .*--skip-download", text, re.I
    )
    assert "--soft-fail" not in text and "--skip-check" not in text


def test_terraform_fmt() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        if IN_CI:
            pytest.fail("terraform is not on PATH")
        pytest.skip("terraform is not on PATH")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TF)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
