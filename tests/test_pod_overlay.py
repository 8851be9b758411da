"""spec.podTemplate: what it adds to the trainer pods (operator/pod_overlay.py) and what it may not change
(core/spec/pod_template.py). The CRD's side is tests/test_crd.py and tests/test_crd_apiserver.py; pods that carry
the overlay on a real cluster are tests/test_operator.py."""

from __future__ import annotations

import copy
import textwrap
from decimal import Decimal

import pytest
import yaml
from conftest import stagerun
from test_builders import build, container_of, multinode_manifest, quickstart_manifest

from stagerun.core.spec import resolve_run, validate_manifest
from stagerun.core.spec.pod_template import (
    OPERATOR_ENV,
    OPERATOR_MOUNT_PATHS,
    OPERATOR_VOLUMES,
    RESERVED_LABELS,
    RESERVED_PREFIXES,
)
from stagerun.core.spec.quantities import QuantityError, parse_resource_quantity, resource_quantity_value
from stagerun.operator import builders, naming
from stagerun.operator.pod_overlay import apply_pod_template, merge_mappings

# What an RDMA/InfiniBand cluster asks of a multi-node NCCL job.
NCCL_OVERLAY = {
    "metadata": {"labels": {"team": "llm", "network": "ib"}, "annotations": {"example.com/fabric": "ib0"}},
    "spec": {
        "schedulerName": "volcano",
        "runtimeClassName": "nvidia",
        "securityContext": {"supplementalGroups": [1000]},
        "volumes": [
            {"name": "nccl-topology", "configMap": {"name": "nccl-topology"}},
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
        ],
        "initContainers": [{"name": "wait-for-fabric", "image": "busybox:1.36", "command": ["true"]}],
        "containers": [
            {
                "name": "trainer",
                "env": [
                    {"name": "NCCL_IB_HCA", "value": "mlx5"},
                    {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
                    {"name": "NCCL_TOPO_FILE", "value": "/etc/nccl/topology.xml"},
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ],
                "envFrom": [{"configMapRef": {"name": "nccl-tuning"}}],
                "volumeMounts": [
                    {"name": "nccl-topology", "mountPath": "/etc/nccl", "readOnly": True},
                    {"name": "datasets", "mountPath": "/datasets", "readOnly": True},
                ],
                "resources": {"limits": {"rdma/hca": 1}, "requests": {"rdma/hca": "1"}},
                "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
            }
        ],
    },
}


def with_overlay(manifest: dict, overlay: dict) -> dict:
    manifest = copy.deepcopy(manifest)
    manifest["spec"]["podTemplate"] = copy.deepcopy(overlay)
    return manifest


def pod_template(manifest: dict, phase_index: int = 0) -> dict:
    job = next(o for o in build(manifest, phase_index=phase_index) if o["kind"] == "Job")
    return job["spec"]["template"]


# -- the merge ---------------------------------------------------------------------------------------------------
def test_the_overlay_is_added_to_the_generated_pod():
    plain, merged = pod_template(multinode_manifest()), pod_template(with_overlay(multinode_manifest(), NCCL_OVERLAY))
    labels = merged["metadata"]["labels"]
    assert labels == {**plain["metadata"]["labels"], "team": "llm", "network": "ib"}
    assert merged["metadata"]["annotations"] == {"example.com/fabric": "ib0"}
    pod, before = merged["spec"], plain["spec"]
    assert (pod["schedulerName"], pod["runtimeClassName"]) == ("volcano", "nvidia")
    assert pod["volumes"] == [*before["volumes"], *NCCL_OVERLAY["spec"]["volumes"]]
    assert pod["initContainers"] == NCCL_OVERLAY["spec"]["initContainers"]
    trainer, plain_trainer = pod["containers"][0], before["containers"][0]
    change = NCCL_OVERLAY["spec"]["containers"][0]
    assert trainer["env"] == [*plain_trainer["env"], *change["env"]]  # after the operator's: $(POD_IP) works
    assert trainer["envFrom"] == [{"configMapRef": {"name": "nccl-tuning"}}]  # credentials are files, not env
    assert trainer["volumeMounts"] == [*plain_trainer["volumeMounts"], *change["volumeMounts"]]
    # Extra resources key by key (quantities as the strings a pod spec carries); cpu, memory and the GPUs stay
    # spec.resources's (requests = limits).
    amounts = {"cpu": "160", "memory": "1600Gi", "nvidia.com/gpu": 8}
    assert trainer["resources"] == {"limits": {**amounts, "rdma/hca": "1"}, "requests": {**amounts, "rdma/hca": "1"}}
    # Everything else of the pod is the operator's, unchanged.
    untouched = {"schedulerName", "runtimeClassName", "volumes", "initContainers", "securityContext", "containers"}
    assert {k: v for k, v in pod.items() if k not in untouched} == {
        k: v for k, v in before.items() if k not in untouched
    }
    changed = {"env", "envFrom", "volumeMounts", "resources", "securityContext"}
    assert {k: v for k, v in trainer.items() if k not in changed} == {
        k: v for k, v in plain_trainer.items() if k not in changed
    }


def test_security_context_overrides_merge_onto_the_restricted_default():
    pod = pod_template(with_overlay(multinode_manifest(), NCCL_OVERLAY))["spec"]
    default = pod_template(multinode_manifest())["spec"]
    assert pod["securityContext"] == {**default["securityContext"], "supplementalGroups": [1000]}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},  # IPC_LOCK for RDMA memory registration
    }
    # Overriding a field of the default is explicit: only that field changes.
    rooted = {"spec": {"securityContext": {"runAsUser": 0, "runAsNonRoot": False}}}
    context = pod_template(with_overlay(multinode_manifest(), rooted))["spec"]["securityContext"]
    assert context == {**default["securityContext"], "runAsUser": 0, "runAsNonRoot": False}


def test_an_overlay_without_security_context_keeps_the_restricted_default():
    overlay = {"spec": {"containers": [{"name": "trainer", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}]}}
    for manifest in (quickstart_manifest(), multinode_manifest()):
        plain = pod_template(manifest)["spec"]
        pod = pod_template(with_overlay(manifest, overlay))["spec"]
        assert pod["securityContext"] == plain["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"] == plain["containers"][0]["securityContext"]
        assert "schedulerName" not in pod  # left to the cluster's default


def test_every_phase_and_attempt_gets_the_same_overlay():
    manifest = with_overlay(multinode_manifest(), NCCL_OVERLAY)
    first, relaunched = pod_template(manifest, 0), pod_template(manifest, 1)  # phase 1: a new topology
    for template in (first, relaunched):
        assert template["metadata"]["labels"]["team"] == "llm"
        assert template["spec"]["schedulerName"] == "volcano"
        assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in template["spec"]["containers"][0]["env"]
    assert first["metadata"]["labels"][naming.LABEL_PHASE] != relaunched["metadata"]["labels"][naming.LABEL_PHASE]


def test_a_cpu_pod_without_resources_gets_the_extra_ones_alone():
    overlay = {"spec": {"containers": [{"name": "trainer", "resources": {"limits": {"example.com/fpga": 2}}}]}}
    plain = container_of({"spec": {"template": pod_template(quickstart_manifest())}})
    assert "resources" not in plain  # the quickstart states no cpu, memory or GPUs
    trainer = container_of({"spec": {"template": pod_template(with_overlay(quickstart_manifest(), overlay))}})
    assert trainer["resources"] == {"limits": {"example.com/fpga": "2"}}  # Kubernetes copies limits to requests


def test_no_overlay_leaves_the_template_as_built():
    template = pod_template(quickstart_manifest())
    assert apply_pod_template(template, None) == template
    assert apply_pod_template(template, None) is not template


def test_merge_mappings_merges_mappings_and_replaces_everything_else():
    base = {"a": {"x": 1, "y": {"deep": True}}, "list": [1, 2], "keep": "yes"}
    merged = merge_mappings(base, {"a": {"y": {"other": 1}, "z": 3}, "list": [3], "new": None})
    assert merged == {"a": {"x": 1, "y": {"deep": True, "other": 1}, "z": 3}, "list": [3], "keep": "yes", "new": None}
    assert base == {"a": {"x": 1, "y": {"deep": True}}, "list": [1, 2], "keep": "yes"}  # not changed in place


def test_the_merge_refuses_a_clash_even_when_the_checks_were_skipped():
    """The spec checks refuse these first; the merge itself never lets an overlay item replace one of ours."""
    from stagerun.core.spec.pod_template import PodSpecOverlay, PodTemplateSpec, TrainerContainerOverlay

    template = pod_template(quickstart_manifest())
    shm = PodTemplateSpec(spec=PodSpecOverlay(volumes=({"name": "shm", "emptyDir": {}},)))
    with pytest.raises(ValueError, match="volume 'shm' is the operator's"):
        apply_pod_template(template, shm)
    sidecar = PodTemplateSpec(spec=PodSpecOverlay(containers=(TrainerContainerOverlay(name="sidecar"),)))
    with pytest.raises(ValueError, match="only 'trainer' can be changed"):
        apply_pod_template(template, sidecar)


# -- what the overlay may not change -----------------------------------------------------------------------------
def test_the_reserved_names_cover_what_the_operator_builds():
    """The checks live in stagerun.core (no operator import): their lists must cover what the builders make."""
    manifest = multinode_manifest()
    manifest["spec"]["checkpoint"] = {"path": "/checkpoints", "volumeClaim": "runs", "credentialsSecret": "s3"}
    manifest["spec"]["data"]["cache"] = {"sizeLimit": "200Gi"}  # every optional object the builders can make
    template = pod_template(manifest)
    trainer = template["spec"]["containers"][0]
    assert {e["name"] for e in trainer["env"]} | {"JOB_COMPLETION_INDEX"} == OPERATOR_ENV
    assert {v["name"] for v in template["spec"]["volumes"]} == OPERATOR_VOLUMES
    assert {m["mountPath"] for m in trainer["volumeMounts"]} == OPERATOR_MOUNT_PATHS | {"/checkpoints"}
    for key in naming.attempt_labels("run", 1, "core"):
        assert key in RESERVED_LABELS or key.startswith(RESERVED_PREFIXES), key
    assert builders.WORK_DIR in OPERATOR_MOUNT_PATHS and naming.MANIFEST_DIR in OPERATOR_MOUNT_PATHS


def _trainer(**fields) -> dict:
    return {"spec": {"containers": [{"name": "trainer", **fields}]}}


POD, TRAINER = "spec.podTemplate.spec", "spec.podTemplate.spec.containers[0]"
REFUSED = [
    # the operator's environment, labels, volumes, mounts and resources
    (_trainer(env=[{"name": "STAGERUN_RDZV_ID", "value": "x"}]), f"{TRAINER}.env[0].name", "set by the operator"),
    (_trainer(env=[{"name": "POD_IP", "value": "127.0.0.1"}]), f"{TRAINER}.env[0].name", "set by the operator"),
    (_trainer(env=[{"name": "JOB_COMPLETION_INDEX", "value": "0"}]), f"{TRAINER}.env[0].name", "set by the operator"),
    (
        _trainer(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        f"{TRAINER}.env[1].name",
        "duplicate name 'A'",
    ),
    (
        _trainer(env=[{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]),
        f"{TRAINER}.env[0]",
        "sets both value and valueFrom",
    ),
    (_trainer(env=[{"name": "A=B", "value": "1"}]), f"{TRAINER}.env[0].name", "not an environment variable name"),
    (
        {"metadata": {"labels": {"stagerun.io/attempt": "9"}}},
        "spec.podTemplate.metadata.labels.stagerun.io/attempt",
        "is reserved",
    ),
    (
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "me"}}},
        "spec.podTemplate.metadata.labels.app.kubernetes.io/managed-by",
        "is reserved",
    ),
    ({"metadata": {"labels": {"job-name": "x"}}}, "spec.podTemplate.metadata.labels.job-name", "is reserved"),
    ({"metadata": {"labels": {"Bad Key": "x"}}}, "spec.podTemplate.metadata.labels.Bad Key", "not a Kubernetes label"),
    ({"metadata": {"labels": {"team": "a b"}}}, "spec.podTemplate.metadata.labels.team", "not a label value"),
    (
        {"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}}},
        "spec.podTemplate.metadata.annotations.batch.kubernetes.io/job-completion-index",
        "is reserved",
    ),
    ({"spec": {"volumes": [{"name": "shm", "emptyDir": {}}]}}, f"{POD}.volumes[0].name", "a volume of the operator's"),
    ({"spec": {"volumes": [{"name": "Data", "emptyDir": {}}]}}, f"{POD}.volumes[0].name", "not a DNS-1123 label"),
    ({"spec": {"volumes": [{"emptyDir": {}}]}}, f"{POD}.volumes[0].name", "required field is missing"),
    (
        _trainer(volumeMounts=[{"name": "nowhere", "mountPath": "/data"}]),
        f"{TRAINER}.volumeMounts[0].name",
        "names no volume: 'nowhere'",
    ),
    (
        _trainer(volumeMounts=[{"name": "work", "mountPath": "/dev/shm"}]),
        f"{TRAINER}.volumeMounts[0].mountPath",
        "where the operator mounts its own volume",
    ),
    (
        _trainer(volumeMounts=[{"name": "work", "mountPath": "/etc/stagerun/extra"}]),
        f"{TRAINER}.volumeMounts[0].mountPath",
        "where the operator mounts its own volume",
    ),
    (
        _trainer(volumeMounts=[{"name": "work", "mountPath": "data"}]),
        f"{TRAINER}.volumeMounts[0].mountPath",
        "not an absolute path",
    ),
    (
        _trainer(volumeMounts=[{"name": "work", "mountPath": "/a"}, {"name": "work", "mountPath": "/a"}]),
        f"{TRAINER}.volumeMounts[1].mountPath",
        "duplicate mountPath '/a'",
    ),
    (_trainer(resources={"limits": {"cpu": "8"}}), f"{TRAINER}.resources.limits.cpu", "set spec.resources.cpu"),
    (
        _trainer(resources={"requests": {"memory": "1Gi"}}),
        f"{TRAINER}.resources.requests.memory",
        "set spec.resources.memory",
    ),
    (
        _trainer(resources={"limits": {"nvidia.com/gpu": 1}}),
        f"{TRAINER}.resources.limits.nvidia.com/gpu",
        "the run's GPU resource",
    ),
    (
        _trainer(resources={"limits": {"rdma/hca": 1}, "requests": {"rdma/hca": 2}}),
        f"{TRAINER}.resources.requests.rdma/hca",
        "cannot overcommit rdma/hca",
    ),
    (_trainer(resources={"limits": {"rdma/hca": 0.5}}), f"{TRAINER}.resources.limits.rdma/hca", "quote it ('0.5')"),
    (
        _trainer(resources={"limits": {"rdma/hca": "1 device"}}),
        f"{TRAINER}.resources.limits.rdma/hca",
        "cannot read '1 device' as a Kubernetes quantity",
    ),
    # containers: the trainer only; the pod's own fields
    ({"spec": {"containers": [{"name": "logger"}]}}, f"{TRAINER}.name", "only the 'trainer' container can be changed"),
    (_trainer(image="other:1"), f"{TRAINER}.image", "set it as spec.image"),
    (_trainer(command=["bash"]), f"{TRAINER}.command", "runs `stagerun launch`"),
    (
        {"spec": {"initContainers": [{"name": "trainer", "image": "x"}]}},
        f"{POD}.initContainers[0].name",
        "the trainer's",
    ),
    ({"spec": {"initContainers": [{"name": "setup"}]}}, f"{POD}.initContainers[0].image", "required field is missing"),
    ({"spec": {"nodeSelector": {"pool": "a"}}}, f"{POD}.nodeSelector", "set it as spec.scheduling.nodeSelector"),
    ({"spec": {"priorityClassName": "high"}}, f"{POD}.priorityClassName", "spec.scheduling.priorityClassName"),
    ({"spec": {"schedulerName": ""}}, f"{POD}.schedulerName", "is empty"),
    ({"spec": {"runtimeClassName": "Nvidia GPU"}}, f"{POD}.runtimeClassName", "not a RuntimeClass name"),
    ({"spec": {"hostNetwork": True}}, f"{POD}.hostNetwork", "unknown field"),
]


@pytest.mark.parametrize("overlay,path,fragment", REFUSED, ids=[p for _, p, _ in REFUSED])
def test_an_overlay_that_would_break_the_operators_pod_is_refused(overlay, path, fragment):
    problems = validate_manifest(with_overlay(multinode_manifest(), overlay))
    assert any(p.path == path and fragment in str(p) for p in problems), [str(p) for p in problems]


def test_the_gpu_resource_of_every_phase_is_the_operators():
    manifest = with_overlay(multinode_manifest(), _trainer(resources={"limits": {"amd.com/gpu": 1}}))
    assert validate_manifest(manifest) == []  # not a GPU resource of this run: an extra resource like any other
    manifest["spec"]["phases"][2]["resources"] = {"gpuResource": "amd.com/gpu"}
    problems = validate_manifest(manifest)
    assert [p.path for p in problems] == [f"{TRAINER}.resources.limits.amd.com/gpu"]


def test_the_checkpoint_volume_is_mountable_but_its_path_is_taken():
    manifest = multinode_manifest()
    manifest["spec"]["checkpoint"] = {"path": "/checkpoints", "volumeClaim": "runs"}
    elsewhere = _trainer(volumeMounts=[{"name": "checkpoints", "mountPath": "/export", "readOnly": True}])
    assert validate_manifest(with_overlay(manifest, elsewhere)) == []
    same = _trainer(volumeMounts=[{"name": "checkpoints", "mountPath": "/checkpoints/"}])
    assert [p.path for p in validate_manifest(with_overlay(manifest, same))] == [f"{TRAINER}.volumeMounts[0].mountPath"]
    without_claim = multinode_manifest()  # no volumeClaim: there is no checkpoints volume to mount
    problems = validate_manifest(with_overlay(without_claim, elsewhere))
    assert [p.path for p in problems] == [f"{TRAINER}.volumeMounts[0].name"]


def test_the_nccl_overlay_is_valid_and_reads_back():
    manifest = with_overlay(multinode_manifest(), NCCL_OVERLAY)
    assert validate_manifest(manifest) == []
    run = resolve_run(manifest)
    written = copy.deepcopy(NCCL_OVERLAY)
    written["spec"]["containers"][0]["resources"]["limits"]["rdma/hca"] = "1"  # a quantity is kept as a string
    assert builders.user_manifest(run)["spec"]["podTemplate"] == written  # what the pods' ConfigMap holds


def test_stagerun_validate_names_the_overlay_field(tmp_path):
    manifest = with_overlay(multinode_manifest(), _trainer(env=[{"name": "STAGERUN_NNODES", "value": "1"}]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = stagerun("validate", str(path), timeout=60)
    assert result.returncode != 0
    assert "spec.podTemplate.spec.containers[0].env[0].name: STAGERUN_NNODES is set by the operator" in result.stdout
    assert "Traceback" not in result.stdout


# -- Kubernetes quantities ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,text,amount",
    [
        (1, "1", 1),
        ("500m", "500m", Decimal("0.5")),
        ("64Gi", "64Gi", 64 * 2**30),
        ("1e3", "1e3", 1000),
        ("2k", "2k", 2000),
    ],
)
def test_resource_quantities(value, text, amount):
    assert parse_resource_quantity(value) == text
    assert resource_quantity_value(text) == amount


@pytest.mark.parametrize("value", [-1, "-1", "1 Gi", "Gi", "lots", True, 0.5, None])
def test_resource_quantities_rejected(value):
    with pytest.raises(QuantityError):
        parse_resource_quantity(value)


def test_docs_show_a_valid_overlay():
    """docs/operator.md's overlay example is a podTemplate this version accepts."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operator.md").read_text()
    block = doc[doc.index("```yaml\nspec:\n  podTemplate:") + len("```yaml\n") :]
    example = yaml.safe_load(textwrap.dedent(block[: block.index("```")]))
    assert validate_manifest(with_overlay(multinode_manifest(), example["spec"]["podTemplate"])) == []
