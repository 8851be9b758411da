"""What a TrainingRun may reference in its namespace: ServiceAccounts, Secrets, PersistentVolumeClaims and mount
paths, as the cluster admin allows them (chart values ``allowList``, operator flags ``--allowed-*``, environment
``STAGERUN_ALLOWED_*``).

The operator creates the run's pods with its own permissions, so without a list a TrainingRun's author gets every
ServiceAccount, Secret and claim of the namespace into a pod (docs/security.md): creating a TrainingRun is creating a
pod there. A list narrows that; a run naming anything outside it is refused (condition InvalidSpec) with the field
and the list. Each list is comma-separated patterns (``fnmatch``: ``*``, ``?``), a plain pattern matching the name in
any namespace, ``namespace/name`` only in that namespace. Unset means everything is allowed; set and empty, nothing.

The references are found by walking the manifest's spec as written, by key, so the free-form Kubernetes blocks of
``spec.podTemplate`` (volumes, init containers, env) are covered whatever volume type or source they use.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

ENV = {
    "service_accounts": "STAGERUN_ALLOWED_SERVICE_ACCOUNTS",
    "secrets": "STAGERUN_ALLOWED_SECRETS",
    "volume_claims": "STAGERUN_ALLOWED_VOLUME_CLAIMS",
    "mount_prefixes": "STAGERUN_ALLOWED_MOUNT_PREFIXES",
}
# What each list is called where a user reads it: the chart's values.
VALUES_KEY = {
    "service_accounts": "allowList.serviceAccounts",
    "secrets": "allowList.secrets",
    "volume_claims": "allowList.volumeClaims",
    "mount_prefixes": "allowList.mountPathPrefixes",
}
KIND = {
    "service_accounts": "ServiceAccount",
    "secrets": "Secret",
    "volume_claims": "PersistentVolumeClaim",
    "mount_prefixes": "mount path",
}
# Keys naming an object, by what they name. Secrets: secret volumes and azureFile (secretName), env/envFrom
# (secretKeyRef, secretRef), projected sources (secret: {name}), CSI and the older volume plugins (*SecretRef,
# secretRef).
_SERVICE_ACCOUNT_KEYS = {"serviceAccountName", "serviceAccount"}
_SECRET_NAME_KEYS = {"secretName", "credentialsSecret"}
_SECRET_REF_KEYS = {"secret", "secretRef", "secretKeyRef"}
_CLAIM_KEYS = {"claimName", "volumeClaim"}


@dataclass(frozen=True)
class AllowList:
    service_accounts: tuple[str, ...] | None = None  # None: every one allowed
    secrets: tuple[str, ...] | None = None
    volume_claims: tuple[str, ...] | None = None
    mount_prefixes: tuple[str, ...] | None = None


def from_env(env: Mapping[str, str] = os.environ) -> AllowList:
    lists: dict[str, tuple[str, ...] | None] = {}
    for field, variable in ENV.items():
        text = env.get(variable)
        lists[field] = None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())
    for prefix in lists["mount_prefixes"] or ():
        if not prefix.startswith("/"):
            raise ValueError(f"{ENV['mount_prefixes']}: {prefix!r} is not an absolute path")
    return AllowList(**lists)


@dataclass(frozen=True)
class Reference:
    field: str  # e.g. "service_accounts"
    path: str  # where in the manifest, e.g. spec.checkpoint.credentialsSecret
    value: str


def references(spec: Mapping[str, Any]) -> Iterator[Reference]:
    """Every ServiceAccount, Secret, claim and mount path the spec names, with its path in the manifest."""
    yield from _walk(spec, "spec")
    checkpoint = spec.get("checkpoint") or {}
    if isinstance(checkpoint, Mapping) and checkpoint.get("volumeClaim") and isinstance(checkpoint.get("path"), str):
        yield Reference("mount_prefixes", "spec.checkpoint.path", checkpoint["path"])  # the claim is mounted there


def _walk(value: Any, path: str) -> Iterator[Reference]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}"
            if isinstance(item, str) and item:
                if key in _SERVICE_ACCOUNT_KEYS:
                    yield Reference("service_accounts", where, item)
                elif key in _SECRET_NAME_KEYS:
                    yield Reference("secrets", where, item)
                elif key in _CLAIM_KEYS:
                    yield Reference("volume_claims", where, item)
                elif key == "mountPath":
                    yield Reference("mount_prefixes", where, item)
            elif isinstance(item, Mapping) and (key in _SECRET_REF_KEYS or key.endswith("SecretRef")):
                if isinstance(item.get("name"), str) and item["name"]:
                    yield Reference("secrets", f"{where}.name", item["name"])
            if key == "imagePullSecrets" and isinstance(item, list):
                for index, entry in enumerate(item):  # spec.scheduling: names; a pod's own shape: {name}
                    name = entry.get("name") if isinstance(entry, Mapping) else entry
                    if isinstance(name, str) and name:
                        yield Reference("secrets", f"{where}[{index}]", name)
                continue
            yield from _walk(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def refusals(spec: Mapping[str, Any], namespace: str, allowed: AllowList) -> list[str]:
    """One sentence per reference the allow-list does not cover, naming the field, the value and the list."""
    found = []
    for ref in references(spec):
        patterns = getattr(allowed, ref.field)
        if patterns is None or _allowed(ref, namespace, patterns):
            continue
        shown = ", ".join(patterns) if patterns else "none"
        found.append(
            f"{ref.path} names {KIND[ref.field]} {ref.value!r}, which this operator does not allow (its "
            f"{VALUES_KEY[ref.field]}: {shown}): use an allowed one, or ask the cluster admin to add it"
        )
    return found


def _allowed(ref: Reference, namespace: str, patterns: tuple[str, ...]) -> bool:
    if ref.field == "mount_prefixes":
        path = posixpath.normpath(ref.value)
        return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in patterns)
    qualified = f"{namespace}/{ref.value}"
    return any(fnmatchcase(qualified if "/" in p else ref.value, p) for p in patterns)
