"""Validate custom resources (KEDA, Prometheus operator) against their vendored CRD schemas.

kubernetes-validate knows the core kinds only; this covers the rest, offline, with jsonschema
against each CRD's openAPIV3Schema (deploy/schemas/, provenance in its README). Validation is
strict like `kubectl apply --validate=strict`: an object schema that lists properties and allows
no others (no additionalProperties, no x-kubernetes-preserve-unknown-fields) rejects unknown
fields, where the API server would silently prune them; so a misspelt field fails here.

Usage: python deploy/validate_crds.py RENDERED.yaml [...]   (or '-' for stdin)
Exit status 1 if a custom resource is invalid or its kind has no vendored schema.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
# API groups whose kinds kubernetes-validate checks itself.
CORE_GROUPS = {
    "",
    "apps",
    "policy",
    "networking.k8s.io",
    "batch",
    "rbac.authorization.k8s.io",
    "autoscaling",
}


def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema in which unlisted object properties are errors."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, from every CRD YAML in schema_dir."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(schema_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def documents(paths: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in paths:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        for doc in yaml.safe_load_all(text):
            if doc:
                yield name, doc


def is_core(api_version: str) -> bool:
    group = api_version.rpartition("/")[0] if "/" in api_version else ""
    return group in CORE_GROUPS


def validate(
    docs: Iterable[tuple[str, dict[str, Any]]], schemas: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    """Error messages for invalid custom resources; [] when all are valid."""
    errors: list[str] = []
    for source, doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = f"{source}: {kind}/{doc.get('metadata', {}).get('name', '?')}"
        if is_core(api_version):
            continue
        schema = schemas.get((api_version, kind))
        if schema is None:
            errors.append(f"{name}: no vendored CRD schema for {api_version} {kind}")
            continue
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = "/".join(str(part) for part in error.path)
            errors.append(f"{name}: {path}: {error.message}")
    return errors


def main(argv: list[str]) -> int:
    docs = list(documents(argv or ["-"]))
    errors = validate(docs, load_schemas())
    for line in errors:
        print(f"ERROR {line}")
    checked = sum(1 for _, d in docs if not is_core(d.get("apiVersion", "")))
    print(f"validate_crds: {checked} custom resources checked, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
