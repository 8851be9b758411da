"""The NetworkPolicy of one attempt: who may open connections to the gang's pods.

Without one, any pod of the cluster reaches the trainer pods' ports, and two of them must not be open to strangers:
29400, torch's c10d rendezvous store (unauthenticated; the rendezvous unpickles what it reads from it), and 8090,
rank 0's /progress and the /metrics of the ranks (read-only, but it tells about the run). The policy selects the
attempt's pods (run and attempt labels) and allows ingress

- from the pods of the same gang (same run and attempt), on every port: besides 29400, torch's worker TCPStore and
  the gloo/NCCL sockets listen on ports they choose at run time, so no port list would be right;
- to the status port (8090, or 8090..8090+processes-1 with ``spec.metrics.allRanks``) from the operator, which
  polls /progress, and from Prometheus: ``NetworkPolicySettings.status_from``, set by the chart from its values.

Everything else is denied for ingress. Egress is not restricted (object stores, registries, DNS): policyTypes is
Ingress only. NetworkPolicies add up, so a cluster admin opens more (a sidecar's port, another scraper) with a
policy of their own selecting ``stagerun.io/run``. A NetworkPolicy needs a CNI that enforces it (Calico, Cilium,
...); without one it is stored and does nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from stagerun.core.spec import ResolvedPhase, ResolvedRun

from . import naming

ENABLED_ENV = "STAGERUN_NETWORK_POLICY"
STATUS_FROM_ENV = "STAGERUN_NETWORK_POLICY_STATUS_FROM"
# Used when the operator runs without the chart's settings: the chart's operator pods and a Prometheus of the
# common charts (kube-prometheus-stack, prometheus-community/prometheus label theirs app.kubernetes.io/name:
# prometheus), in any namespace. The chart narrows both to namespaces (values networkPolicy.*).
DEFAULT_STATUS_FROM: tuple[dict, ...] = (
    {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator", naming.LABEL_NAME: "stagerun"}},
    },
    {"namespaceSelector": {}, "podSelector": {"matchLabels": {naming.LABEL_NAME: "prometheus"}}},
)


@dataclass(frozen=True)
class NetworkPolicySettings:
    enabled: bool = True
    status_from: tuple[dict, ...] = DEFAULT_STATUS_FROM  # NetworkPolicyPeers allowed to the status port


def settings_from_env(env: Mapping[str, str] = os.environ) -> NetworkPolicySettings:
    """``STAGERUN_NETWORK_POLICY`` (true/false, default true) and ``STAGERUN_NETWORK_POLICY_STATUS_FROM`` (a JSON
    list of Kubernetes NetworkPolicyPeers); a malformed value stops the operator at startup with its name."""
    enabled_text = env.get(ENABLED_ENV, "true").strip().lower()
    if enabled_text not in ("true", "false"):
        raise ValueError(f"{ENABLED_ENV}={env[ENABLED_ENV]!r}: use true or false")
    peers_text = env.get(STATUS_FROM_ENV, "").strip()
    if not peers_text:
        return NetworkPolicySettings(enabled=enabled_text == "true")
    try:
        peers = json.loads(peers_text)
    except ValueError as exc:
        raise ValueError(f"{STATUS_FROM_ENV} is not JSON ({exc}): give a list of NetworkPolicyPeers") from None
    if not isinstance(peers, list) or not all(isinstance(p, dict) and p for p in peers):
        raise ValueError(
            f"{STATUS_FROM_ENV} must be a JSON list of NetworkPolicyPeers (objects with podSelector, "
            f"namespaceSelector or ipBlock), got {peers_text!r}"
        )
    return NetworkPolicySettings(enabled=enabled_text == "true", status_from=tuple(peers))


def build_network_policy(
    run: ResolvedRun, phase: ResolvedPhase, *, metadata: dict, attempt: int, settings: NetworkPolicySettings
) -> dict:
    """The attempt's NetworkPolicy; ``metadata``: the attempt's (name, labels, owner reference), as its siblings'."""
    gang = {naming.LABEL_RUN: run.name, naming.LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": dict(sorted(gang.items()))},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(sorted(gang.items()))}}]},
                {"from": [_plain(peer) for peer in settings.status_from], "ports": [status_port(run, phase)]},
            ],
        },
    }


def status_port(run: ResolvedRun, phase: ResolvedPhase) -> dict:
    """8090, or the range every rank serves on with spec.metrics.allRanks (port + local rank)."""
    port: dict = {"protocol": "TCP", "port": naming.STATUS_PORT}
    procs = phase.resources.procs_per_node
    if run.manifest.spec.metrics.all_ranks and procs > 1:
        port["endPort"] = naming.STATUS_PORT + procs - 1
    return port


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
