"""A Kubernetes API served over HTTP on loopback, for tests that run the real kopf operator and the official client.

``running_api()`` starts it in a background thread (its own event loop) and yields an :class:`Api`: the URL, a
kubeconfig file, a configured ``kubernetes.client.ApiClient`` and synchronous helpers for the test (and for the
simulated kubelets in ``kubelet.py`` / ``processes.py``), which act on the store directly, bypassing HTTP.

The HTTP side is kmock's ``KubernetesScaffold`` (request parsing and recording, the reaction DSL for fault
injection, API discovery from ``.resources``) with a catch-all fallback that serves every resource URL from the
in-memory :class:`Store` below. kmock's own ``KubernetesEmulator`` is not used: its state changes are hard-wired
into its ``_handle`` (merge-patch only, no resourceVersions, conflicts, status subresource, selectors, graceful
deletion or GC), so nothing of it would remain. The Store implements the API-server semantics the operator relies on:

- resourceVersion from one cluster-wide counter; ``uid``, ``creationTimestamp``, ``generation`` (bumped when anything
  but metadata/status changes, and when deletion starts); optimistic concurrency (a PUT/patch carrying a stale
  ``metadata.resourceVersion`` -> 409 Conflict); no-op writes change nothing (no new resourceVersion, no event);
- PATCH as JSON merge patch, JSON patch (``test`` failures -> 422, which kopf relies on), strategic merge patch (for
  built-in types; merge keys for the usual lists: containers, env, volumes, conditions, ownerReferences, finalizers,
  ...), and ``apply-patch+yaml`` approximated as a merge patch that creates a missing object;
- status subresource: ``.../status`` writes change only ``status``; main-resource writes keep the stored status; a
  create drops ``status`` of types with a status subresource (pods start as ``phase: Pending``);
- list/watch with label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``), field selectors
  (any dotted path, ``=``/``!=``), ``limit``/``continue``; watches from a ``resourceVersion`` (replayed from a change
  log, 410 Gone when compacted), ``sendInitialEvents`` with the initial-events-end bookmark, ``timeoutSeconds``;
  objects entering/leaving a watch's selector arrive as ADDED/DELETED;
- finalizers (deletion sets ``deletionTimestamp``; no new finalizers while deleting; the object goes when the last
  finalizer goes); graceful pod deletion (``deletionTimestamp``/``deletionGracePeriodSeconds``; the pod stays until
  the kubelet deletes it with grace 0; unscheduled or terminal pods go at once);
- garbage collection by ownerReferences: Background (default), Foreground, Orphan. As in the real API server a
  ``batch/v1`` Job deleted *without* a propagationPolicy orphans its pods;
- defaults and validation that catch real mistakes: pod defaults (restartPolicy, grace period, termination message
  path), Job defaults (parallelism/completions 1, backoffLimit 6, selector + controller-uid/job-name labels, a
  restartPolicy of Never/OnFailure, completions for Indexed Jobs, immutable template), names (DNS subdomain/label,
  63-character label values, pod hostname/subdomain), Secret ``stringData``;
- CRDs: creating a CustomResourceDefinition registers its resource (and discovery); deleting it removes it.

Namespaces are created on first use unless ``auto_namespaces=False``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import EllipsisType
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from aiohttp.test_utils import RawTestServer

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"

JOB_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
FOREGROUND = "foregroundDeletion"
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


# -- time --------------------------------------------------------------------------------------------------------------


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(when: datetime.datetime | None = None) -> str:
    """RFC 3339 with seconds, as the API server writes them."""
    return (when or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- errors ------------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An API failure, rendered over HTTP as a ``Status`` object; the sync helpers raise it as is."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    @property
    def status(self) -> int:
        return self.code

    def body(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{rt.qualified} "{name}" not found', {"name": name, "group": rt.group, "kind": rt.plural}
    )


def invalid(rt: ResourceType, name: str, field: str, value: Any, detail: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{rt.kind} "{name}" is invalid: {field}: Invalid value: {json.dumps(value)}: {detail}',
        {"name": name, "group": rt.group, "kind": rt.kind},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# -- resource types ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset()
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    returns_deleted: bool = False  # a DELETE that removes the object answers with it (else with a Status)
    custom: bool = False  # defined by a CustomResourceDefinition

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gr(self) -> tuple[str, str]:
        """Group and resource: objects are stored per gr (every served version sees the same objects)."""
        return self.group, self.plural

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def graceful(self) -> bool:
        return self.gr == ("", "pods")


def _builtin(group, version, plural, kind, namespaced=True, status=True, short=(), returns_deleted=False):
    return ResourceType(
        group,
        version,
        plural,
        kind,
        namespaced,
        frozenset({"status"} if status else set()) | ({"log"} if plural == "pods" else set()),
        kind.lower(),
        tuple(short),
        (),
        returns_deleted,
    )


BUILTIN_TYPES = (
    _builtin("", "v1", "pods", "Pod", short=("po",), returns_deleted=True),
    _builtin("", "v1", "services", "Service", short=("svc",), returns_deleted=True),
    _builtin("", "v1", "configmaps", "ConfigMap", status=False, short=("cm",)),
    _builtin("", "v1", "secrets", "Secret", status=False),
    _builtin("", "v1", "events", "Event", status=False, short=("ev",)),
    _builtin("", "v1", "nodes", "Node", namespaced=False, short=("no",)),
    _builtin("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",)),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", status=False, short=("sa",), returns_deleted=True),
    _builtin("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), returns_deleted=True),
    _builtin("", "v1", "endpoints", "Endpoints", status=False, short=("ep",)),
    _builtin("batch", "v1", "jobs", "Job"),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease", status=False),
    _builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short=("crd", "crds"),
    ),
)

TRAININGRUN_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "trainingruns.stagerun.io"},
    "spec": {
        "group": "stagerun.io",
        "scope": "Namespaced",
        "names": {
            "plural": "trainingruns",
            "singular": "trainingrun",
            "kind": "TrainingRun",
            "listKind": "TrainingRunList",
            "shortNames": ["tr"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def crd_types(crd: dict) -> list[ResourceType]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group", ""), names.get("plural", ""), names.get("kind", "")
    types = []
    for version in spec.get("versions") or ([{"name": spec.get("version")}] if spec.get("version") else []):
        if not version.get("served", True):
            continue
        subresources = version.get("subresources", spec.get("subresources")) or {}
        types.append(
            ResourceType(
                group,
                version["name"],
                plural,
                kind,
                spec.get("scope", "Namespaced") == "Namespaced",
                frozenset(k for k in subresources if k in ("status", "scale")),
                names.get("singular") or kind.lower(),
                tuple(names.get("shortNames") or ()),
                tuple(names.get("categories") or ()),
                returns_deleted=True,
                custom=True,
            )
        )
    return types


# -- selectors ---------------------------------------------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[-A-Za-z0-9_.]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


class LabelSelector:
    """A label selector string (``a=b,c!=d,e in (f,g),h notin (i),j,!k``) as a predicate on a labels dict."""

    def __init__(self, text: str | None):
        self.text = text or ""
        self.requirements: list[Callable[[dict], bool]] = []
        for part in _split_top_level(self.text):
            match = _REQUIREMENT.match(part)
            if not match:
                raise bad_request(f"unable to parse requirement: {part!r} in label selector {self.text!r}")
            key, neg = match["key"], bool(match["neg"])
            if match["op"]:
                if neg:
                    raise bad_request(f"invalid label selector {self.text!r}")
                value, equal = match["value"], match["op"] != "!="
                self.requirements.append(lambda labels, k=key, v=value, eq=equal: (labels.get(k) == v) == eq)
            elif match["setop"]:
                values = {v.strip() for v in match["values"].split(",") if v.strip()}
                inside = match["setop"] == "in"
                self.requirements.append(
                    lambda labels, k=key, vs=values, inside=inside: (
                        (labels.get(k) in vs) if inside else (labels.get(k) not in vs)
                    )
                )
            else:
                self.requirements.append(lambda labels, k=key, neg=neg: (k in labels) != neg)

    def __call__(self, labels: dict | None) -> bool:
        labels = labels or {}
        return all(requirement(labels) for requirement in self.requirements)


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


class FieldSelector:
    """A field selector (``metadata.name=x,status.phase!=Running``) over any dotted path of the object."""

    def __init__(self, text: str | None):
        self.text = text or ""
        self.requirements: list[tuple[str, str, bool]] = []
        for part in _split_top_level(self.text):
            match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", part)
            if not match:
                raise bad_request(f"invalid field selector: {part!r}")
            self.requirements.append((match[1], match[3], match[2] != "!="))

    def __call__(self, obj: dict) -> bool:
        for path, value, equal in self.requirements:
            actual = get_path(obj, path)
            actual = "" if actual is None else (str(actual).lower() if isinstance(actual, bool) else str(actual))
            if (actual == value) != equal:
                return False
        return True


# -- patches -----------------------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (lists are replaced, ``null`` removes)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that strategic merge patch merges by a key (patchMergeKey) instead of replacing; "finalizers" is a set.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "ports": None,
    "taints": "key",
    "addresses": "type",
    "readinessGates": "conditionType",
}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, enough for built-in types: ``$patch: replace|delete`` directives,
    ``$deleteFromPrimitiveList/<field>``, lists merged by their usual merge keys, finalizers merged as a set."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key == "$patch" or key == "$retainKeys" or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif (
            isinstance(value, list)
            and isinstance(result.get(key), list)
            and (key in _MERGE_KEYS or key == "finalizers")
        ):
            result[key] = _merge_list(key, result[key], value)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(field: str, current: list, items: list) -> list:
    if field == "finalizers":
        return list(current) + [item for item in items if item not in current]
    if not all(isinstance(item, dict) for item in items):
        return copy.deepcopy(items)
    key = _MERGE_KEYS[field]
    if key is None:  # ports: containerPort for containers, port for services
        key = "containerPort" if all("containerPort" in item for item in items) else "port"
    if not all(key in item for item in items):
        return copy.deepcopy(items)
    result = list(current)
    for item in items:
        position = next(
            (i for i, old in enumerate(result) if isinstance(old, dict) and old.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del result[position]
        elif position is not None:
            result[position] = strategic_merge_patch(result[position], item)
        else:
            result.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer {path!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _resolve_parent(doc: Any, tokens: list[str], path: str) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request due to an error in our request: path {path!r} not found",
            )
    return doc


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test (a failed test is a 422, as kopf expects)."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise bad_request("a JSON patch must be a list of operations")

    def get(path: str) -> Any:
        tokens = _pointer(path)
        return copy.deepcopy(_resolve_parent(doc, tokens, path))

    def remove(path: str) -> Any:
        tokens = _pointer(path)
        if not tokens:
            raise ApiError(422, "Invalid", "cannot remove the whole document")
        parent = _resolve_parent(doc, tokens[:-1], path)
        last = tokens[-1]
        if isinstance(parent, dict) and last in parent:
            return parent.pop(last)
        if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            return parent.pop(int(last))
        raise ApiError(422, "Invalid", f"the server rejected our request: path {path!r} not found for removal")

    def add(path: str, value: Any, replace: bool = False) -> None:
        nonlocal doc
        tokens = _pointer(path)
        if not tokens:
            doc = value
            return
        parent = _resolve_parent(doc, tokens[:-1], path)
        last = tokens[-1]
        if isinstance(parent, dict):
            if replace and last not in parent:
                raise ApiError(422, "Invalid", f"the server rejected our request: path {path!r} not found")
            parent[last] = value
        elif isinstance(parent, list):
            if last == "-" and not replace:
                parent.append(value)
            elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
                if replace:
                    parent[int(last)] = value
                else:
                    parent.insert(int(last), value)
            else:
                raise ApiError(422, "Invalid", f"the server rejected our request: bad list index in {path!r}")
        else:
            raise ApiError(422, "Invalid", f"the server rejected our request: path {path!r} not found")

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            add(path, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "move":
            add(path, remove(op.get("from", "")))
        elif kind == "copy":
            add(path, get(op.get("from", "")))
        elif kind == "test":
            try:
                actual = get(path)
            except ApiError:
                actual = None
            if actual != op.get("value"):
                raise ApiError(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: "
                    f"test failed at {path!r}: {actual!r} != {op.get('value')!r}",
                )
        else:
            raise ApiError(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    return doc


# -- validation --------------------------------------------------------------------------------------------------------

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _check_label(name: str, value: str, max_len: int = 63) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > max_len:
        return f"must be no more than {max_len} characters"
    if not DNS_LABEL.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
            "start and end with an alphanumeric character"
        )
    return None


def _validate_labels(rt: ResourceType, name: str, labels: Any, field: str) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict):
        raise invalid(rt, name, field, labels, "must be a map")
    for key, value in labels.items():
        prefix, _, short = key.rpartition("/")
        if (
            (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)))
            or not short
            or len(short) > 63
            or not LABEL_VALUE.match(short)
        ):
            raise invalid(
                rt,
                name,
                field,
                key,
                "name part must consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character",
            )
        if not isinstance(value, str):
            raise invalid(rt, name, field, value, "label values must be strings")
        if len(value) > 63:
            raise invalid(rt, name, field, value, "must be no more than 63 characters")
        if not LABEL_VALUE.match(value):
            raise invalid(
                rt,
                name,
                field,
                value,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'",
            )


def _validate_name(rt: ResourceType, name: str) -> None:
    if rt.gr == ("", "services"):
        pattern, limit, what = DNS1035_LABEL, 63, "a DNS-1035 label"
    elif rt.gr == ("", "namespaces"):
        pattern, limit, what = DNS_LABEL, 63, "a lowercase RFC 1123 label"
    elif rt.gr == ("", "nodes"):
        pattern, limit, what = DNS_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"
    else:
        pattern, limit, what = DNS_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"
    if len(name) > limit:
        raise invalid(rt, name, "metadata.name", name, f"must be no more than {limit} characters")
    if not pattern.match(name):
        raise invalid(rt, name, "metadata.name", name, f"must be {what}")


def _spec_of(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _random_suffix(length: int = 5) -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=length))


# -- the store ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Change:
    rv: int
    gr: tuple[str, str]
    type: str
    obj: dict
    old: dict | None = None


class Watcher:
    def __init__(self, gr: tuple[str, str]):
        self.gr = gr
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()


class Store:
    """Objects in memory with the API server's semantics. Not thread-safe: every call runs on the API's event loop
    (HTTP handlers directly; :class:`Api` helpers hop onto the loop). Stored objects are never mutated in place, so
    the change log and watch events can share them; callers get deep copies."""

    def __init__(
        self,
        *,
        schedule: Callable[[float, Callable[[], None]], None],
        gc_delay: float = 0.0,
        auto_namespaces: bool = True,
        log_size: int = 100_000,
        on_types_changed: Callable[[ResourceType, bool], None] | None = None,
    ):
        self.schedule = schedule
        self.gc_delay = gc_delay
        self.auto_namespaces = auto_namespaces
        self.on_types_changed = on_types_changed
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], dict]] = collections.defaultdict(dict)
        self.rv = 0
        self.log: collections.deque[Change] = collections.deque(maxlen=log_size)
        self.compacted_rv = 0
        self.watchers: set[Watcher] = set()
        self.uids: dict[str, tuple[ResourceType, str | None, str]] = {}
        self.propagation: dict[str, str] = {}
        self.cluster_ips = 0
        self.closed = False
        for rt in BUILTIN_TYPES:
            self.register(rt)

    # types

    def register(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt
        if self.on_types_changed:
            self.on_types_changed(rt, True)

    def unregister(self, rt: ResourceType) -> None:
        self.types.pop((rt.group, rt.version, rt.plural), None)
        if self.on_types_changed:
            self.on_types_changed(rt, False)

    def resolve(self, ref: str | ResourceType) -> ResourceType:
        """A resource type by plural, kind, singular or short name, optionally qualified: ``pods``, ``Pod``,
        ``jobs.batch``, ``batch/v1/jobs``, ``v1/pods``, ``trainingruns.stagerun.io``, ``stagerun.io/v1alpha1/tr``."""
        if isinstance(ref, ResourceType):
            return ref
        group = version = None
        text = ref.strip()
        if "/" in text:
            parts = text.split("/")
            if len(parts) == 3:
                group, version, text = parts
            elif parts[0] == "v1":
                group, version, text = "", "v1", parts[1]
            else:
                group, text = parts
        elif "." in text:
            text, group = text.split(".", 1)
        lowered = text.lower()
        for rt in self.types.values():
            if group is not None and rt.group != group or version is not None and rt.version != version:
                continue
            if lowered in (rt.plural, rt.singular, rt.kind.lower()) or lowered in rt.short_names:
                return rt
        raise ApiError(404, "NotFound", f"the server doesn't have a resource type {ref!r}")

    def type_of(self, obj: dict) -> ResourceType:
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        group, _, version = api_version.rpartition("/")
        for rt in self.types.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        raise ApiError(404, "NotFound", f"no matches for kind {kind!r} in version {api_version!r}")

    # reading

    def find(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        return self.objects[rt.gr].get((namespace if rt.namespaced else None, name))

    def _must(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.find(rt, namespace, name)
        if obj is None:
            raise not_found(rt, name)
        return obj

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        return self._out(rt, self._must(rt, namespace, name))

    def select(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict]:
        """The stored objects (not copies) matching, sorted by namespace and name."""
        labels, fields = LabelSelector(label_selector), FieldSelector(field_selector)
        found = []
        for (ns, _), obj in sorted(self.objects[rt.gr].items(), key=lambda item: (item[0][0] or "", item[0][1])):
            if rt.namespaced and namespace is not None and ns != namespace:
                continue
            if labels(obj["metadata"].get("labels")) and fields(obj):
                found.append(obj)
        return found

    def list(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict:
        items = self.select(rt, namespace, label_selector, field_selector)
        start = int(continue_token) if continue_token else 0
        metadata: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if limit:
            page = items[start : start + limit]
            if start + limit < len(items):
                metadata["continue"] = str(start + limit)
                metadata["remainingItemCount"] = len(items) - start - limit
        else:
            page = items[start:]
        return {
            "apiVersion": rt.api_version,
            "kind": f"{rt.kind}List",
            "metadata": metadata,
            "items": [self._out(rt, obj) for obj in page],
        }

    @staticmethod
    def _out(rt: ResourceType, obj: dict) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rt.api_version  # served at the requested version
        return out

    def dependents(self, uid: str) -> list[tuple[ResourceType, dict]]:
        found = []
        for gr, objects in self.objects.items():
            rt = next((t for t in self.types.values() if t.gr == gr), None)
            if rt is None:
                continue
            for obj in objects.values():
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or ()):
                    found.append((rt, obj))
        return found

    # watching

    def add_watcher(self, rt: ResourceType) -> Watcher:
        watcher = Watcher(rt.gr)
        self.watchers.add(watcher)
        return watcher

    def remove_watcher(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def changes_since(self, rt: ResourceType, rv: int) -> list[Change]:
        if rv < self.compacted_rv:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.compacted_rv})")
        return [change for change in self.log if change.rv > rv and change.gr == rt.gr]

    def close(self) -> None:
        self.closed = True
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(None)

    def _emit(self, rt: ResourceType, kind: str, obj: dict, old: dict | None = None) -> None:
        change = Change(self.rv, rt.gr, kind, obj, old)
        if len(self.log) == self.log.maxlen:
            self.compacted_rv = self.log[0].rv
        self.log.append(change)
        for watcher in list(self.watchers):
            if watcher.gr == rt.gr:
                watcher.queue.put_nowait(change)

    # writing

    def _save(self, rt: ResourceType, obj: dict, kind: str, old: dict | None = None) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        self.objects[rt.gr][(meta.get("namespace"), meta["name"])] = obj
        self.uids[meta["uid"]] = (rt, meta.get("namespace"), meta["name"])
        self._emit(rt, kind, obj, old)

    def _ensure_namespace(self, namespace: str) -> None:
        ns_type = self.resolve("v1/namespaces")
        if self.find(ns_type, None, namespace) is not None:
            return
        if not self.auto_namespaces:
            raise ApiError(
                404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"}
            )
        self.create(ns_type, None, {"metadata": {"name": namespace}}, keep_status=False)

    def create(self, rt: ResourceType, namespace: str | None, body: dict, *, keep_status: bool = False) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of a create must be an object")
        obj = copy.deepcopy(body)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if rt.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            namespace = namespace or meta.get("namespace") or "default"
            self._ensure_namespace(namespace)
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        name = meta.get("name")
        if not name:
            if not meta.get("generateName"):
                raise invalid(rt, "", "metadata.name", "", "name or generateName is required")
            name = meta["generateName"] + _random_suffix()
            while self.find(rt, namespace, name) is not None:
                name = meta["generateName"] + _random_suffix()
        meta["name"] = name
        _validate_name(rt, name)
        if self.find(rt, namespace, name) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rt.qualified} "{name}" already exists',
                {"name": name, "group": rt.group, "kind": rt.plural},
            )
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = timestamp()
        meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.has_status and not keep_status:
            obj.pop("status", None)
        self._defaults(rt, obj, None)
        self._validate(rt, obj, None)
        self._save(rt, obj, "ADDED")
        if rt.gr == ("apiextensions.k8s.io", "customresourcedefinitions"):
            for crd_type in crd_types(obj):
                self.register(crd_type)
        return self._out(rt, obj)

    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        compute: Callable[[dict], Any],
        subresource: str | None = None,
    ) -> dict:
        """Write ``compute(copy of the current object)`` (a PUT body, or the patched object)."""
        if subresource not in (None, "status") or (subresource == "status" and not rt.has_status):
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({rt.qualified}/{subresource})"
            )
        current = self._must(rt, namespace, name)
        candidate = compute(copy.deepcopy(current))
        if not isinstance(candidate, dict):
            raise invalid(rt, name, "body", None, "must be an object")
        cmeta = candidate.get("metadata") if isinstance(candidate.get("metadata"), dict) else {}
        cmeta = dict(cmeta)
        meta = current["metadata"]
        wanted_rv = cmeta.get("resourceVersion")
        if wanted_rv not in (None, "") and str(wanted_rv) != meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                f"been modified; please apply your changes to the latest version and try "
                f"again",
                {"name": name, "group": rt.group, "kind": rt.plural},
            )
        if cmeta.get("uid") and cmeta["uid"] != meta["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {cmeta['uid']}, UID in object meta: {meta['uid']}",
            )
        if cmeta.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({cmeta['name']}) does not match the name on the URL ({name})")
        if subresource == "status":
            new = copy.deepcopy(current)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        else:
            new = candidate
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            for key in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ):
                if key in meta:
                    cmeta[key] = meta[key]
                else:
                    cmeta.pop(key, None)
            new["metadata"] = cmeta
            if rt.has_status:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
            if meta.get("deletionTimestamp"):
                added = set(cmeta.get("finalizers") or ()) - set(meta.get("finalizers") or ())
                if added:
                    raise ApiError(
                        422,
                        "Invalid",
                        f'{rt.kind} "{name}" is invalid: metadata.finalizers: Forbidden: '
                        f"no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers {sorted(added)}",
                    )
            if not cmeta.get("finalizers"):
                cmeta.pop("finalizers", None)
            self._defaults(rt, new, current)
            self._validate(rt, new, current)
        if new == current:
            return self._out(rt, current)
        if _spec_of(new) != _spec_of(current) and "generation" in new["metadata"]:
            new["metadata"]["generation"] = int(new["metadata"]["generation"]) + 1
        self._save(rt, new, "MODIFIED", current)
        if rt.gr == ("apiextensions.k8s.io", "customresourcedefinitions") and subresource is None:
            for crd_type in crd_types(new):
                self.register(crd_type)
        if self._should_remove(rt, new):
            return self._out(rt, self._remove(rt, new))
        return self._out(rt, new)

    def replace(
        self, rt: ResourceType, namespace: str | None, name: str, body: dict, subresource: str | None = None
    ) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of a replace must be an object")
        if rt.custom and not (body.get("metadata") or {}).get("resourceVersion"):
            raise invalid(rt, name, "metadata.resourceVersion", 0, "must be specified for an update")
        return self.update(rt, namespace, name, lambda current: copy.deepcopy(body), subresource)

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch: Any,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> dict:
        """``patch_type``: merge, json, strategic, apply (or the full content types)."""
        kind = patch_type.split(";")[0].strip().lower()
        kind = {
            "application/merge-patch+json": "merge",
            "application/json-patch+json": "json",
            "application/strategic-merge-patch+json": "strategic",
            "application/apply-patch+yaml": "apply",
            "application/json": "merge",
        }.get(kind, kind)
        if kind == "merge":
            if not isinstance(patch, dict):
                raise bad_request("a merge patch must be an object")
            return self.update(rt, namespace, name, lambda current: merge_patch(current, patch), subresource)
        if kind == "json":
            return self.update(rt, namespace, name, lambda current: json_patch(current, patch), subresource)
        if kind == "strategic":
            if rt.custom:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "strategic merge patch is not supported for custom "
                    "resources: use merge-patch+json or json-patch+json",
                )
            if not isinstance(patch, dict):
                raise bad_request("a strategic merge patch must be an object")
            return self.update(rt, namespace, name, lambda current: strategic_merge_patch(current, patch), subresource)
        if kind == "apply":  # server-side apply, approximately: a merge patch that creates what is missing
            if self.find(rt, namespace, name) is None and subresource is None:
                return self.create(
                    rt, namespace, {**patch, "metadata": {**(patch.get("metadata") or {}), "name": name}}
                )
            return self.update(rt, namespace, name, lambda current: merge_patch(current, patch), subresource)
        raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {patch_type}")

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
        preconditions: dict | None = None,
    ) -> tuple[dict, bool]:
        """Returns the object (its last state) and whether it is gone."""
        current = self._must(rt, namespace, name)
        meta = current["metadata"]
        preconditions = preconditions or {}
        if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in object meta: {meta['uid']}",
            )
        if preconditions.get("resourceVersion") and str(preconditions["resourceVersion"]) != meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: ResourceVersion in precondition: "
                f"{preconditions['resourceVersion']}, ResourceVersion in object meta: "
                f"{meta['resourceVersion']}",
            )
        policy = propagation_policy or ("Orphan" if rt.gr == ("batch", "jobs") and rt.version == "v1" else "Background")
        if policy not in ("Orphan", "Background", "Foreground"):
            raise bad_request(f"invalid propagationPolicy {policy!r}")
        uid = meta["uid"]
        self.propagation[uid] = policy
        if policy == "Orphan":
            self._orphan_dependents(uid)
        new = copy.deepcopy(current)
        nmeta = new["metadata"]
        finalizers = list(nmeta.get("finalizers") or ())
        if policy == "Foreground" and FOREGROUND not in finalizers and self.dependents(uid):
            finalizers.append(FOREGROUND)
        if finalizers:
            nmeta["finalizers"] = finalizers
        deleting = bool(meta.get("deletionTimestamp"))
        if rt.graceful:
            spec, status = new.get("spec") or {}, new.get("status") or {}
            grace = (
                grace_period_seconds
                if grace_period_seconds is not None
                else spec.get("terminationGracePeriodSeconds", 30)
            )
            grace = max(0, int(grace))
            if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
                grace = 0
            if deleting and grace >= int(meta.get("deletionGracePeriodSeconds") or 0) and new == current:
                return self._out(rt, current), False
            if not deleting or grace < int(meta.get("deletionGracePeriodSeconds") or 0):
                nmeta["deletionTimestamp"] = timestamp(utcnow() + datetime.timedelta(seconds=grace))
                nmeta["deletionGracePeriodSeconds"] = grace
        elif not deleting:
            nmeta["deletionTimestamp"] = timestamp()
            nmeta["deletionGracePeriodSeconds"] = 0
        if not deleting and "generation" in nmeta:
            nmeta["generation"] = int(nmeta["generation"]) + 1
        if self._should_remove(rt, new):
            return self._out(rt, self._remove(rt, new)), True
        if new != current:
            self._save(rt, new, "MODIFIED", current)
        if policy == "Foreground":
            self.schedule(self.gc_delay, lambda: self._delete_dependents(uid))
        return self._out(rt, new), False

    def delete_collection(
        self,
        rt: ResourceType,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        **options: Any,
    ) -> dict:
        items = []
        for obj in self.select(rt, namespace, label_selector, field_selector):
            meta = obj["metadata"]
            with contextlib.suppress(ApiError):
                items.append(self.delete(rt, meta.get("namespace"), meta["name"], **options)[0])
        return {
            "apiVersion": rt.api_version,
            "kind": f"{rt.kind}List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    @staticmethod
    def _should_remove(rt: ResourceType, obj: dict) -> bool:
        meta = obj["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("finalizers"):
            return False
        return not rt.graceful or int(meta.get("deletionGracePeriodSeconds") or 0) == 0

    def _remove(self, rt: ResourceType, obj: dict) -> dict:
        meta = obj["metadata"]
        key = (meta.get("namespace"), meta["name"])
        self.objects[rt.gr].pop(key, None)
        self.rv += 1
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(rt, "DELETED", final)
        uid = meta["uid"]
        self.uids.pop(uid, None)
        self.schedule(self.gc_delay, lambda: self._collect(uid))
        for ref in meta.get("ownerReferences") or ():
            owner_uid = ref.get("uid")
            self.schedule(self.gc_delay, lambda owner_uid=owner_uid: self._finish_foreground(owner_uid))
        if rt.gr == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._remove_crd(obj)
        if rt.gr == ("", "namespaces"):
            namespace = meta["name"]
            self.schedule(self.gc_delay, lambda: self._empty_namespace(namespace))
        return final

    def _remove_crd(self, crd: dict) -> None:
        """A CRD is gone: so are its resource (discovery) and every object of it."""
        types = crd_types(crd)
        for crd_type in types:
            self.unregister(crd_type)
        if types and not any(t.gr == types[0].gr for t in self.types.values()):
            for child in list(self.objects[types[0].gr].values()):
                self.objects[types[0].gr].pop((child["metadata"].get("namespace"), child["metadata"]["name"]), None)
                self.uids.pop(child["metadata"]["uid"], None)
                self.rv += 1
                final = copy.deepcopy(child)
                final["metadata"]["resourceVersion"] = str(self.rv)
                self._emit(types[0], "DELETED", final)

    # garbage collection

    @staticmethod
    def _set_owners(obj: dict, refs: list) -> dict:
        meta = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
        if refs:
            meta["ownerReferences"] = refs
        return {**obj, "metadata": meta}

    def _orphan_dependents(self, uid: str) -> None:
        for rt, obj in self.dependents(uid):
            meta = obj["metadata"]
            refs = [ref for ref in meta.get("ownerReferences") or () if ref.get("uid") != uid]
            with contextlib.suppress(ApiError):
                self.update(
                    rt, meta.get("namespace"), meta["name"], lambda current, refs=refs: self._set_owners(current, refs)
                )

    def _collect(self, uid: str) -> None:
        """The owner ``uid`` is gone: delete its dependents (unless orphaned or still owned by a live owner)."""
        policy = self.propagation.pop(uid, "Background")
        if self.closed:
            return
        for rt, obj in self.dependents(uid):
            meta = obj["metadata"]
            others = [ref for ref in meta.get("ownerReferences") or () if ref.get("uid") != uid]
            alive = [ref for ref in others if ref.get("uid") in self.uids]
            with contextlib.suppress(ApiError):
                if policy == "Orphan" or alive:
                    self.update(
                        rt,
                        meta.get("namespace"),
                        meta["name"],
                        lambda current, refs=others: self._set_owners(current, refs),
                    )
                elif not meta.get("deletionTimestamp"):
                    self.delete(rt, meta.get("namespace"), meta["name"], propagation_policy="Background")

    def _delete_dependents(self, uid: str) -> None:
        for rt, obj in self.dependents(uid):
            meta = obj["metadata"]
            if not meta.get("deletionTimestamp"):
                with contextlib.suppress(ApiError):
                    self.delete(rt, meta.get("namespace"), meta["name"], propagation_policy="Background")
        self._finish_foreground(uid)

    def _finish_foreground(self, uid: str | None) -> None:
        if uid not in self.uids:
            return
        rt, namespace, name = self.uids[uid]
        owner = self.find(rt, namespace, name)
        if owner is None or FOREGROUND not in (owner["metadata"].get("finalizers") or ()):
            return
        if not self.dependents(uid):
            with contextlib.suppress(ApiError):
                self.update(
                    rt,
                    namespace,
                    name,
                    lambda current: {
                        **current,
                        "metadata": {
                            **current["metadata"],
                            "finalizers": [f for f in current["metadata"].get("finalizers") or () if f != FOREGROUND],
                        },
                    },
                )

    def _empty_namespace(self, namespace: str) -> None:
        for rt in {t.gr: t for t in self.types.values() if t.namespaced}.values():
            for obj in self.select(rt, namespace):
                with contextlib.suppress(ApiError):
                    self.delete(rt, namespace, obj["metadata"]["name"], propagation_policy="Background")

    # defaults & validation per type

    def _defaults(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        gr = rt.gr
        if gr == ("", "pods"):
            _pod_spec_defaults(obj.setdefault("spec", {}))
            if old is None and not obj.get("status"):
                obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif gr == ("batch", "jobs"):
            spec = obj.setdefault("spec", {})
            if spec.get("completions") is None and spec.get("parallelism") is None:
                spec["completions"] = 1
            spec.setdefault("parallelism", 1)
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
            template = spec.setdefault("template", {})
            _pod_spec_defaults(template.setdefault("spec", {}))
            if old is None and not spec.get("manualSelector"):
                uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
                labels = template.setdefault("metadata", {}).setdefault("labels", {})
                labels.update(
                    {
                        "batch.kubernetes.io/controller-uid": uid,
                        "batch.kubernetes.io/job-name": name,
                        "controller-uid": uid,
                        "job-name": name,
                    }
                )
                spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        elif gr == ("", "services"):
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if old is None and not spec.get("clusterIP"):
                self.cluster_ips += 1
                spec["clusterIP"] = f"10.96.{self.cluster_ips // 250}.{self.cluster_ips % 250 + 1}"
            if spec.get("clusterIP"):
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or ():
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        elif gr == ("", "secrets"):
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = obj.setdefault("data", {})
                for key, value in string_data.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
        elif gr == ("", "namespaces"):
            if old is None:
                obj["status"] = {"phase": "Active"}
        elif gr == ("apiextensions.k8s.io", "customresourcedefinitions"):
            spec = obj.get("spec") or {}
            now = timestamp()
            storage = next((v["name"] for v in spec.get("versions") or () if v.get("storage")), None)
            obj["status"] = {
                "conditions": [
                    {
                        "type": "NamesAccepted",
                        "status": "True",
                        "reason": "NoConflicts",
                        "lastTransitionTime": now,
                        "message": "no conflicts found",
                    },
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "lastTransitionTime": now,
                        "message": "the initial names have been accepted",
                    },
                ],
                "acceptedNames": spec.get("names") or {},
                "storedVersions": [storage] if storage else [],
            }

    def _validate(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        meta, name = obj["metadata"], obj["metadata"]["name"]
        _validate_labels(rt, name, meta.get("labels"), "metadata.labels")
        if meta.get("annotations") is not None and not all(isinstance(v, str) for v in meta["annotations"].values()):
            raise invalid(rt, name, "metadata.annotations", meta["annotations"], "annotation values must be strings")
        gr = rt.gr
        if gr == ("", "pods"):
            _validate_pod_spec(rt, name, obj.get("spec") or {}, "spec")
        elif gr == ("batch", "jobs"):
            spec = obj.get("spec") or {}
            template = spec.get("template") or {}
            _validate_labels(rt, name, (template.get("metadata") or {}).get("labels"), "spec.template.metadata.labels")
            _validate_pod_spec(rt, name, template.get("spec") or {}, "spec.template.spec")
            policy = (template.get("spec") or {}).get("restartPolicy")
            if policy not in ("Never", "OnFailure"):
                raise ApiError(
                    422,
                    "Invalid",
                    f'Job.batch "{name}" is invalid: spec.template.spec.restartPolicy: '
                    f'Required value: valid values: "OnFailure", "Never"',
                )
            if spec.get("completionMode") == "Indexed" and spec.get("completions") is None:
                raise ApiError(
                    422,
                    "Invalid",
                    f'Job.batch "{name}" is invalid: spec.completions: Required value: when completion mode is Indexed',
                )
            if old is not None:
                ospec = old.get("spec") or {}
                for field in ("completions", "completionMode", "selector"):
                    if spec.get(field) != ospec.get(field) and not (
                        field == "completions"
                        and spec.get("completionMode") == "Indexed"
                        and spec.get(field) == spec.get("parallelism")
                    ):
                        raise ApiError(
                            422,
                            "Invalid",
                            f'Job.batch "{name}" is invalid: spec.{field}: Invalid value: field is immutable',
                        )
                if spec.get("template") != ospec.get("template") and not ospec.get("suspend"):
                    raise ApiError(
                        422,
                        "Invalid",
                        f'Job.batch "{name}" is invalid: spec.template: Invalid value: field is immutable',
                    )


def _pod_spec_defaults(spec: dict) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    for container in list(spec.get("containers") or ()) + list(spec.get("initContainers") or ()):
        if isinstance(container, dict):
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            image = str(container.get("image", ""))
            container.setdefault(
                "imagePullPolicy", "Always" if image.endswith(":latest") or ":" not in image else "IfNotPresent"
            )


def _validate_pod_spec(rt: ResourceType, name: str, spec: dict, field: str) -> None:
    containers = spec.get("containers")
    if not containers or not isinstance(containers, list):
        raise invalid(rt, name, f"{field}.containers", containers, "Required value")
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or not container.get("name"):
            raise invalid(rt, name, f"{field}.containers[{i}].name", None, "Required value")
        problem = _check_label("name", container["name"])
        if problem:
            raise invalid(rt, name, f"{field}.containers[{i}].name", container["name"], problem)
    for key in ("hostname", "subdomain"):
        if spec.get(key):
            problem = _check_label(key, spec[key])
            if problem:
                raise invalid(rt, name, f"{field}.{key}", spec[key], problem)


# -- the HTTP server ---------------------------------------------------------------------------------------------------

_WATCH_TRUE = ("true", "1", "yes")
_STATUS_KEY = (
    aiohttp.web.RequestKey("kube-emulator-status", int)
    if hasattr(aiohttp.web, "RequestKey")
    else "kube-emulator-status"
)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesScaffold):
    """kmock's Kubernetes scaffold (discovery, request log, reaction DSL) serving resources from a :class:`Store`.

    Fault injection goes through kmock's DSL, which takes precedence over the store, e.g.
    ``api.emulator['patch', kmock.resource('stagerun.io/v1alpha1/trainingruns')][:2] << 500``.
    """

    store: Any = None
    log_provider: Any = None  # callable(namespace, pod, container) -> str | None, for GET .../pods/<name>/log

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[self._is_resource_request] << self._serve_request

    @staticmethod
    def _is_resource_request(request: kmock.Request) -> bool:
        parts = request.url.path.strip("/").split("/")
        return (parts[0] == "api" and len(parts) >= 3) or (parts[0] == "apis" and len(parts) >= 4)

    def sync_resource(self, rt: ResourceType, added: bool) -> None:
        key = kmock.resource(rt.group, rt.version, rt.plural)
        if added:
            self.resources[key] = kmock.ResourceInfo(
                namespaced=rt.namespaced,
                kind=rt.kind,
                singular=rt.singular,
                verbs=set(ALL_VERBS),
                shortnames=set(rt.short_names),
                categories=set(rt.categories),
                subresources=set(rt.subresources),
            )
        elif key in self.resources:
            del self.resources[key]

    async def _serve_api(self, request: kmock.Request) -> Any:
        result = dict(await super()._serve_api(request))
        result.setdefault("serverAddressByClientCIDRs", [])  # required by the kubernetes client's model
        return result

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        if isinstance(result, dict) and str(result.get("groupVersion", "")).startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]  # the core group is "v1", not "/v1"
        return result

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 fails to parse /api/v1/namespaces (no name), and its responses cannot carry text/plain:
        # serve those two directly (no kmock request log, no reactions).
        path = raw_request.path.rstrip("/")
        if path and path != raw_request.path:  # the kubernetes client asks for "/api/", "/apis/batch/v1/", ...
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_path(path))
        if path == "/api/v1/namespaces" or (path.startswith("/api/v1/namespaces/") and path.endswith("/log")):
            body = await raw_request.read()
            try:
                result = await self._serve(
                    raw_request.method,
                    raw_request.path,
                    dict(raw_request.query),
                    {k.lower(): v for k, v in raw_request.headers.items()},
                    body,
                    raw_request,
                )
            except ApiError as exc:
                return aiohttp.web.json_response(exc.body(), status=exc.code)
            if isinstance(result, str):
                return aiohttp.web.Response(text=result, content_type="text/plain")
            if isinstance(result, dict):
                return aiohttp.web.json_response(result, status=raw_request.get(_STATUS_KEY, 200))
            response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(raw_request)
            with contextlib.suppress(ConnectionError):
                async for chunk in result:
                    if chunk:
                        await response.write(json.dumps(chunk).encode() + b"\n")
                await response.write_eof()
            return response
        response = await super().__call__(raw_request)
        # kmock cannot vary the status of a callback's answer (a kmock.Response returned from the callback would
        # stick to the reaction), so a successful create marks the request and gets its 201 here.
        if raw_request.get(_STATUS_KEY) and not response.prepared and response.status == 200:
            response.set_status(raw_request[_STATUS_KEY])
        return response

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return aiohttp.web.json_response(exc.body(), status=exc.code)
        return await super()._render_error(exc)

    async def _serve_request(self, request: kmock.Request) -> Any:
        return await self._serve(
            request.method.value,
            request.url.path,
            dict(request.params),
            {k.lower(): v for k, v in request.headers.items()},
            request.body,
            getattr(request, "_raw_request", None),
        )

    def _route(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None]:
        parts = [p for p in path.strip("/").split("/")]
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        if (
            rest
            and rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0] if rest else None
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        rt = self.store.types.get((group, version, plural))
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if namespace is not None and not rt.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and namespace is None and name is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt, namespace, name, subresource

    async def _serve(self, method: str, path: str, params: dict, headers: dict, body: bytes, raw: Any) -> Any:
        rt, namespace, name, subresource = self._route(path)
        store = self.store
        method = method.upper()
        if method == "GET":
            if params.get("watch", "").lower() in _WATCH_TRUE:
                field_selector = params.get("fieldSelector") or ""
                if name is not None:
                    field_selector = ",".join(filter(None, [field_selector, f"metadata.name={name}"]))
                return self._watch(rt, namespace, params, field_selector, raw)
            if name is None:
                limit = int(params["limit"]) if params.get("limit") else None
                return store.list(
                    rt,
                    namespace,
                    params.get("labelSelector"),
                    params.get("fieldSelector"),
                    limit,
                    params.get("continue"),
                )
            if subresource in (None, "status"):
                return store.get(rt, namespace, name)
            if subresource == "log" and rt.gr == ("", "pods"):
                store.get(rt, namespace, name)
                text = self.log_provider(namespace, name, params.get("container")) if self.log_provider else None
                return text or ""
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method in ("POST", "PUT", "PATCH"):
            content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            try:
                data = yaml.safe_load(body) if content_type.endswith("yaml") else json.loads(body or b"null")
            except (ValueError, yaml.YAMLError) as exc:
                raise bad_request(f"the body of the request could not be decoded: {exc}") from None
            if method == "POST":
                if name is not None:
                    raise ApiError(405, "MethodNotAllowed", f"POST is not supported on {path}")
                created = store.create(rt, namespace, data)
                if raw is not None:
                    raw[_STATUS_KEY] = 201  # clients (e.g. the kubernetes client's create_*) expect 201 Created
                return created
            if name is None:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
            if method == "PUT":
                return store.replace(rt, namespace, name, data, subresource)
            return store.patch(rt, namespace, name, data, content_type, subresource)
        if method == "DELETE":
            try:
                options = json.loads(body) if body and body.strip() else {}
            except ValueError:
                raise bad_request("the DeleteOptions could not be decoded") from None
            options = options or {}
            grace = options.get("gracePeriodSeconds", params.get("gracePeriodSeconds"))
            policy = options.get("propagationPolicy", params.get("propagationPolicy"))
            orphan = options.get("orphanDependents", params.get("orphanDependents"))
            if policy is None and orphan is not None:
                policy = "Orphan" if str(orphan).lower() == "true" else "Background"
            kwargs = {
                "grace_period_seconds": int(grace) if grace is not None else None,
                "propagation_policy": policy,
                "preconditions": options.get("preconditions"),
            }
            if name is None:
                return store.delete_collection(
                    rt, namespace, params.get("labelSelector"), params.get("fieldSelector"), **kwargs
                )
            obj, gone = store.delete(rt, namespace, name, **kwargs)
            if gone and not rt.returns_deleted:
                meta = obj["metadata"]
                return {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": meta["name"], "group": rt.group, "kind": rt.plural, "uid": meta["uid"]},
                }
            return obj
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    async def _watch(
        self, rt: ResourceType, namespace: str | None, params: dict, field_selector: str, raw: Any
    ) -> AsyncIterator[Any]:
        store = self.store
        labels, fields = LabelSelector(params.get("labelSelector")), FieldSelector(field_selector)
        since = params.get("resourceVersion") or ""
        initial_events = params.get("sendInitialEvents", "").lower() in _WATCH_TRUE
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None

        def matches(obj: dict | None) -> bool:
            if obj is None:
                return False
            if rt.namespaced and namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return labels(obj["metadata"].get("labels")) and fields(obj)

        def project(change: Change) -> dict | None:
            now, before = matches(change.obj), matches(change.old)
            if change.type == "MODIFIED":
                kind = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
            else:
                kind = change.type if now else None
            return {"type": kind, "object": store._out(rt, change.obj)} if kind else None

        # Registering and taking the snapshot/replay happen without an await in between: no change is lost.
        watcher = store.add_watcher(rt)
        try:
            replay: list[Change] = []
            initial: list[dict] = []
            expired: ApiError | None = None
            if not since or since == "0" or initial_events:
                initial = [store._out(rt, obj) for obj in store.select(rt, namespace) if matches(obj)]
            else:
                try:
                    replay = store.changes_since(rt, int(since))
                except ValueError:
                    expired = bad_request(f"invalid resourceVersion {since!r}")
                except ApiError as exc:
                    expired = exc
            snapshot_rv = store.rv
            yield b""
            if expired is not None:
                yield {"type": "ERROR", "object": expired.body()}
                return
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            if initial_events:
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": rt.api_version,
                        "kind": rt.kind,
                        "metadata": {
                            "resourceVersion": str(snapshot_rv),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            for change in replay:
                event = project(change)
                if event:
                    yield event
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while not store.closed:
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    return
                try:
                    change = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    transport = getattr(raw, "transport", None) if raw is not None else None
                    if raw is not None and (transport is None or transport.is_closing()):
                        return  # the client went away
                    continue
                if change is None:
                    return
                event = project(change)
                if event:
                    yield event
        finally:
            store.remove_watcher(watcher)


# -- the synchronous facade --------------------------------------------------------------------------------------------


class Api:
    """The emulated API running in a background thread (its own event loop). Helpers are synchronous and act on the
    store directly (no HTTP, no kmock reactions): the test and the simulated kubelets use them; the operator and the
    official client use HTTP (``url``, ``kubeconfig_path``, ``client()``).

    Options: ``crds`` (dicts or YAML files; default: ``crds/*.yaml`` of the repository, else a built-in TrainingRun
    CRD), ``auto_namespaces`` (create a namespace on first use; else 404 as on a real server), ``namespaces`` to
    create at start, ``gc_delay`` (seconds before the garbage collector acts on a removed owner), ``log_size``
    (changes kept for watches that resume from a resourceVersion; older ones get 410 Gone)."""

    def __init__(
        self,
        *,
        crds: Iterable[dict | str | Path] | None = None,
        auto_namespaces: bool = True,
        namespaces: Iterable[str] = ("default",),
        gc_delay: float = 0.0,
        log_size: int = 10_000,
    ):
        self._crds = crds
        self._auto_namespaces = auto_namespaces
        self._namespaces = tuple(namespaces)
        self._gc_delay = gc_delay
        self._log_size = log_size
        self.url = ""
        self.port = 0
        self.kubeconfig_path = Path()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: Store | None = None
        self.emulator: KubeEmulator | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._tmpdir: str | None = None

    # lifecycle

    def start(self) -> Api:
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulated API did not start in 30 s")
        if self._error is not None:
            raise RuntimeError("the emulated API failed to start") from self._error
        self._tmpdir = tempfile.mkdtemp(prefix="kube-api-")
        self.kubeconfig_path = Path(self._tmpdir) / "kubeconfig.yaml"
        self.kubeconfig_path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "preferences": {},
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "emulator", "user": {}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                        }
                    ],
                    "current-context": "emulator",
                },
                sort_keys=False,
            )
        )
        for namespace in self._namespaces:
            self.call(self.store._ensure_namespace, namespace)
        crds = self._crds
        if crds is None:
            files = sorted(CRD_DIR.glob("*.yaml")) if CRD_DIR.is_dir() else []
            crds = files or [TRAININGRUN_CRD]
        for crd in crds:
            self.register_crds(crd)
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported through start()
            self._error = exc
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.emulator = KubeEmulator()
        self.store = Store(
            schedule=lambda delay, fn: loop.call_later(delay, fn),
            gc_delay=self._gc_delay,
            auto_namespaces=self._auto_namespaces,
            log_size=self._log_size,
            on_types_changed=self.emulator.sync_resource,
        )
        self.emulator.store = self.store
        async with self.emulator:
            server = RawTestServer(self.emulator, host="127.0.0.1", port=None)
            await server.start_server(access_log=None)  # no access log lines in the operator's output
            try:
                self.port = server.port
                self.url = f"http://127.0.0.1:{server.port}"
                self._ready.set()
                await self._stopping.wait()
                self.store.close()
                await asyncio.sleep(0.05)
            finally:
                await server.close()

    def __enter__(self) -> Api:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # plumbing

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the API's event loop (where the store lives) and return its result."""
        if self.loop is None or self._thread is None or self.loop.is_closed():
            raise RuntimeError("the emulated API is not running (stopped already, or never started)")
        if threading.get_ident() == self._thread.ident:
            return fn(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def resource(self, ref: str | ResourceType) -> ResourceType:
        return self.call(self.store.resolve, ref)

    def client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this API (no auth, plain HTTP)."""
        from kubernetes import client as k8s

        configuration = k8s.Configuration()
        configuration.host = self.url
        return k8s.ApiClient(configuration)

    def core(self) -> Any:
        from kubernetes import client as k8s

        return k8s.CoreV1Api(self.client())

    def batch(self) -> Any:
        from kubernetes import client as k8s

        return k8s.BatchV1Api(self.client())

    def custom(self) -> Any:
        from kubernetes import client as k8s

        return k8s.CustomObjectsApi(self.client())

    def env(self) -> dict[str, str]:
        """Environment for a process (an operator) that should use this API."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    @contextlib.contextmanager
    def use_kubeconfig(self) -> Iterator[Path]:
        """Point ``$KUBECONFIG`` at this API for the duration, for kopf's login and ``config.load_kube_config()``
        in this process. The kubernetes client reads ``$KUBECONFIG`` once, at import, into
        ``kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION``: that is switched too."""
        from kubernetes.config import kube_config

        previous_env = os.environ.get("KUBECONFIG")
        previous_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        try:
            yield self.kubeconfig_path
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous_default
            if previous_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous_env

    @property
    def requests(self) -> list:
        """kmock's log of the HTTP requests served (kmock.Request objects; not the helpers' calls)."""
        return list(self.emulator)

    def inject_error(
        self,
        method: str,
        resource: str,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None | EllipsisType = ...,
        code: int = 500,
        reason: str = "InternalError",
        message: str = "injected by the test",
        times: int | None = 1,
    ) -> None:
        """Fail the next ``times`` (None: all) HTTP requests ``method`` on ``resource`` (optionally one object /
        subresource; ``subresource=None`` means the main resource only) with ``code``, before the store sees them.
        The helpers here bypass HTTP and are never affected. Built on kmock's reaction DSL; for other faults (delays,
        dropped watch streams) use ``api.emulator[...] << ...`` directly."""
        rt = self.resource(resource)
        error = ApiError(code, reason, message)

        def matches(request: kmock.Request) -> bool:
            if request.method.value != method.upper():
                return False
            try:
                rtype, ns, nm, sub = self.emulator._route(request.url.path)
            except (ApiError, IndexError):
                return False
            return (
                rtype.gr == rt.gr
                and (namespace is None or ns == namespace)
                and (name is None or nm == name)
                and (subresource is ... or sub == subresource)
            )

        def register() -> None:
            view = self.emulator[matches]
            (view[:times] if times is not None else view) << error

        self.call(register)

    # CRDs

    def register_crds(self, source: dict | str | Path) -> list[dict]:
        """Create CustomResourceDefinitions from a dict, or a YAML file (several documents allowed)."""
        docs = [source] if isinstance(source, dict) else list(yaml.safe_load_all(Path(source).read_text()))
        created = []
        for doc in docs:
            if doc and doc.get("kind") == "CustomResourceDefinition":
                existing = self.get("customresourcedefinitions", None, doc["metadata"]["name"])
                created.append(existing or self.create(doc))
        return created

    # synchronous helpers (the store, directly)

    def get(self, resource: str, namespace: str | None, name: str | None = None) -> dict | None:
        """The object, or None when it does not exist. For cluster-scoped types ``get("nodes", "node-1")`` works."""
        rt = self.resource(resource)
        if name is None:
            if rt.namespaced:
                raise TypeError(f"get({resource!r}, namespace, name): {rt.plural} are namespaced")
            namespace, name = None, namespace
        try:
            return self.call(self.store.get, rt, namespace, name)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        label_selector: str | dict | None = None,
        field_selector: str | None = None,
    ) -> list[dict]:
        """Objects (all namespaces when ``namespace`` is None); a dict label selector means equality on each key."""
        rt = self.resource(resource)
        if isinstance(label_selector, dict):
            label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        return self.call(self.store.list, rt, namespace, label_selector, field_selector)["items"]

    def create(self, obj: dict, namespace: str | None = None) -> dict:
        """Create ``obj`` (type from apiVersion/kind). Unlike an HTTP create, a given ``status`` is kept."""
        rt = self.call(self.store.type_of, obj)
        return self.call(self.store.create, rt, namespace, obj, keep_status=True)

    def replace(self, obj: dict, subresource: str | None = None) -> dict:
        rt = self.call(self.store.type_of, obj)
        meta = obj["metadata"]
        return self.call(self.store.replace, rt, meta.get("namespace"), meta["name"], obj, subresource)

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> dict:
        """Patch (``patch_type``: merge, json, strategic, apply); ``subresource="status"`` writes the status."""
        rt = self.resource(resource)
        return self.call(self.store.patch, rt, namespace, name, patch, patch_type, subresource)

    def patch_status(self, resource: str, namespace: str | None, name: str, status: dict) -> dict:
        """Merge ``status`` into the object's status (through the status subresource where there is one)."""
        rt = self.resource(resource)
        return self.call(
            self.store.patch, rt, namespace, name, {"status": status}, "merge", "status" if rt.has_status else None
        )

    def delete(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
        missing_ok: bool = False,
    ) -> dict | None:
        """Delete as a DELETE request would; returns the object's last state (None if missing and ``missing_ok``)."""
        rt = self.resource(resource)
        try:
            obj, _ = self.call(
                self.store.delete,
                rt,
                namespace,
                name,
                grace_period_seconds=grace_period_seconds,
                propagation_policy=propagation_policy,
            )
            return obj
        except ApiError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise

    def events(
        self,
        namespace: str | None = None,
        *,
        name: str | None = None,
        kind: str | None = None,
        reason: str | None = None,
    ) -> list[dict]:
        """Core v1 Events, oldest first, optionally about one object (involvedObject name/kind) or of one reason."""
        found = []
        for event in self.list("events", namespace):
            involved = event.get("involvedObject") or {}
            if name is not None and involved.get("name") != name or kind is not None and involved.get("kind") != kind:
                continue
            if reason is not None and event.get("reason") != reason:
                continue
            found.append(event)
        return sorted(
            found,
            key=lambda e: (
                e.get("lastTimestamp") or e.get("eventTime") or e["metadata"]["creationTimestamp"],
                int(e["metadata"]["resourceVersion"]),
            ),
        )

    @staticmethod
    def wait_for(
        predicate: Callable[[], Any],
        timeout: float = 10.0,
        interval: float = 0.05,
        message: str | Callable[[], str] | None = None,
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy (which is returned); TimeoutError after ``timeout``.
        ``message`` (a string, or a callable for a late description such as pod logs) goes into the error."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                text = message() if callable(message) else message
                raise TimeoutError(f"not true within {timeout} s: {text or getattr(predicate, '__name__', predicate)}")
            time.sleep(interval)


@contextlib.contextmanager
def running_api(**options: Any) -> Iterator[Api]:
    """Start the emulated API (127.0.0.1, a free port) with the repository's CRDs (``crds/*.yaml``; the built-in
    TrainingRun CRD when there are none) and the ``default`` namespace; stop it on exit. Options: see :class:`Api`."""
    api = Api(**options)
    api.start()
    try:
        yield api
    finally:
        api.stop()
