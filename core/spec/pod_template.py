"""``spec.podTemplate``: what a user may add to the trainer pods the operator generates, and the checks on it.

Shaped like a Kubernetes PodTemplateSpec (as JobSet's and Kubeflow Trainer's pod overrides are), but only with the
parts that are safe to add to a pod whose rendezvous, manifest, GPUs and restart policy the operator owns:

    podTemplate:
      metadata: {labels: {...}, annotations: {...}}
      spec:
        schedulerName, runtimeClassName, securityContext, volumes, initContainers
        containers: [{name: trainer, env, envFrom, volumeMounts, resources, securityContext}]

The operator merges it onto every pod of every attempt and phase (``stagerun.operator.pod_overlay``); phases cannot
override it. Volumes, init containers, env and envFrom are free-form Kubernetes blocks (the apiserver checks them
when the Job is created), keyed by name so the CRD can refuse duplicates; what would break the operator's pod is
refused here, for ``stagerun validate`` and the operator alike, with the field's path: the environment the operator
sets, the labels it selects its pods by, its volumes and mount paths, the CPU, memory and GPU amounts that
``spec.resources`` states, and containers other than the trainer (a sidecar is an init container with
``restartPolicy: Always``: a second regular container would keep a finished pod running).
"""

from __future__ import annotations

import posixpath
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Literal

from .. import credentials
from ..protocol import PodEnv
from . import k8s_values
from .fields import QUANTITY, Problem, spec_field
from .quantities import resource_quantity_value

TRAINER_CONTAINER = "trainer"
# The environment the operator gives every trainer pod (stagerun.operator.builders._env) and the Job controller's
# completion index: the pod's contract with `stagerun launch`, so the overlay may not change it.
OPERATOR_ENV = frozenset(
    {
        PodEnv.MANIFEST,
        PodEnv.RUN_DIR,
        PodEnv.ATTEMPT,
        PodEnv.PHASE_INDEX,
        PodEnv.NNODES,
        PodEnv.NPROC_PER_NODE,
        PodEnv.SERVICE,
        PodEnv.RDZV_ENDPOINT,
        PodEnv.RDZV_ID,
        PodEnv.STATUS_PORT,
        PodEnv.CACHE,
        PodEnv.DATA_CACHE_DIR,  # with spec.data.cache, as is the next
        PodEnv.DATA_CACHE_BYTES,
        PodEnv.POD_IP,
        PodEnv.POD_NAME,
        PodEnv.POD_NAMESPACE,
        PodEnv.JOB_COMPLETION_INDEX,
        PodEnv.CREDENTIALS_DIR,  # with spec.checkpoint.credentialsSecret, as is the next
        credentials.SHARED_CREDENTIALS_FILE_ENV,
    }
)
# Labels the operator selects its pods by (stagerun.operator.naming.attempt_labels) and those the Job controller
# puts on the pods of a Job (its selector): neither may be overridden.
RESERVED_LABELS = frozenset({"app.kubernetes.io/name", "app.kubernetes.io/managed-by", "controller-uid", "job-name"})
RESERVED_PREFIXES = ("stagerun.io/", "batch.kubernetes.io/")
# The pod's own volumes and where the trainer container mounts them (stagerun.operator.builders; tests check that
# these cover what it builds). A checkpoint volume is mounted at spec.checkpoint.path.
OPERATOR_VOLUMES = frozenset({"manifest", "shm", "work", "checkpoints", "data-cache", credentials.CREDENTIALS_VOLUME})
MANIFEST_MOUNT = "/etc/stagerun"  # read-only (a ConfigMap): nothing can be mounted inside it
# /var/lib/stagerun/data-cache: spec.data.cache's volume, inside the work directory (operator/builders.py).
OPERATOR_MOUNT_PATHS = frozenset(
    {MANIFEST_MOUNT, "/dev/shm", "/var/lib/stagerun", "/var/lib/stagerun/data-cache", credentials.CREDENTIALS_MOUNT}
)
# Where the trainer image keeps its Python and the stagerun install (docker/trainer.Dockerfile): a volume mounted
# there, or above it, hides the trainer from its own container.
IMAGE_PATHS = ("/opt/venv", "/opt/python")
# Directories of every Linux container that a volume may not replace: the root, the kernel's /proc, /sys and /dev
# (runc refuses mounts inside /proc; the kubelet owns /dev/termination-log), and the system's programs, libraries
# and configuration. Inside /etc or /usr one file or folder may still be mounted (a CA bundle at /etc/ssl/certs is
# common); /tmp, /mnt, /data and the like are free.
SYSTEM_PATHS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root", "/run", "/sbin", "/sys"}
    | {"/usr", "/var"}
)
KERNEL_PATHS = ("/proc", "/sys", "/dev")
# Amounts spec.resources owns (requests = limits, per phase); the GPU resource is added per run.
OPERATOR_RESOURCES = {"cpu": "spec.resources.cpu", "memory": "spec.resources.memory"}


@dataclass(frozen=True)
class PodTemplateMetadata:
    labels: dict[str, str] | None = spec_field(
        None,
        doc="labels added to every trainer pod; not stagerun.io/*, app.kubernetes.io/name or managed-by "
        "(the operator finds its pods by them) nor the Job controller's",
    )
    annotations: dict[str, str] | None = spec_field(
        None, doc="annotations added to every trainer pod; not stagerun.io/* or batch.kubernetes.io/*"
    )


@dataclass(frozen=True)
class EnvVarSpec:
    name: str = spec_field(doc="variable name; not one the operator sets (STAGERUN_*, POD_*, JOB_COMPLETION_INDEX)")
    value: str | None = spec_field(None, doc="its value; may refer to earlier variables as $(POD_IP)")
    value_from: dict[str, Any] | None = spec_field(
        None, doc="a Kubernetes EnvVarSource instead of value: secretKeyRef, configMapKeyRef, fieldRef, ..."
    )


@dataclass(frozen=True)
class VolumeMountSpec:
    name: str = spec_field(doc="a volume of podTemplate.spec.volumes")
    mount_path: str = spec_field(doc="absolute path in the trainer container; not one of the operator's mounts")
    read_only: bool | None = spec_field(None, doc="mount read-only")
    sub_path: str | None = spec_field(None, doc="mount this path inside the volume instead of its root")
    sub_path_expr: str | None = spec_field(None, doc="subPath with $(VAR) references to the container's env")
    mount_propagation: Literal["None", "HostToContainer", "Bidirectional"] | None = spec_field(
        None, doc="Kubernetes mount propagation"
    )


@dataclass(frozen=True)
class ResourceAmounts:
    limits: dict[str, str] | None = spec_field(
        None, doc="extra resource limits, e.g. rdma/hca: 1 (not cpu, memory or the GPU resource)", kind=QUANTITY
    )
    requests: dict[str, str] | None = spec_field(
        None, doc="extra resource requests (extended resources: equal to their limits)", kind=QUANTITY
    )


@dataclass(frozen=True)
class TrainerContainerOverlay:
    _fields_set_elsewhere = {
        "image": "spec.image",
        "command": "nothing: the trainer container runs `stagerun launch`",
        "args": "nothing: the trainer container runs `stagerun launch`",
    }

    name: str = spec_field(doc=f"must be {TRAINER_CONTAINER}: the container the overlay changes")
    env: tuple[EnvVarSpec, ...] | None = spec_field(
        None, doc="environment variables added after the operator's (e.g. NCCL_*)", map_keys=("name",)
    )
    env_from: tuple[dict[str, Any], ...] | None = spec_field(
        None, doc="Kubernetes EnvFromSources (configMapRef, secretRef) added to the trainer's environment"
    )
    volume_mounts: tuple[VolumeMountSpec, ...] | None = spec_field(
        None, doc="mounts added to the operator's", map_keys=("mountPath",)
    )
    resources: ResourceAmounts | None = spec_field(
        None, doc="extra resources merged key by key into the operator's (cpu, memory, GPUs: spec.resources)"
    )
    security_context: dict[str, Any] | None = spec_field(
        None,
        doc="merged onto the operator's restricted default (allowPrivilegeEscalation: false, capabilities: "
        "{drop: [ALL]}): mappings merge key by key, other values replace",
    )


@dataclass(frozen=True)
class PodSpecOverlay:
    _fields_set_elsewhere = {
        key: f"spec.scheduling.{key}"
        for key in (
            "nodeSelector",
            "tolerations",
            "affinity",
            "priorityClassName",
            "serviceAccountName",
            "imagePullSecrets",
        )
    }

    containers: tuple[TrainerContainerOverlay, ...] | None = spec_field(
        None, doc=f"changes to the {TRAINER_CONTAINER} container (the only one)", map_keys=("name",)
    )
    init_containers: tuple[dict[str, Any], ...] | None = spec_field(
        None,
        doc="Kubernetes init containers run before the trainer (restartPolicy: Always makes one a sidecar); "
        "each needs its own securityContext in a restricted namespace",
        map_keys=("name",),
    )
    volumes: tuple[dict[str, Any], ...] | None = spec_field(
        None,
        doc="Kubernetes volumes added to the operator's (not named manifest, shm, work or checkpoints)",
        map_keys=("name",),
    )
    scheduler_name: str | None = spec_field(None, doc="scheduler of the pods; unset: the cluster's default")
    runtime_class_name: str | None = spec_field(None, doc="RuntimeClass of the pods (e.g. a GPU container runtime)")
    security_context: dict[str, Any] | None = spec_field(
        None,
        doc="merged onto the operator's restricted default (runAsNonRoot, runAsUser/runAsGroup/fsGroup 65532, "
        "seccompProfile RuntimeDefault): mappings merge key by key, other values replace",
    )


@dataclass(frozen=True)
class PodTemplateSpec:
    metadata: PodTemplateMetadata | None = spec_field(None, doc="labels and annotations of the pods")
    spec: PodSpecOverlay | None = spec_field(None, doc="additions to the pods' spec and to the trainer container")


def check_pod_template(
    template: PodTemplateSpec | None,
    problems: list[Problem],
    *,
    gpu_resources: set[str],
    checkpoint_mount: str | None,
) -> None:
    """What the overlay may not do to the operator's pod. ``gpu_resources``: the GPU resource names of the run's
    phases; ``checkpoint_mount``: where the checkpoint volume is mounted (None without spec.checkpoint.volumeClaim)."""
    if template is None:
        return
    path = "spec.podTemplate"
    if template.metadata is not None:
        _check_labels(template.metadata.labels or {}, f"{path}.metadata.labels", problems)
        _check_annotations(template.metadata.annotations or {}, f"{path}.metadata.annotations", problems)
    spec = template.spec
    if spec is None:
        return
    path = f"{path}.spec"
    volumes = [v["name"] for v in spec.volumes or ()]
    for index, name in enumerate(volumes):
        where = f"{path}.volumes[{index}].name"
        if name in OPERATOR_VOLUMES:
            problems.append(Problem(where, f"{name!r} is a volume of the operator's pod", "choose another name"))
        elif k8s_values.dns1123_label(name):
            problems.append(Problem(where, k8s_values.dns1123_label(name) or "", "e.g. 'datasets'"))
    for index, init in enumerate(spec.init_containers or ()):
        where = f"{path}.initContainers[{index}]"
        if init["name"] == TRAINER_CONTAINER:
            problems.append(Problem(f"{where}.name", f"{TRAINER_CONTAINER!r} is the trainer's", "choose another name"))
        elif k8s_values.dns1123_label(init["name"]):
            problems.append(Problem(f"{where}.name", k8s_values.dns1123_label(init["name"]) or ""))
        if not isinstance(init.get("image"), str) or not init["image"]:
            problems.append(Problem(f"{where}.image", "required field is missing", "give the init container's image"))
    if spec.scheduler_name is not None and not spec.scheduler_name.strip():
        problems.append(Problem(f"{path}.schedulerName", "is empty", "drop it to use the cluster's default"))
    elif spec.scheduler_name is not None and k8s_values.dns1123_subdomain(spec.scheduler_name):
        problems.append(Problem(f"{path}.schedulerName", k8s_values.dns1123_subdomain(spec.scheduler_name) or ""))
    if spec.runtime_class_name is not None and k8s_values.dns1123_subdomain(spec.runtime_class_name):
        message = f"{spec.runtime_class_name!r} is not a RuntimeClass name: a DNS-1123 subdomain"
        problems.append(Problem(f"{path}.runtimeClassName", message, "e.g. nvidia"))
    mountable = set(volumes) | (OPERATOR_VOLUMES - {"checkpoints"}) | ({"checkpoints"} if checkpoint_mount else set())
    for index, container in enumerate(spec.containers or ()):
        where = f"{path}.containers[{index}]"
        if container.name != TRAINER_CONTAINER:
            problems.append(
                Problem(
                    f"{where}.name",
                    f"{container.name!r}: only the {TRAINER_CONTAINER!r} container can be changed",
                    f"name: {TRAINER_CONTAINER}; run a sidecar as an init container with restartPolicy: Always",
                )
            )
        _check_env(container.env or (), f"{where}.env", problems)
        _check_env_from(container.env_from or (), f"{where}.envFrom", problems)
        reserved_paths = OPERATOR_MOUNT_PATHS | ({checkpoint_mount} if checkpoint_mount else set())
        for j, mount in enumerate(container.volume_mounts or ()):
            _check_mount(mount, f"{where}.volumeMounts[{j}]", mountable, reserved_paths, problems)
        if container.resources is not None:
            _check_resources(container.resources, f"{where}.resources", gpu_resources, problems)


def _check_key(key: str, path: str, problems: list[Problem], reserved: frozenset[str] = frozenset()) -> bool:
    if k8s_values.qualified_name(key):
        problems.append(
            Problem(
                path,
                f"{key!r} is not a Kubernetes label or annotation key",
                "an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_', '.'",
            )
        )
        return False
    if key in reserved or key.startswith(RESERVED_PREFIXES):
        problems.append(
            Problem(path, f"{key!r} is reserved: the operator or the Job controller sets it", "use another key")
        )
        return False
    return True


def _check_labels(labels: dict[str, str], path: str, problems: list[Problem]) -> None:
    for key, value in labels.items():
        if _check_key(key, f"{path}.{key}", problems, RESERVED_LABELS) and k8s_values.label_value(value):
            problems.append(Problem(f"{path}.{key}", k8s_values.label_value(value) or ""))


def _check_annotations(annotations: dict[str, str], path: str, problems: list[Problem]) -> None:
    for key in annotations:
        _check_key(key, f"{path}.{key}", problems)
    too_large = k8s_values.annotations_size(annotations)
    if too_large:
        problems.append(Problem(path, too_large, "keep large data in a ConfigMap or a volume"))


def _check_env(env: tuple[EnvVarSpec, ...], path: str, problems: list[Problem]) -> None:
    for index, var in enumerate(env):
        where = f"{path}[{index}]"
        if var.name in OPERATOR_ENV:
            problems.append(
                Problem(
                    f"{where}.name",
                    f"{var.name} is set by the operator (the pod's contract with `stagerun launch`)",
                    "drop it; the operator's value describes the gang",
                )
            )
        elif k8s_values.env_var_name(var.name):
            problems.append(Problem(f"{where}.name", k8s_values.env_var_name(var.name) or "", "e.g. NCCL_DEBUG"))
        if var.value is not None and var.value_from is not None:
            problems.append(Problem(where, "sets both value and valueFrom", "keep one of them"))


def _check_env_from(sources: tuple[dict[str, Any], ...], path: str, problems: list[Problem]) -> None:
    """EnvFromSources: the Secret or ConfigMap named, and the prefix (core validateEnvFrom: a prefixed key must be
    an env var name, so the prefix must start like one)."""
    for index, source in enumerate(sources):
        where = f"{path}[{index}]"
        refs = [(key, kind) for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")) if key in source]
        if len(refs) != 1:
            problems.append(Problem(where, "needs exactly one of secretRef and configMapRef", "secretRef: {name: X}"))
            continue
        key, kind = refs[0]
        ref = source[key]
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(name, str):
            problems.append(Problem(f"{where}.{key}.name", "required field is missing", f"name the {kind}"))
        elif k8s_values.object_name(kind, name):
            problems.append(Problem(f"{where}.{key}.name", k8s_values.object_name(kind, name) or ""))
        prefix = source.get("prefix")
        if prefix is not None and (not isinstance(prefix, str) or k8s_values.env_var_name(prefix + "X")):
            problems.append(Problem(f"{where}.prefix", f"{prefix!r} cannot start an environment variable name"))


def _check_mount(
    mount: VolumeMountSpec, path: str, volumes: Set[str], reserved: Set[str], problems: list[Problem]
) -> None:
    if mount.name not in volumes:
        problems.append(
            Problem(f"{path}.name", f"names no volume: {mount.name!r}", "add it to spec.podTemplate.spec.volumes")
        )
    message = mount_path_problem(mount.mount_path, reserved)
    if message:
        problems.append(Problem(f"{path}.mountPath", message, "mount it elsewhere, e.g. under /mnt or /data"))


def mount_path_problem(mount_path: str, operator_mounts: Set[str]) -> str | None:
    """Why a volume may not be mounted at ``mount_path`` in the trainer container (None: it may): not absolute, a
    system directory, inside the kernel's, over the trainer's install, or at or inside one of ``operator_mounts``."""
    if not mount_path.startswith("/"):
        return f"{mount_path!r} is not an absolute path"
    if any(not c.isprintable() for c in mount_path) or ":" in mount_path:  # core validateVolumeMounts: no ':'
        return f"{mount_path!r} holds a ':' or an unprintable character"
    target = posixpath.normpath(mount_path)
    target = "/" if target == "//" else target  # POSIX keeps a leading '//': it is still the root here

    def inside(root: str) -> bool:
        return target == root or target.startswith(root.rstrip("/") + "/")

    for own in sorted(operator_mounts):
        if inside(own):
            return f"{mount_path!r} is at or inside {own}, where the operator mounts its own volume"
    if target in SYSTEM_PATHS:
        return f"{mount_path!r} would replace the container's system directory {target}"
    for kernel in KERNEL_PATHS:
        if inside(kernel):
            return f"{mount_path!r} is inside {kernel}, which belongs to the kernel and the kubelet"
    for image_path in IMAGE_PATHS:
        if image_path == target or image_path.startswith(target.rstrip("/") + "/"):
            return f"{mount_path!r} would hide {image_path}, where the trainer image keeps its Python and stagerun"
    return None


def _check_resources(resources: ResourceAmounts, path: str, gpu_resources: set[str], problems: list[Problem]) -> None:
    for kind in ("limits", "requests"):
        for key in getattr(resources, kind) or {}:
            where = f"{path}.{kind}.{key}"
            if k8s_values.resource_name(key):
                problems.append(Problem(where, k8s_values.resource_name(key) or ""))
            elif key in OPERATOR_RESOURCES:
                problems.append(
                    Problem(where, "is set by spec.resources (requests = limits)", f"set {OPERATOR_RESOURCES[key]}")
                )
            elif key in gpu_resources:
                problems.append(
                    Problem(where, f"{key} is the run's GPU resource", "set spec.resources.gpusPerNode instead")
                )
    limits, requests = resources.limits or {}, resources.requests or {}
    for key in sorted(set(limits) & set(requests)):
        if _not_overcommittable(key) and resource_quantity_value(limits[key]) != resource_quantity_value(requests[key]):
            problems.append(
                Problem(
                    f"{path}.requests.{key}",
                    f"{requests[key]} differs from its limit {limits[key]}: Kubernetes cannot overcommit {key}",
                    "give only limits (requests follow) or equal amounts",
                )
            )


def _not_overcommittable(resource: str) -> bool:
    """Extended resources (a domain outside kubernetes.io) and hugepages must be requested as much as limited."""
    domain, _, _ = resource.rpartition("/")
    extended = bool(domain) and not (domain == "kubernetes.io" or domain.endswith(".kubernetes.io"))
    return extended or resource.startswith("hugepages-")
