"""The chart's high availability (kopf peering): two peered replicas, rolled without a gap, the peering objects and
CRDs kopf looks for, their RBAC in both scopes, the disruption budget, and the keep-alive lifetime. Rendered with a
real Helm (tests/helm_tool.py) as tests/test_chart.py does; tests/test_rbac.py runs the peered operator with this RBAC
and tests/test_operator_ha.py kills an active replica.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helm_tool import helm_binary, why_no_helm
from test_chart import FULL_VALUES, PEERING_KINDS, RELEASE_NS, container, only, template


@pytest.fixture(scope="module")
def helm() -> Path:
    path = helm_binary()
    if path is None:
        pytest.skip(why_no_helm())
    return path


@pytest.fixture(scope="module")
def default_objects(helm) -> list[dict]:
    return template(helm)


@pytest.fixture(scope="module")
def full_objects(helm, tmp_path_factory) -> list[dict]:
    return template(helm, FULL_VALUES, tmp_path_factory.mktemp("values"))


def peering_name(objects: list[dict]) -> str:
    command = container(objects)["command"]
    (arg,) = [a for a in command if a.startswith("--peering=")]
    return arg.split("=", 1)[1]


def shipped_crds(objects: list[dict]) -> dict[str, dict]:
    """The rendered CRDs (helm template --include-crds: crds/*.yaml) by kind."""
    return {o["spec"]["names"]["kind"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}


def test_replicas_peer_and_roll_without_a_gap(default_objects):
    """Two replicas by default, each with its pod name as kopf's identity; a rolling update starts the new pod (a
    standby) before it stops an old one; the replicas prefer different nodes; a disruption budget keeps one."""
    deployment = only(default_objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = {e["name"]: e for e in container(default_objects)["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's peering identity
    selector = deployment["spec"]["selector"]["matchLabels"]
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"] == {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": selector},
    }
    budget = only(default_objects, "PodDisruptionBudget")
    assert budget["metadata"]["namespace"] == RELEASE_NS
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


@pytest.mark.parametrize("values", [{"replicaCount": 1}, {"podDisruptionBudget": {"enabled": False}}])
def test_no_disruption_budget_for_one_replica_or_when_off(helm, tmp_path, values):
    """One replica with a budget of maxUnavailable 1 protects nothing and a minAvailable 1 would block every drain."""
    objects = template(helm, values, tmp_path)
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert only(objects, "Deployment")["spec"]["replicas"] == values.get("replicaCount", 2)


def test_peering_objects_are_the_ones_the_operator_looks_for(default_objects, full_objects):
    """The operator peers through `--peering=<fullname>`: a ClusterKopfPeering of that name when it watches every
    namespace, a KopfPeering in each watched namespace otherwise; the CRDs in crds/ are the ones kopf's own resource
    selectors match (kopf.dev/v1, the right plural and scope), so kopf finds them."""
    from kopf._cogs.structs import references

    selectors = {"ClusterKopfPeering": references.CLUSTER_PEERINGS_K, "KopfPeering": references.NAMESPACED_PEERINGS_K}
    for objects in (default_objects, full_objects):
        crds = shipped_crds(objects)
        for kind, selector in selectors.items():
            crd = crds[kind]["spec"]
            (version,) = crd["versions"]
            assert version["served"] and version["storage"]
            resource = references.Resource(
                group=crd["group"],
                version=version["name"],
                plural=crd["names"]["plural"],
                kind=kind,
                singular=crd["names"]["singular"],
                namespaced=crd["scope"] == "Namespaced",
                verbs=["list", "watch", "patch"],
            )
            assert selector.check(resource), (kind, resource)
            assert (crd["scope"] == "Namespaced") == (kind == "KopfPeering")
            # kopf writes its keep-alive records under status.<identity>: the schema must keep them.
            assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]
    (cluster,) = [o for o in default_objects if o["kind"] in PEERING_KINDS]
    assert cluster["kind"] == "ClusterKopfPeering" and cluster["apiVersion"] == "kopf.dev/v1"
    assert cluster["metadata"]["name"] == peering_name(default_objects) and "namespace" not in cluster["metadata"]
    namespaced = [o for o in full_objects if o["kind"] in PEERING_KINDS]
    assert {o["kind"] for o in namespaced} == {"KopfPeering"}
    assert {o["metadata"]["namespace"] for o in namespaced} == set(FULL_VALUES["watchNamespaces"])
    assert {o["metadata"]["name"] for o in namespaced} == {peering_name(full_objects)}
    assert "status" not in cluster and not any("status" in o for o in namespaced)  # the replicas' records only


def test_peering_rbac_follows_the_scope(default_objects, full_objects):
    """Cluster-wide: clusterkopfpeerings in the ClusterRole and nothing of KopfPeering; namespaced: kopfpeerings in
    each watched namespace's Role and no ClusterKopfPeering access (tests/test_rbac.py checks they are used)."""

    def granted(role: dict) -> set[tuple[str, str, str]]:
        return {
            (verb, group, resource)
            for rule in role["rules"]
            for verb in rule["verbs"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            if group == "kopf.dev"
        }

    peering = {"list", "watch", "patch"}
    assert granted(only(default_objects, "ClusterRole")) == {(v, "kopf.dev", "clusterkopfpeerings") for v in peering}
    assert granted(only(full_objects, "ClusterRole")) == set()
    roles = [o for o in full_objects if o["kind"] == "Role"]
    assert len(roles) == len(FULL_VALUES["watchNamespaces"])
    for role in roles:
        assert granted(role) == {(v, "kopf.dev", "kopfpeerings") for v in peering}


def test_peering_lifetime_default_is_the_operators(default_objects, monkeypatch):
    """values.yaml's STAGERUN_PEERING_LIFETIME_SECONDS is what the operator's startup handler sets without it."""
    import kopf

    from stagerun.operator import handlers

    env = {e["name"]: e.get("value") for e in container(default_objects)["env"]}
    monkeypatch.delenv("STAGERUN_PEERING_LIFETIME_SECONDS", raising=False)
    monkeypatch.delenv("STAGERUN_METRICS_PORT", raising=False)
    monkeypatch.setattr(handlers.kube, "api_client", lambda: None)  # credentials are not what this checks
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings)
    assert settings.peering.lifetime == int(env["STAGERUN_PEERING_LIFETIME_SECONDS"]) == 30
    monkeypatch.setenv("STAGERUN_PEERING_LIFETIME_SECONDS", "7")
    handlers.configure(settings=settings)
    assert settings.peering.lifetime == 7
