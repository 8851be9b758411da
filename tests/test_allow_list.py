"""The admin's allow-list of what a TrainingRun may reference (issue 19 item 7): every ServiceAccount, Secret, claim
and mount path of a manifest is found, wherever the Kubernetes blocks of spec.podTemplate hide it, and a reference
outside the list is refused with its field and the list. (Refusal by the running operator: tests/test_network_policy.py
on the real control plane.)"""

from __future__ import annotations

import pytest
from test_builders import multinode_manifest

from stagerun.operator import allow_list
from stagerun.operator.allow_list import AllowList, Reference, references, refusals


def hostile_spec() -> dict:
    """The multinode example plus every place a pod names a Secret, claim or mount path."""
    spec = multinode_manifest()["spec"]
    spec["checkpoint"] = {"path": "/ckpt", "volumeClaim": "ckpt-claim", "credentialsSecret": "s3-credentials"}
    spec["podTemplate"] = {
        "spec": {
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol-secret"}},
                {"name": "b", "persistentVolumeClaim": {"claimName": "data-claim"}},
                {"name": "c", "projected": {"sources": [{"secret": {"name": "projected-secret"}}]}},
                {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi-secret"}}},
            ],
            "initContainers": [
                {
                    "name": "fetch",
                    "image": "busybox",
                    "envFrom": [{"secretRef": {"name": "init-env-secret"}}],
                    "volumeMounts": [{"name": "a", "mountPath": "/etc/passwd-dir"}],
                }
            ],
            "containers": [
                {
                    "name": "trainer",
                    "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "key-secret", "key": "t"}}}],
                    "volumeMounts": [{"name": "b", "mountPath": "/data"}],
                }
            ],
        }
    }
    return spec


def test_every_reference_is_found_with_its_path():
    found = {(r.field, r.path, r.value) for r in references(hostile_spec())}
    pod = "spec.podTemplate.spec"
    assert found == {
        ("service_accounts", "spec.scheduling.serviceAccountName", "stagerun-trainer"),
        ("secrets", "spec.scheduling.imagePullSecrets[0]", "ghcr-pull"),
        ("secrets", "spec.checkpoint.credentialsSecret", "s3-credentials"),
        ("volume_claims", "spec.checkpoint.volumeClaim", "ckpt-claim"),
        ("mount_prefixes", "spec.checkpoint.path", "/ckpt"),
        ("secrets", f"{pod}.volumes[0].secret.secretName", "vol-secret"),
        ("volume_claims", f"{pod}.volumes[1].persistentVolumeClaim.claimName", "data-claim"),
        ("secrets", f"{pod}.volumes[2].projected.sources[0].secret.name", "projected-secret"),
        ("secrets", f"{pod}.volumes[3].csi.nodePublishSecretRef.name", "csi-secret"),
        ("secrets", f"{pod}.initContainers[0].envFrom[0].secretRef.name", "init-env-secret"),
        ("mount_prefixes", f"{pod}.initContainers[0].volumeMounts[0].mountPath", "/etc/passwd-dir"),
        ("secrets", f"{pod}.containers[0].env[0].valueFrom.secretKeyRef.name", "key-secret"),
        ("mount_prefixes", f"{pod}.containers[0].volumeMounts[0].mountPath", "/data"),
    }


def test_unset_lists_allow_everything():
    assert refusals(hostile_spec(), "ml", AllowList()) == []


def test_a_reference_outside_the_list_is_refused_with_the_field_and_the_list():
    allowed = AllowList(
        service_accounts=("stagerun-trainer",),
        secrets=("s3-*", "ghcr-pull", "ml/key-secret"),
        volume_claims=("ckpt-*",),
        mount_prefixes=("/ckpt", "/data/"),
    )
    found = refusals(hostile_spec(), "ml", allowed)
    assert len(found) == 6, found
    first = found[0]
    assert first.startswith("spec.podTemplate.spec.volumes[0].secret.secretName names Secret 'vol-secret'")
    assert "(its allowList.secrets: s3-*, ghcr-pull, ml/key-secret)" in first
    joined = "\n".join(found)
    for path in (
        "volumes[1].persistentVolumeClaim.claimName names PersistentVolumeClaim 'data-claim'",
        "volumes[2].projected.sources[0].secret.name",
        "volumes[3].csi.nodePublishSecretRef.name",
        "initContainers[0].envFrom[0].secretRef.name",
        "initContainers[0].volumeMounts[0].mountPath names mount path '/etc/passwd-dir'",
    ):
        assert path in joined, (path, joined)
    # namespace/name patterns hold in their namespace only.
    elsewhere = refusals(hostile_spec(), "other", allowed)
    assert any("secretKeyRef.name names Secret 'key-secret'" in r for r in elsewhere)


def test_an_empty_list_allows_none_and_a_prefix_is_a_whole_path_component():
    spec = hostile_spec()
    found = refusals(spec, "ml", AllowList(service_accounts=()))
    assert found == [
        "spec.scheduling.serviceAccountName names ServiceAccount 'stagerun-trainer', which this operator does not "
        "allow (its allowList.serviceAccounts: none): use an allowed one, or ask the cluster admin to add it"
    ]
    assert allow_list._allowed(Reference("mount_prefixes", "p", "/data/x/../y"), "ml", ("/data",))
    assert not allow_list._allowed(Reference("mount_prefixes", "p", "/database"), "ml", ("/data",))
    assert not allow_list._allowed(Reference("mount_prefixes", "p", "/data/../etc"), "ml", ("/data",))


def test_lists_from_the_environment():
    env = {
        "STAGERUN_ALLOWED_SECRETS": " s3-*, team/x ,",
        "STAGERUN_ALLOWED_SERVICE_ACCOUNTS": "",
        "STAGERUN_ALLOWED_MOUNT_PREFIXES": "/data",
    }
    assert allow_list.from_env(env) == AllowList(
        service_accounts=(), secrets=("s3-*", "team/x"), volume_claims=None, mount_prefixes=("/data",)
    )
    assert allow_list.from_env({}) == AllowList()
    with pytest.raises(ValueError, match="STAGERUN_ALLOWED_MOUNT_PREFIXES: 'data' is not an absolute path"):
        allow_list.from_env({"STAGERUN_ALLOWED_MOUNT_PREFIXES": "data"})


def test_operator_flags_become_the_settings(monkeypatch):
    import argparse

    from stagerun.operator import main

    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    args = parser.parse_args(["--allowed-secrets", "s3-*", "--allowed-volume-claims=", "--no-network-policy"])
    env: dict[str, str] = {}
    main._settings_to_env(args, env)
    assert env == {
        "STAGERUN_ALLOWED_SECRETS": "s3-*",
        "STAGERUN_ALLOWED_VOLUME_CLAIMS": "",
        "STAGERUN_NETWORK_POLICY": "false",
    }
    bad = parser.parse_args(["--allowed-mount-prefixes", "relative"])
    with pytest.raises(ValueError, match="not an absolute path"):
        main._settings_to_env(bad, {})
