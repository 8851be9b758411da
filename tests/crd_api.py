"""Shared by the CRD tests: reading YAML the way kubectl does, and a JSON-Schema validator standing in for the API
server, plus the operator's own checks and the base manifest both accept.

The stand-in models what the apiserver does with the CRD's structural schema: type, enum, bound, pattern and
required checks (jsonschema), dropping nulls, pruning undeclared fields, and list-maps
(``x-kubernetes-list-type: map``: two items with the same keys are a "Duplicate value"). It does not evaluate the
CEL rules (``x-kubernetes-validations``: the run name, the fields fixed once a run has started); those are checked
against the real apiserver only (tests/test_crd_apiserver.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagerun.core.spec import kubernetes_problems, resolve_run, validate_manifest
from stagerun.operator import crd

ROOT = Path(__file__).resolve().parents[1]


# -- reading manifests the way kubectl does -------------------------------------------------------------------------
class KubectlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, plus the floats YAML 1.2 (and kubectl's go-yaml) reads that YAML 1.1 does not:
    an exponent without a dot (``3e-4``, ``1e9``) or without a sign (``1.5e3``)."""


KubectlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_kubectl(text: str) -> Any:
    return yaml.load(text, Loader=KubectlLoader)


# -- the API server, stood in for by jsonschema ---------------------------------------------------------------------
def to_json_schema(node: dict) -> dict:
    """Draft 7 JSON Schema for a structural schema node: int-or-string becomes anyOf integer/string, OpenAPI 3.0's
    boolean exclusiveMinimum becomes Draft 7's numeric one, x-kubernetes-* extensions are dropped (unknown fields
    are allowed by JSON Schema; pruning is modelled separately by ``pruned_fields``)."""
    out = {
        k: v
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k not in ("properties", "items", "additionalProperties")
    }
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if "properties" in node:
        out["properties"] = {name: to_json_schema(child) for name, child in node["properties"].items()}
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if "additionalProperties" in node:
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    return out


def drop_nulls(value: Any) -> Any:
    """The API server prunes null values of fields that are not nullable before it validates."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def pruned_fields(schema: dict, value: Any, path: str = "") -> list[str]:
    """The fields the API server would prune (or, with strict field validation, reject as unknown)."""
    out: list[str] = []
    if isinstance(value, dict) and schema.get("type") == "object":  # a type mismatch is a validation error instead
        properties = schema.get("properties", {})
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else key
            if not path and key == "metadata":  # ObjectMeta: the API server's own rules, not the CRD's
                continue
            if key in properties:
                out += pruned_fields(properties[key], child, child_path)
            elif isinstance(schema.get("additionalProperties"), dict):
                out += pruned_fields(schema["additionalProperties"], child, child_path)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            out += pruned_fields(schema["items"], child, f"{path}[{i}]")
    return out


def list_map_duplicates(schema: dict, value: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, message) for each item of a list-map that repeats an earlier item's keys, as the apiserver says it."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict) and schema.get("type") == "object":
        properties = schema.get("properties", {})
        for key, child in value.items():
            child_schema = properties.get(key, schema.get("additionalProperties"))
            if isinstance(child_schema, dict):
                out += list_map_duplicates(child_schema, child, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        seen = []
        for i, child in enumerate(value):
            if keys and isinstance(child, dict):
                identity = {key: child.get(key) for key in keys}
                if identity in seen:
                    out.append((f"{path}[{i}]", f"Duplicate value: {identity}"))
                seen.append(identity)
            out += list_map_duplicates(schema["items"], child, f"{path}[{i}]")
    return out


def _path_text(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def make_api_server():
    """The validator of the CRD's schema as ``errors(manifest) -> [(path, message)]``, with ``errors.pruned``."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = crd.openapi_schema()
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    validator.check_schema(validator.schema)

    def errors(manifest: dict) -> list[tuple[str, str]]:
        value = drop_nulls(manifest)
        found = [(_path_text(e.absolute_path), e.message) for e in validator.iter_errors(value)]
        return found + list_map_duplicates(schema, value)

    errors.pruned = lambda manifest: pruned_fields(schema, drop_nulls(manifest))  # type: ignore[attr-defined]
    return errors


def operator_problems(manifest: dict) -> list:
    """What the operator reports for a stored TrainingRun: the spec checks of `stagerun run`, then Kubernetes's."""
    problems = validate_manifest(manifest)
    if problems:
        return problems
    return kubernetes_problems(resolve_run(manifest).manifest)


def base_manifest() -> dict:
    """examples/quickstart.yaml made ready for Kubernetes: both layers accept it."""
    manifest = load_kubectl((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"]["image"] = "ghcr.io/example/stagerun:0.1"
    manifest["spec"]["checkpoint"]["path"] = "s3://bucket/runs/quickstart"
    return manifest
