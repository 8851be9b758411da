"""The NetworkPolicy of each attempt (issue 19 item 7): built as data, then created and removed by the real operator
on the real control plane.

No CNI runs in the test control plane (pods are kwok's or local processes on loopback), so nothing *enforces* a
NetworkPolicy there: these tests assert the stored objects (their pod selectors, peers and ports, against the labels
of the pods the Job controller really made) and their life cycle, not that a packet is dropped. What an enforcing
CNI does with such a policy is Kubernetes' documented semantics.
"""

from __future__ import annotations

import json

import pytest
from cluster.control_plane import ApiError, ControlPlane
from cluster.kwok_pods import MERGE
from cluster.operator import FAST_SETTINGS, Harness, operator_harness
from test_builders import by_kind, multinode_manifest, quickstart_manifest

from stagerun.core.spec import resolve_run
from stagerun.operator import builders, naming
from stagerun.operator.network_policy import (
    DEFAULT_STATUS_FROM,
    NetworkPolicySettings,
    settings_from_env,
)

OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "stagerun-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator", "app.kubernetes.io/name": "stagerun"}},
}
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def policy_of(raw: dict, settings: NetworkPolicySettings | None = None, **kwargs) -> dict:
    objects = builders.build_attempt(
        resolve_run(raw),
        namespace=kwargs.get("namespace", "ns"),
        uid="uid-7",
        attempt=kwargs.get("attempt", 3),
        phase_index=kwargs.get("phase_index", 0),
        network_policy=settings or NetworkPolicySettings(),
    )
    return by_kind(objects)["NetworkPolicy"]


def check_policy(policy: dict, run: str, attempt: int, status_from: list[dict], status_port: dict) -> None:
    """The whole shape: the gang's pods selected, the gang open to itself, the status port to the given peers
    only, ingress only (egress untouched)."""
    gang = {naming.LABEL_ATTEMPT: str(attempt), naming.LABEL_RUN: run}
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": gang}
    assert spec["policyTypes"] == ["Ingress"]
    assert "egress" not in spec
    within, status = spec["ingress"]
    # From the gang: every port (29400 and the ports torch's store and gloo/NCCL pick at run time).
    assert within == {"from": [{"podSelector": {"matchLabels": gang}}]}
    assert status == {"from": status_from, "ports": [status_port]}


# -- built as data ---------------------------------------------------------------------------------------------------
def test_policy_selects_the_gang_and_opens_only_the_gang_and_the_status_port():
    policy = policy_of(multinode_manifest(), attempt=3)
    assert policy["metadata"]["name"] == "llama3-8b-pretrain-a3"
    assert policy["metadata"]["ownerReferences"] == [builders.owner_reference("llama3-8b-pretrain", "uid-7")]
    assert naming.RDZV_PORT == 29400 and naming.STATUS_PORT == 8090
    check_policy(
        policy, "llama3-8b-pretrain", 3, list(DEFAULT_STATUS_FROM), {"protocol": "TCP", "port": naming.STATUS_PORT}
    )


def test_every_rank_serving_metrics_opens_the_port_range():
    raw = multinode_manifest()  # 8 processes per node
    raw["spec"]["metrics"] = {"allRanks": True}
    (_, status) = policy_of(raw)["spec"]["ingress"]
    assert status["ports"] == [{"protocol": "TCP", "port": 8090, "endPort": 8097}]


def test_the_policy_selects_exactly_the_pods_of_its_attempt():
    """Its selector matches the Job's pod template labels and not those of another attempt or run."""
    raw = quickstart_manifest()
    run = resolve_run(raw)
    objects = by_kind(
        builders.build_attempt(
            run, namespace="ns", uid="u", attempt=2, phase_index=0, network_policy=NetworkPolicySettings()
        )
    )
    selector = objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    pod_labels = objects["Job"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    for other in (naming.attempt_labels(run.name, 1, "core"), naming.attempt_labels("other", 2, "core")):
        assert not selector.items() <= other.items()


def test_disabled_or_not_asked_for_means_no_policy():
    run = resolve_run(quickstart_manifest())
    kwargs = dict(namespace="ns", uid="u", attempt=1, phase_index=0)
    kinds = [o["kind"] for o in builders.build_attempt(run, **kwargs)]
    assert kinds == ["ConfigMap", "Service", "Job"]
    off = builders.build_attempt(run, **kwargs, network_policy=NetworkPolicySettings(enabled=False))
    assert [o["kind"] for o in off] == ["ConfigMap", "Service", "Job"]


def test_settings_from_the_environment():
    assert settings_from_env({}) == NetworkPolicySettings()
    peers = [OPERATOR_PEER, PROMETHEUS_PEER]
    env = {"STAGERUN_NETWORK_POLICY_STATUS_FROM": json.dumps(peers)}
    assert settings_from_env(env).status_from == tuple(peers)
    check_policy(
        policy_of(quickstart_manifest(), settings_from_env(env), attempt=1),
        "quickstart",
        1,
        peers,
        {"protocol": "TCP", "port": 8090},
    )
    assert settings_from_env({"STAGERUN_NETWORK_POLICY": "false"}).enabled is False
    for bad, words in (
        ({"STAGERUN_NETWORK_POLICY": "maybe"}, "use true or false"),
        ({"STAGERUN_NETWORK_POLICY_STATUS_FROM": "{nope"}, "is not JSON"),
        ({"STAGERUN_NETWORK_POLICY_STATUS_FROM": '{"podSelector": {}}'}, "JSON list of NetworkPolicyPeers"),
        ({"STAGERUN_NETWORK_POLICY_STATUS_FROM": "[{}]"}, "JSON list of NetworkPolicyPeers"),
    ):
        with pytest.raises(ValueError, match=words):
            settings_from_env(bad)


# -- on the real control plane ---------------------------------------------------------------------------------------
POLICIES = "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"


def policies(h: Harness) -> dict[str, dict]:
    items = h.plane.request("GET", POLICIES.format(namespace=h.namespace))["items"]
    return {p["metadata"]["name"]: p for p in items}


@pytest.fixture
def plane(control_plane: ControlPlane, trainingrun_crd: str) -> ControlPlane:
    return control_plane


def test_each_attempt_has_its_policy_and_it_goes_with_the_attempt(plane, namespace, monkeypatch):
    """Launch: the policy exists (as the apiserver stored it) with the gang's selector and ports, and it selects
    the pods the Job controller made. A failed pod: the relaunch has its own policy and the old one is gone. The
    run deleted: none is left. (Stored objects only: no CNI enforces them in the test control plane.)"""
    peers = [OPERATOR_PEER, PROMETHEUS_PEER]
    settings = {**FAST_SETTINGS, "STAGERUN_NETWORK_POLICY_STATUS_FROM": json.dumps(peers)}
    with operator_harness(plane, namespace, monkeypatch, nodes=2, settings=settings) as h:
        h.create(h.manifest(resources={"nodes": 2, "gpusPerNode": 1}))
        first = h.wait(lambda: policies(h).get("quickstart-a1"), "no NetworkPolicy for attempt 1")
        check_policy(first, "quickstart", 1, peers, {"protocol": "TCP", "port": 8090})
        run = h.run()
        assert first["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        pods = h.pods.wait_for_pods(2, job="quickstart-a1")
        selector = first["spec"]["podSelector"]["matchLabels"]
        assert all(selector.items() <= p["metadata"]["labels"].items() for p in pods)
        # Created before the Job: the pods never ran without it.
        job = h.get("jobs", "quickstart-a1")
        assert first["metadata"]["creationTimestamp"] <= job["metadata"]["creationTimestamp"]

        h.pods.fail(pods[0], exit_code=1)
        second = h.wait(lambda: policies(h).get("quickstart-a2"), "no NetworkPolicy for attempt 2")
        check_policy(second, "quickstart", 2, peers, {"protocol": "TCP", "port": 8090})
        h.wait(lambda: "quickstart-a1" not in policies(h), "attempt 1's NetworkPolicy outlived its attempt")

        h.delete_run()
        h.wait(lambda: h.run() is None, "the run was not deleted")
        h.wait(lambda: not policies(h), f"NetworkPolicies left after the run: {sorted(policies(h))}")


def test_the_policy_is_garbage_collected_with_the_run_without_the_operator(plane, namespace, monkeypatch):
    """No operator to clean up (its finalizer removed by hand): the owner reference alone makes the real garbage
    collector delete the attempt's NetworkPolicy with the run."""
    with operator_harness(plane, namespace, monkeypatch, start=False) as h:
        h.create(h.manifest())
        with h.operator():
            h.wait(lambda: policies(h).get("quickstart-a1"), "no NetworkPolicy")
        path = f"/apis/stagerun.io/v1alpha1/namespaces/{h.namespace}/trainingruns/quickstart"
        h.plane.request("PATCH", path, {"metadata": {"finalizers": None}}, MERGE)
        h.delete_run()
        h.wait(lambda: h.run() is None, "the TrainingRun was not deleted")
        h.wait(lambda: not policies(h), "the NetworkPolicy was not garbage-collected")


def test_allow_list_refuses_a_run_naming_a_secret_outside_it(plane, namespace, monkeypatch):
    """The admin allows Secrets matching s3-* only: a run naming another one fails with InvalidSpec naming the field
    and the list, and creates nothing; the same run naming an allowed Secret runs."""
    settings = {**FAST_SETTINGS, "STAGERUN_ALLOWED_SECRETS": "s3-*", "STAGERUN_ALLOWED_SERVICE_ACCOUNTS": ""}
    with operator_harness(plane, namespace, monkeypatch, nodes=1, settings=settings) as h:
        doc = h.manifest()
        doc["spec"]["checkpoint"]["credentialsSecret"] = "admin-token"
        h.create(doc)
        h.wait_state("Failed")
        status = h.status()
        assert status["failureReason"] == "InvalidSpec"
        assert "spec.checkpoint.credentialsSecret" in status["message"] and "'admin-token'" in status["message"]
        assert "allowList.secrets: s3-*" in status["message"]
        failed = h.condition("Failed")
        assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
        assert h.jobs() == [] and not policies(h)
        # Fixed before it ever ran: it starts.
        h.patch_spec({"checkpoint": {**doc["spec"]["checkpoint"], "credentialsSecret": "s3-credentials"}})
        h.wait(lambda: h.jobs() == ["quickstart-a1"], "the fixed run never launched")
        h.wait_state("Running")
        # An edit naming a ServiceAccount (none is allowed) is refused; the run goes on with the accepted spec.
        h.patch_spec({"scheduling": {**doc["spec"]["scheduling"], "serviceAccountName": "builder"}})
        h.wait(lambda: h.condition("SpecAccepted").get("status") == "False", "the edit was not refused")
        refused = h.condition("SpecAccepted")
        assert refused["reason"] == "InvalidSpec" and "spec.scheduling.serviceAccountName" in refused["message"]
        assert "allowList.serviceAccounts: none" in refused["message"]
        assert h.status()["state"] != "Failed" and h.jobs() == ["quickstart-a1"]


def test_the_apiserver_accepts_the_built_policy(plane, namespace):
    """The multinode policy (port range included) as the apiserver validates it: stored, and read back equal."""
    raw = multinode_manifest()
    raw["spec"]["metrics"] = {"allRanks": True}
    policy = policy_of(raw, NetworkPolicySettings(status_from=(OPERATOR_PEER, PROMETHEUS_PEER)), namespace=namespace)
    policy["metadata"].pop("ownerReferences")  # its owner does not exist here
    try:
        stored = plane.request("POST", POLICIES.format(namespace=namespace), policy)
    except ApiError as exc:
        pytest.fail(f"the apiserver refused the NetworkPolicy: {exc}")
    assert stored["spec"]["podSelector"] == policy["spec"]["podSelector"]
    assert stored["spec"]["ingress"] == policy["spec"]["ingress"]
    assert stored["spec"]["policyTypes"] == ["Ingress"]
