"""Static checks of terraform/ (providers cannot be downloaded here, so `terraform validate`
cannot run): every .tf file is parsed with python-hcl2 and the parsed content is held to the
contract's permissions (plus the two destination reads the idempotency check needs, and opt-in
grants that default to off) and to the queue / dead-letter settings the worker relies on.

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

ROOT = Path(__file__).resolve().parent.parent
TF = ROOT / "terraform"
CHECK_SCRIPT = ROOT / ".ci" / "check-terraform"

# The contract's permissions, as (action, resource kind) pairs. Resource kinds: source_objects
# (arn:aws:s3:::SRC/*), source_buckets (arn:aws:s3:::SRC), destination_objects, destination_buckets,
# queue, dead_letter_queue.
CONTRACT_AWS = {
    ("s3:GetObject", "source_objects"),
    ("s3:PutObject", "destination_objects"),
    ("s3:AbortMultipartUpload", "destination_objects"),
    ("s3:ListMultipartUploadParts", "destination_objects"),
    ("sqs:ReceiveMessage", "queue"),
    ("sqs:DeleteMessage", "queue"),
    ("sqs:ChangeMessageVisibility", "queue"),
    ("sqs:GetQueueAttributes", "queue"),
    ("sqs:SendMessage", "dead_letter_queue"),
}
# Beyond the contract, always granted: the worker HEADs the destination before every transfer
# (idempotency by event id). HeadObject needs s3:GetObject, and s3:ListBucket for a 404 (not a
# 403) on a key that does not exist yet.
IDEMPOTENCY_AWS = {
    ("s3:GetObject", "destination_objects"),
    ("s3:ListBucket", "destination_buckets"),
}
# Beyond the contract, always granted: a shutdown hand-back re-sends the body with its counts
# (ADR.md 11), in a statement of its own, so the consuming statement never carries SendMessage.
HAND_BACK_AWS = {("sqs:SendMessage", "queue")}
# Beyond the contract, always granted: the dead-letter queue's MaximumMessageSize, so that a dead
# letter goes in the first envelope form the queue takes (ADR.md 4).
DEAD_LETTER_LIMIT_AWS = {("sqs:GetQueueAttributes", "dead_letter_queue")}
ALWAYS_AWS = CONTRACT_AWS | IDEMPOTENCY_AWS | HAND_BACK_AWS | DEAD_LETTER_LIMIT_AWS
# Beyond the contract, opt-in (variable -> pairs), every variable defaulting to false.
OPT_IN_AWS = {
    "s3_list_source_buckets": {("s3:ListBucket", "source_buckets")},
    "s3_abort_orphan_uploads": {("s3:ListBucketMultipartUploads", "destination_buckets")},
}
# Granted only when the key is named (a string variable, null by default): SSE-KMS writes.
KEY_GATED_AWS = {
    "s3_kms_key_arn": {("kms:GenerateDataKey", "kms_key"), ("kms:Decrypt", "kms_key")},
}
# The statements by sid: the contract's four, the two for the idempotency check, the hand-back.
EXPECTED_AWS_STATEMENTS = {
    "SourceObjectsRead": (["s3:GetObject"], "source_objects"),
    "DestinationObjectsWrite": (
        ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
        "destination_objects",
    ),
    "DestinationObjectsHead": (["s3:GetObject"], "destination_objects"),
    "DestinationBucketsHead": (["s3:ListBucket"], "destination_buckets"),
    "QueueConsume": (
        [
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
        ],
        "queue",
    ),
    "QueueHandBack": (["sqs:SendMessage"], "queue"),
    "DeadLetterSend": (["sqs:SendMessage"], "dead_letter_queue"),
    "DeadLetterLimit": (["sqs:GetQueueAttributes"], "dead_letter_queue"),
}
# GCS: custom roles of one permission each, and which buckets each is bound on.
EXPECTED_GCP_ROLES = {
    "reader": ["storage.objects.get"],
    "writer": ["storage.objects.create"],
    "overwriter": ["storage.objects.delete"],
}
CONTRACT_GCS = {
    ("storage.objects.get", "source"),
    ("storage.objects.create", "destination"),
}
IDEMPOTENCY_GCS = {("storage.objects.get", "destination")}
OPT_IN_GCS = {"gcs_allow_overwrite": {("storage.objects.delete", "destination")}}
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
    if resources == ["${var.s3_kms_key_arn}"]:
        return "kms_key"
    raise AssertionError(f"worker statement on unexpected resources: {text}")


def _check_statement(st: dict[str, Any]) -> tuple[list[str], str]:
    assert st.get("effect", "Allow") == "Allow", st
    assert not {"not_actions", "not_resources", "principals", "not_principals"} & set(st), st
    assert "condition" not in st, f"conditions would hide what is granted: {st}"
    actions = st["actions"]
    assert isinstance(actions, list), f"actions must be a literal list: {actions}"
    for action in actions:
        assert "*" not in action and "?" not in action, f"wildcard action {action}"
        assert action != "s3:DeleteObject", "the worker never deletes objects on S3"
    kind = _classify_aws_resources(st["resources"])
    if "sqs:SendMessage" in actions:
        assert actions == ["sqs:SendMessage"], "sqs:SendMessage goes in a statement of its own"
        assert kind in ("dead_letter_queue", "queue"), "sqs:SendMessage is for the queues only"
    return actions, kind


# Gated by a bool variable, or (a KMS key) by a string variable that is not null.
_OPT_IN = re.compile(r'\$\{var\.(\w+)(?: != null)? \? \["(\w+)"\] : \[\]\}')


def worker_aws_grants(
    c: dict[str, Any], enabled: frozenset[str] = frozenset()
) -> set[tuple[str, str]]:
    """(action, resource kind) pairs the worker's policy grants with the opt-in variables in
    ``enabled`` set to true and the others false."""
    doc = c["data"]["aws_iam_policy_document"]["worker"]
    grants = set()
    for st in doc["statement"]:
        actions, kind = _check_statement(st)
        grants |= {(a, kind) for a in actions}
    for dyn in doc.get("dynamic", []):
        block = dyn["statement"]
        m = _OPT_IN.fullmatch(block["for_each"])
        assert m, f"a dynamic statement must be gated by one bool variable: {block['for_each']}"
        (content,) = block["content"]
        assert content["sid"] == "${statement.value}"
        if m.group(1) in enabled:
            actions, kind = _check_statement(content)
            grants |= {(a, kind) for a in actions}
    return grants


def check_worker_policy(c: dict[str, Any]) -> None:
    doc = c["data"]["aws_iam_policy_document"]["worker"]
    static = {}
    for st in doc["statement"]:
        assert st["sid"] not in static, st["sid"]
        static[st["sid"]] = _check_statement(st)
    assert static == EXPECTED_AWS_STATEMENTS
    # With the defaults: exactly the contract plus the idempotency reads.
    for var in OPT_IN_AWS:
        assert c["variable"][var]["type"] == "bool", var
        assert c["variable"][var]["default"] is False, f"{var} must default to false"
    assert worker_aws_grants(c) == ALWAYS_AWS
    # Each opt-in adds exactly its own pairs, and nothing else is reachable.
    matches = [_OPT_IN.fullmatch(d["statement"]["for_each"]) for d in doc.get("dynamic", [])]
    gated = {m.group(1) for m in matches if m}
    assert gated == set(OPT_IN_AWS) | set(KEY_GATED_AWS)
    for var in KEY_GATED_AWS:
        assert c["variable"][var]["type"] == "string", var
        assert c["variable"][var]["default"] is None, f"{var} must default to null"
    gates = {**OPT_IN_AWS, **KEY_GATED_AWS}
    for var, pairs in gates.items():
        assert worker_aws_grants(c, frozenset({var})) == ALWAYS_AWS | pairs
    every = set().union(*gates.values())
    assert worker_aws_grants(c, frozenset(gates)) == ALWAYS_AWS | every


def check_gcs_kms_grant(c: dict[str, Any]) -> None:
    """CMEK: the Cloud Storage service agent (not the worker) may use the named key, and only
    that key, only when one is named."""
    assert c["variable"]["gcs_kms_key_name"]["default"] is None
    grants = c["resource"]["google_kms_crypto_key_iam_member"]
    assert list(grants) == ["gcs_service_agent"]
    grant = grants["gcs_service_agent"]
    assert grant["count"] == "${var.gcs_kms_key_name == null ? 0 : 1}"
    assert grant["crypto_key_id"] == "${var.gcs_kms_key_name}"
    assert grant["role"] == "roles/cloudkms.cryptoKeyEncrypterDecrypter"
    agent = "data.google_storage_project_service_account.gcs[0].email_address"
    assert grant["member"] == f"serviceAccount:${{{agent}}}"
    for kind in ("google_kms_crypto_key_iam_binding", "google_kms_crypto_key_iam_policy"):
        assert not c["resource"].get(kind), kind


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
    days = aborts[0]["abort_incomplete_multipart_upload"][0]["days_after_initiation"]
    assert days == "${var.abort_incomplete_multipart_upload_days}"
    assert _int_default(c, "abort_incomplete_multipart_upload_days") >= 1
    assert aborts[0].get("filter") == [{}], "the abort rule must apply to every key"

    policy = res["aws_s3_bucket_policy"]["transfer"]
    assert policy["for_each"] == every_bucket
    (tls,) = c["data"]["aws_iam_policy_document"]["bucket_tls_only"]["statement"]
    assert tls["effect"] == "Deny"
    assert _conditions(tls) == {"aws:SecureTransport": ("Bool", ["false"])}


# for_each of a bucket binding -> the kinds of bucket it binds on, given the opt-in variables.
def _gcs_binding_kinds(for_each: str, enabled: frozenset[str]) -> set[str]:
    if for_each == "${local.gcs_buckets}":
        return {"source", "destination"}
    if for_each == "${toset(var.gcs_destination_buckets)}":
        return {"destination"}
    if for_each == "${toset(var.gcs_source_buckets)}":
        return {"source"}
    m = re.fullmatch(
        r"\$\{var\.(\w+) \? toset\(var\.gcs_destination_buckets\) : toset\(\[\]\)\}", for_each
    )
    assert m, f"unexpected for_each on a bucket binding: {for_each}"
    return {"destination"} if m.group(1) in enabled else set()


def worker_gcs_grants(
    c: dict[str, Any], enabled: frozenset[str] = frozenset()
) -> set[tuple[str, str]]:
    """(permission, bucket kind) pairs the worker's service account holds on GCS."""
    roles = c["resource"]["google_project_iam_custom_role"]
    grants = set()
    for name, binding in c["resource"]["google_storage_bucket_iam_member"].items():
        assert binding["member"] == "${google_service_account.worker.member}", name
        m = re.fullmatch(
            r"\$\{google_project_iam_custom_role\.(\w+)(?:\[0\])?\.id\}", binding["role"]
        )
        assert m, f"bucket binding {name} must use one of the custom roles: {binding['role']}"
        kinds = _gcs_binding_kinds(binding["for_each"], enabled)
        grants |= {(perm, kind) for perm in roles[m.group(1)]["permissions"] for kind in kinds}
    return grants


def check_gcp_roles(c: dict[str, Any]) -> None:
    roles = c["resource"]["google_project_iam_custom_role"]
    assert {name: r["permissions"] for name, r in roles.items()} == EXPECTED_GCP_ROLES
    assert roles["overwriter"]["count"] == "${var.gcs_allow_overwrite ? 1 : 0}"
    # Bound on the buckets, never on the project.
    for kind in (
        "google_project_iam_member",
        "google_project_iam_binding",
        "google_project_iam_policy",
        "google_storage_bucket_iam_binding",
        "google_storage_bucket_iam_policy",
    ):
        assert not c["resource"].get(kind), kind
    for var in OPT_IN_GCS:
        assert c["variable"][var]["type"] == "bool", var
        assert c["variable"][var]["default"] is False, f"{var} must default to false"
    assert worker_gcs_grants(c) == CONTRACT_GCS | IDEMPOTENCY_GCS
    every = set().union(*OPT_IN_GCS.values())
    assert worker_gcs_grants(c, frozenset(OPT_IN_GCS)) == CONTRACT_GCS | IDEMPOTENCY_GCS | every


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
    (abort,) = [
        r
        for r in bucket["lifecycle_rule"]
        if r["action"] == [{"type": "AbortIncompleteMultipartUpload"}]
    ]
    assert abort["condition"] == [{"age": "${var.abort_incomplete_multipart_upload_days}"}]


def check_workload_identity(c: dict[str, Any]) -> None:
    res = c["resource"]
    aws = res["google_iam_workload_identity_pool_provider"]["aws"]
    assert aws["attribute_mapping"] == {
        "google.subject": "assertion.arn",
        "attribute.aws_role": "assertion.arn.extract('assumed-role/{role}/')",
    }
    assert aws["attribute_condition"] == (
        "assertion.arn.startsWith('${local.worker_assumed_role_arn_prefix}')"
    )
    assert c["locals"]["worker_assumed_role_arn_prefix"] == (
        "arn:${data.aws_partition.current.partition}:sts::"
        "${data.aws_caller_identity.current.account_id}:assumed-role/${aws_iam_role.worker.name}/"
    )
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
    check_gcs_kms_grant,
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
        "README.md",
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


def _kms_statement(c: dict[str, Any]) -> dict[str, Any]:
    doc = c["data"]["aws_iam_policy_document"]["worker"]
    [block] = [d["statement"] for d in doc["dynamic"] if "kms" in d["statement"]["for_each"]]
    content: dict[str, Any] = block["content"][0]
    return content


MUTATIONS = {
    "kms key always granted": (
        check_worker_policy,
        lambda c: [
            d["statement"].update(for_each='${["DestinationKmsKey"]}')
            for d in c["data"]["aws_iam_policy_document"]["worker"]["dynamic"]
            if "kms" in d["statement"]["for_each"]
        ],
    ),
    "kms on every key": (
        check_worker_policy,
        lambda c: _kms_statement(c).update(resources=["*"]),
    ),
    "kms encrypt too": (
        check_worker_policy,
        lambda c: _kms_statement(c)["actions"].append("kms:Encrypt"),
    ),
    "cmek grant without a key": (
        check_gcs_kms_grant,
        lambda c: c["resource"]["google_kms_crypto_key_iam_member"]["gcs_service_agent"].pop(
            "count"
        ),
    ),
    "cmek grant to the worker": (
        check_gcs_kms_grant,
        lambda c: c["resource"]["google_kms_crypto_key_iam_member"]["gcs_service_agent"].update(
            member="${google_service_account.worker.member}"
        ),
    ),
    "wildcard action": (
        check_worker_policy,
        lambda c: _statement(c, "SourceObjectsRead")["actions"].append("s3:Get*"),
    ),
    "extra action on sources": (
        check_worker_policy,
        lambda c: _statement(c, "SourceObjectsRead")["actions"].append("s3:GetObjectTagging"),
    ),
    "statement on every bucket": (
        check_worker_policy,
        lambda c: _statement(c, "SourceObjectsRead").update(resources=["arn:aws:s3:::*"]),
    ),
    "opt-in granted by default": (
        check_worker_policy,
        lambda c: c["variable"]["s3_abort_orphan_uploads"].update(default=True),
    ),
    "ungated dynamic statement": (
        check_worker_policy,
        lambda c: c["data"]["aws_iam_policy_document"]["worker"]["dynamic"][0]["statement"].update(
            for_each='${["SourceBucketsList"]}'
        ),
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
        lambda c: c["resource"]["google_project_iam_custom_role"]["reader"]["permissions"].append(
            "storage.objects.list"
        ),
    ),
    "GCS writer bound on sources": (
        check_gcp_roles,
        lambda c: c["resource"]["google_storage_bucket_iam_member"]["writer"].update(
            for_each="${local.gcs_buckets}"
        ),
    ),
    "GCS overwrite granted by default": (
        check_gcp_roles,
        lambda c: c["variable"]["gcs_allow_overwrite"].update(default=True),
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
    "workload identity provider on any role": (
        check_workload_identity,
        lambda c: c["resource"]["google_iam_workload_identity_pool_provider"]["aws"].update(
            attribute_condition="assertion.arn.startsWith('arn:aws:sts::')"
        ),
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
