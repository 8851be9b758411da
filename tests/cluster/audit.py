"""The apiserver's audit log, as the record of what a ServiceAccount asked and what the real authoriser decided.

The evidence comes from the kube-apiserver itself (the RBAC test used to record requests on an API emulator).
`write_policy` writes the audit policy the test control plane starts with; `read_events`
reads the JSON-lines log back as `AuditEvent`s, one per request.

Only ServiceAccounts outside kube-system are audited, at level Metadata (who, verb, object reference, response code
and the authoriser's decision; no bodies): those are the identities tests run under to be checked by RBAC. The
controller-manager's own controllers (kube-system ServiceAccounts), the scheduler, kwok and the admin token make most
of a session's requests and would only make the log large and slow to read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import yaml

DECISION = "authorization.k8s.io/decision"  # "allow" or "forbid", set by the authorisation filter
REASON = "authorization.k8s.io/reason"  # which binding allowed it (RBAC: allowed by ClusterRoleBinding "x" of ...)
POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # RequestReceived carries no response code: the later stage of the same request says everything it does.
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}
# A watch is logged twice (ResponseStarted when it opens, ResponseComplete when it ends); the later one wins.
_STAGE_ORDER = {"ResponseStarted": 1, "ResponseComplete": 2, "Panic": 3}


class AuditEvent(NamedTuple):
    """One request, by the RBAC attributes the authoriser checked and what came of it."""

    username: str
    verb: str  # RBAC verb: get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core API
    resource: str  # plural, or plural/subresource ("trainingruns/status"); "" for a non-resource URL
    namespace: str | None  # None: cluster-scoped, or across all namespaces
    name: str | None
    code: int  # HTTP status of the response
    decision: str  # the authoriser's: "allow" or "forbid" ("" if the request never reached it)
    reason: str  # the authoriser's reason: the binding and role that allowed it
    uri: str
    stage: str

    @property
    def rule(self) -> tuple[str, str, str]:
        """(verb, group, resource): the shape of an RBAC rule granting this request."""
        return (self.verb, self.group, self.resource)


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def write_policy(path: Path) -> Path:
    path.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return path


def parse_event(raw: dict) -> AuditEvent:
    ref = raw.get("objectRef") or {}
    resource = ref.get("resource", "")
    if ref.get("subresource"):
        resource = f"{resource}/{ref['subresource']}"
    return AuditEvent(
        username=(raw.get("user") or {}).get("username", ""),
        verb=raw.get("verb", ""),
        group=ref.get("apiGroup", ""),
        resource=resource,
        namespace=ref.get("namespace"),
        name=ref.get("name"),
        code=int((raw.get("responseStatus") or {}).get("code", 0)),
        decision=(raw.get("annotations") or {}).get(DECISION, ""),
        reason=(raw.get("annotations") or {}).get(REASON, ""),
        uri=raw.get("requestURI", ""),
        stage=raw.get("stage", ""),
    )


def parse_lines(lines: Iterable[str]) -> list[AuditEvent]:
    """Events in log order, one per request (its latest stage). A last line cut off mid-write is skipped: the
    apiserver appends while tests read."""
    latest: dict[str, tuple[int, dict]] = {}
    lines = list(lines)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise
        key = raw.get("auditID") or f"line-{number}"
        seen = latest.get(key)
        if seen is None or _STAGE_ORDER.get(raw.get("stage"), 0) >= _STAGE_ORDER.get(seen[1].get("stage"), 0):
            latest[key] = (seen[0] if seen else number, raw)
    return [parse_event(raw) for _, raw in sorted(latest.values(), key=lambda item: item[0])]


def read_events(path: Path, username: str | None = None) -> list[AuditEvent]:
    """The audit log's requests, optionally only those of `username`; [] before the first one is written."""
    if not path.exists():
        return []
    events = parse_lines(path.read_text().splitlines())
    return [e for e in events if username is None or e.username == username]
