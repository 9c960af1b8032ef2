"""Deployment, monitoring and ops-profile consistency checks.

One fact, one place, and a test wherever it is repeated: ops_profile.json states the operational
numbers; these tests hold the worker's Config defaults, the Kubernetes manifests (rendered with
kustomize), the KEDA objects, the Prometheus rules and the Grafana dashboard to them.

External tools (kubectl or kustomize, promtool, kubernetes-validate) are skipped with a reason
when missing locally and fail the run under CI=true.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = ROOT / "monitoring"
RULES_FILE = MONITORING / "prometheus-rules.yaml"
DASHBOARD_FILE = MONITORING / "grafana-dashboard.json"
PROFILE = json.loads((ROOT / "ops_profile.json").read_text(encoding="utf-8"))
TARGETS = ["base", "overlays/aws", "overlays/gcp"]
OVERLAYS = ["overlays/aws", "overlays/gcp"]
IN_CI = os.environ.get("CI", "").lower() == "true"

sys.path.insert(0, str(DEPLOY))
import render_prometheusrule  # noqa: E402
import validate_crds  # noqa: E402

# Metric names as the worker exposes them (interface contract), plus the series Prometheus
# itself adds for a histogram and for a scrape target.
CONTRACT_COUNTERS = {
    "transfer_success_total",
    "transfer_failure_total",
    "transfer_skipped_total",
    "transfer_bytes_total",
    "retry_count_total",
    "transfer_verified_total",
}
CONTRACT_HISTOGRAMS = {"transfer_duration_seconds", "queue_lag_seconds", "event_age_seconds"}
CONTRACT_GAUGES = {"transfers_in_flight", "worker_ready"}
EXPOSED = (
    CONTRACT_COUNTERS
    | CONTRACT_GAUGES
    | {f"{h}_{s}" for h in CONTRACT_HISTOGRAMS for s in ("bucket", "count", "sum")}
    | {"up"}
)
CONTRACT_DLQ_REASONS = {
    "invalid_event",
    "invalid_key",
    "forbidden",
    "source_not_found",
    "access_denied",
    "checksum_mismatch",
    "destination_error",
    "retries_exhausted",
    "message_too_large",
    "unverifiable",
}


# --------------------------------------------------------------------------- helpers


def need(tool: str) -> str:
    """Path of an external tool; skip (locally) or fail (CI=true) when it is missing."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found on PATH"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return [need("kubectl"), "kustomize"]


@functools.cache
def _render(target: str) -> str:
    result = subprocess.run(
        [*kustomize_command(), str(K8S / target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(target: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(target)) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (worker,) = [c for c in pod["containers"] if c["name"] == PROFILE["kubernetes"]["container"]]
    return worker


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alert(name: str) -> dict[str, Any]:
    (found,) = [r for r in rules() if r.get("alert") == name]
    return found


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so promtool can parse it."""
    return expr.replace("$__rate_interval", "5m").replace("${__rate_interval}", "5m")


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.groups()
        if not call and name not in _KEYWORDS:
            names.add(name)
    return names


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhdw])", duration))


# --------------------------------------------------------------------------- ops profile


def test_ops_profile_matches_its_schema() -> None:
    schema = json.loads((ROOT / "ops_profile.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(PROFILE)


def test_ops_profile_schema_rejects_nonsense() -> None:
    schema = json.loads((ROOT / "ops_profile.schema.json").read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(PROFILE))
    broken["worker"]["part_size_bytes"] = 1024  # below the 5 MiB multipart minimum
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)


def test_ops_profile_is_self_consistent() -> None:
    retry, timeouts = PROFILE["retry"], PROFILE["timeouts"]
    sequence = [
        min(
            retry["backoff_initial_seconds"] * retry["backoff_multiplier"] ** i,
            retry["backoff_max_seconds"],
        )
        for i in range(retry["max_retries"])
    ]
    assert sequence == retry["backoff_sequence_seconds"]
    # The pod must outlive the drain; the message lease must outlive the extension period.
    assert timeouts["termination_grace_period_seconds"] > timeouts["drain_timeout_seconds"]
    assert timeouts["visibility_extend_every_seconds"] * 3 == timeouts["visibility_timeout_seconds"]
    for slo in PROFILE["slos"].values():
        assert slo["error_budget"] == pytest.approx(1 - slo["objective"])
    assert set(PROFILE["dead_letter"]["reasons"]) == CONTRACT_DLQ_REASONS
    # The worker dead-letters with a reason after max_retries + 1 attempts; the queue's own redrive
    # (maxReceiveCount / max_delivery_attempts) is the backstop for crashes and must come later.
    attempts = retry["max_retries"] + 1
    assert PROFILE["dead_letter"]["sqs_redrive_max_receive_count"] > attempts
    assert PROFILE["dead_letter"]["pubsub_max_delivery_attempts"] > attempts
    metrics = PROFILE["metrics"]
    assert set(metrics["counters"]) == CONTRACT_COUNTERS
    assert set(metrics["histograms"]) == CONTRACT_HISTOGRAMS
    assert set(metrics["gauges"]) == CONTRACT_GAUGES
    keda = PROFILE["scaling"]["keda"]
    assert keda["min_replicas"] == PROFILE["kubernetes"]["replicas"] <= keda["max_replicas"]


def test_ops_profile_matches_worker_defaults() -> None:
    try:
        import transfer_worker
    except ImportError as exc:  # the module is written in parallel; CI must have it
        if IN_CI:
            raise
        pytest.skip(f"transfer_worker not importable yet: {exc}")
    config = transfer_worker.Config()
    worker, retry, timeouts = PROFILE["worker"], PROFILE["retry"], PROFILE["timeouts"]
    assert config.concurrency == worker["concurrency"]
    assert config.part_size == worker["part_size_bytes"]
    assert config.http_port == worker["http_port"]
    assert config.max_retries == retry["max_retries"]
    assert config.backoff_initial == retry["backoff_initial_seconds"]
    assert config.backoff_max == retry["backoff_max_seconds"]
    assert config.visibility_timeout == timeouts["visibility_timeout_seconds"]
    assert config.drain_timeout == timeouts["drain_timeout_seconds"]


# --------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("target", TARGETS)
def test_deployment_matches_profile(target: str) -> None:
    docs = rendered(target)
    k8s, timeouts = PROFILE["kubernetes"], PROFILE["timeouts"]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    worker = container(docs)
    assert deployment["metadata"]["name"] == k8s["deployment"]
    assert deployment["metadata"]["namespace"] == k8s["namespace"]
    assert deployment["spec"]["replicas"] == k8s["replicas"]
    assert pod["serviceAccountName"] == k8s["service_account"]
    assert pod["terminationGracePeriodSeconds"] == timeouts["termination_grace_period_seconds"]
    assert worker["resources"]["requests"]["memory"] == k8s["resources"]["requests"]["memory"]
    assert worker["resources"]["requests"]["cpu"] == k8s["resources"]["requests"]["cpu"]
    assert worker["resources"]["limits"]["memory"] == k8s["resources"]["limits"]["memory"]
    assert worker["resources"]["limits"]["cpu"] == k8s["resources"]["limits"]["cpu"]
    probes = k8s["probes"]
    (port,) = [p for p in worker["ports"] if p["name"] == probes["port_name"]]
    assert port["containerPort"] == probes["port"] == PROFILE["worker"]["http_port"]
    for probe, path in (
        ("livenessProbe", "liveness_path"),
        ("readinessProbe", "readiness_path"),
        ("startupProbe", "startup_path"),
    ):
        assert worker[probe]["httpGet"]["path"] == probes[path]
        assert worker[probe]["httpGet"]["port"] in (probes["port_name"], probes["port"])
    # Hardening the container contract promises (UID 1001, read-only root, /tmp + simulator).
    assert pod["securityContext"]["runAsUser"] == k8s["run_as_user"]
    assert pod["securityContext"]["runAsGroup"] == k8s["run_as_group"]
    assert pod["securityContext"]["fsGroup"] == k8s["run_as_group"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    context = worker["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/app/storage_simulator"):
        assert "emptyDir" in volumes[mounts[path]]
    assert pod["automountServiceAccountToken"] is False
    assert "lifecycle" not in worker  # SIGTERM drain, not a preStop hook
    assert ":" in worker["image"] and not worker["image"].endswith(":latest")


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_matches_profile(target: str) -> None:
    docs = rendered(target)
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "transfer-worker-config"
    ]
    data = config["data"]
    worker, retry, timeouts = PROFILE["worker"], PROFILE["retry"], PROFILE["timeouts"]
    assert data["TRANSFER_WORKER_STORAGE"] == "cloud"
    assert int(data["TRANSFER_WORKER_CONCURRENCY"]) == worker["concurrency"]
    assert int(data["TRANSFER_WORKER_PART_SIZE"]) == worker["part_size_bytes"]
    assert int(data["TRANSFER_WORKER_HTTP_PORT"]) == worker["http_port"]
    assert int(data["TRANSFER_WORKER_MAX_RETRIES"]) == retry["max_retries"]
    assert int(data["TRANSFER_WORKER_VISIBILITY_TIMEOUT"]) == timeouts["visibility_timeout_seconds"]
    assert int(data["TRANSFER_WORKER_DRAIN_TIMEOUT"]) == timeouts["drain_timeout_seconds"]
    if target != "base":
        assert not any("PLACEHOLDER" in value for value in data.values()), data
    env_from = [e["configMapRef"]["name"] for e in container(docs)["envFrom"]]
    assert env_from == ["transfer-worker-config"]


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_the_pods(target: str) -> None:
    docs = rendered(target)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    deployment = one(docs, "Deployment")
    assert selects(deployment["spec"]["selector"]["matchLabels"])
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert (
        pdb["spec"]["maxUnavailable"]
        == PROFILE["kubernetes"]["pod_disruption_budget"]["max_unavailable"]
    )
    assert selects(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    monitor = one(docs, "PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"])
    ports = {p["name"] for p in container(docs)["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    # The rules select job="transfer-worker", which the PodMonitor's jobLabel produces.
    assert pod_labels[monitor["spec"]["jobLabel"]] == "transfer-worker"


@pytest.mark.parametrize("target", TARGETS)
def test_service_account_identity(target: str) -> None:
    account = one(rendered(target), "ServiceAccount")
    assert account["metadata"]["name"] == PROFILE["kubernetes"]["service_account"]
    annotations = account["metadata"]["annotations"]
    expected = {
        "base": {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"},
        "overlays/aws": {"eks.amazonaws.com/role-arn"},
        "overlays/gcp": {"iam.gke.io/gcp-service-account"},
    }[target]
    cloud = {
        k
        for k in annotations
        if k in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")
    }
    assert cloud == expected
    if target != "base":
        assert not any("PLACEHOLDER" in value for value in annotations.values())


def test_aws_overlay_mounts_gcp_external_account() -> None:
    docs = rendered("overlays/aws")
    worker = container(docs)
    env = {e["name"]: e.get("value") for e in worker["env"]}
    credentials = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = volumes[mounts[str(credentials.parent)]]
    (config_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_volume["configMap"]["name"]
    ]
    external = json.loads(config_map["data"][credentials.name])
    assert external["type"] == "external_account"
    token_file = Path(external["credential_source"]["file"])
    token_volume = volumes[mounts[str(token_file.parent)]]
    (source,) = token_volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == token_file.name
    # The token's audience is the pool provider the external_account config exchanges it at.
    assert token["audience"] == "https:" + external["audience"]


def test_gcp_overlay_sets_aws_role() -> None:
    docs = rendered("overlays/gcp")
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["TRANSFER_WORKER_AWS_ROLE_ARN"].startswith("arn:aws:iam::")
    assert config["data"]["TRANSFER_WORKER_QUEUE"].startswith("projects/")


@pytest.mark.parametrize("target", OVERLAYS)
def test_keda_matches_profile(target: str) -> None:
    docs = rendered(target)
    keda = PROFILE["scaling"]["keda"]
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] == keda["min_replicas"]
    assert spec["maxReplicaCount"] == keda["max_replicas"]
    assert spec["pollingInterval"] == keda["polling_interval_seconds"]
    assert spec["cooldownPeriod"] == keda["cooldown_period_seconds"]
    assert spec["fallback"]["replicas"] == keda["fallback_replicas"]
    (trigger,) = spec["triggers"]
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    config = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "transfer-worker-config"
    )
    if target == "overlays/aws":
        assert trigger["type"] == "aws-sqs-queue"
        assert int(trigger["metadata"]["queueLength"]) == keda["sqs_queue_length_target"]
        assert trigger["metadata"]["queueURL"] == config["data"]["TRANSFER_WORKER_QUEUE"]
        assert auth["spec"]["podIdentity"]["provider"] == "aws"
        # The worker's IAM role trusts web identities only (terraform/aws.tf): KEDA must read
        # the queue depth with its own role, not by assuming the workload's.
        assert auth["spec"]["podIdentity"]["identityOwner"] == "keda"
    else:
        assert trigger["type"] == "gcp-pubsub"
        assert trigger["metadata"]["mode"] == "SubscriptionSize"
        assert int(trigger["metadata"]["value"]) == keda["pubsub_subscription_size_target"]
        assert trigger["metadata"]["subscriptionName"] == config["data"]["TRANSFER_WORKER_QUEUE"]
        assert auth["spec"]["podIdentity"]["provider"] == "gcp"


def test_base_has_no_autoscaler() -> None:
    # Two ScaledObjects on one Deployment would fight; each overlay brings exactly one.
    assert not [d for d in rendered("base") if d["kind"] == "ScaledObject"]


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_match_vendored_crds(target: str) -> None:
    docs = [(target, doc) for doc in rendered(target)]
    errors = validate_crds.validate(docs, validate_crds.load_schemas())
    assert errors == []
    kinds = {doc["kind"] for _, doc in docs}
    assert {"PodMonitor", "PrometheusRule"} <= kinds


def test_crd_validation_catches_mistakes() -> None:
    scaled = one(rendered("overlays/aws"), "ScaledObject")
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = 3  # misspelt field: the API server would silently prune it
    broken["spec"]["triggers"][0]["metadata"]["queueLength"] = 8  # must be a string
    errors = validate_crds.validate([("test", broken)], validate_crds.load_schemas())
    assert len(errors) == 2, errors


@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_validate(target: str, tmp_path: Path) -> None:
    tool = need("kubernetes-validate")
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(_render(target), encoding="utf-8")
    result = subprocess.run(
        [tool, "--strict", "--quiet", "--no-warn", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- monitoring


def test_prometheusrule_embeds_monitoring_rules() -> None:
    resource = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert resource["spec"]["groups"] == rule_groups(), (
        "deploy/k8s/base/prometheusrule.yaml differs from monitoring/prometheus-rules.yaml: "
        "run python deploy/render_prometheusrule.py"
    )
    current = (K8S / "base" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert current == render_prometheusrule.render()


def test_rules_agree_with_profile() -> None:
    for name, spec in PROFILE["alerts"].items():
        rule = alert(name)
        assert rule["labels"]["severity"] == spec["severity"], name
        if "for" in spec:
            assert rule.get("for") == spec["for"], name
        if "threshold" in spec:
            threshold = re.escape(f"{spec['threshold']:g}")
            assert re.search(rf"(>|==)\s*{threshold}\b", rule["expr"]), (name, rule["expr"])
        if "window" in spec:
            assert f"[{spec['window']}]" in rule["expr"], name
    assert {r["alert"] for r in rules() if "alert" in r} == set(PROFILE["alerts"])


@pytest.mark.parametrize(
    "slo,alerts",
    [
        ("success_rate", ("TransferSuccessBudgetBurn", "TransferSuccessBudgetBurnSlow")),
        ("latency", ("TransferLatencyBudgetBurn", "TransferLatencyBudgetBurnSlow")),
    ],
)
def test_burn_rate_alerts_follow_profile(slo: str, alerts: tuple[str, str]) -> None:
    prefix = PROFILE["slos"][slo]["recording_rule_prefix"]
    budget = f"{PROFILE['slos'][slo]['error_budget']:g}"
    recorded = {r["record"] for r in rules() if "record" in r}
    for window in PROFILE["burn_rate_alerts"]:
        name = alerts[0] if window["severity"] == "page" else alerts[1]
        expr = " ".join(alert(name)["expr"].split())
        factor = f"{window['burn_rate']:g}"
        for key in ("long_window", "short_window"):
            series = f"{prefix}{window[key]}"
            assert series in recorded
            assert f"{series} > ({factor} * {budget})" in expr, (name, series)
    # Each window pair: the short window is 1/12 of the long one (SRE workbook).
    for window in PROFILE["burn_rate_alerts"]:
        assert seconds(window["long_window"]) == 12 * seconds(window["short_window"])


def test_latency_sli_uses_the_slo_threshold_bucket() -> None:
    threshold = f"{PROFILE['slos']['latency']['threshold_seconds']:g}"
    assert (
        threshold in PROFILE["metrics"]["histogram_buckets"]
        or float(threshold) in PROFILE["metrics"]["histogram_buckets"]
    )
    for rule in rules():
        if rule.get("record", "").startswith(PROFILE["slos"]["latency"]["recording_rule_prefix"]):
            # prometheus_client exposes le="60.0"; Prometheus 3 normalises to le="60".
            assert f'le=~"{threshold}|{threshold}.0"' in rule["expr"]


def test_metric_names_are_exposed_by_the_worker() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    exprs = [r["expr"] for r in rules()] + [as_promql(e) for e in dashboard_exprs()]
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = {name for name in used if name not in EXPOSED and name not in recorded}
    assert unknown == set()
    assert {n for n in used if ":" not in n} >= {
        "transfer_success_total",
        "transfer_failure_total",
        "transfer_skipped_total",
        "transfer_bytes_total",
        "retry_count_total",
        "transfers_in_flight",
        "worker_ready",
        "queue_lag_seconds_bucket",
        "transfer_duration_seconds_bucket",
    }


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(foo_bucket{job="x",le=~"60|60.0"}[5m]))) > 60 '
        "and on () (sum(increase(bar_total[15m])) or vector(0)) == 0 unless a:b:c offset 1h"
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total", "a:b:c"}


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    exprs = " ".join(dashboard_exprs())
    for needle in (
        "transfer_success_total",
        "histogram_quantile(0.5",
        "histogram_quantile(0.99",
        "transfer_bytes_total",
        "transfers_in_flight",
        "retry_count_total",
        "sum by (reason) (rate(transfer_failure_total",
        "queue_lag_seconds_bucket",
    ):
        assert needle in exprs, needle
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    promtool = need("promtool")
    rules_file = tmp_path / "dashboard-rules.yaml"
    records = [
        {"record": f"dashboard:expr_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(dashboard_exprs())
    ]
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}), encoding="utf-8"
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES_FILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    promtool = need("promtool")
    tests = sorted(str(p) for p in (MONITORING / "tests").glob("*.yaml"))
    assert tests
    result = subprocess.run(
        [promtool, "test", "rules", *tests],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
