"""The Kubernetes objects of one attempt of a TrainingRun phase: pure functions of (run, attempt, phase).

One attempt is a gang: an Indexed ``batch/v1`` Job with one pod per node, a headless Service that gives pod
index 0 a stable DNS name for torchrun's c10d rendezvous, and a ConfigMap holding the manifest the pods train
from. All three share the name ``<run>-a<attempt>`` (``naming.attempt_name``) and carry an owner reference to
the TrainingRun, so deleting the run deletes them. A restart is a new attempt with new objects, never a patched
Job: ``backoffLimit: 0`` makes any pod failure fail the whole Job, and the operator relaunches the gang from the
newest checkpoint.

The output is plain data (dicts, lists, str, int, bool) in a deterministic order, so it can be compared with
the golden files in ``tests/golden`` and sent to the API as it is. The environment variables of the trainer
container are the contract with the pod entrypoint ``stagerun launch``.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import yaml

from stagerun.core import credentials
from stagerun.core.protocol import PodEnv
from stagerun.core.spec import ResolvedPhase, ResolvedRun, to_manifest
from stagerun.core.spec.quantities import resource_quantity_value
from stagerun.core.spec.run import DataCacheSpec

from . import naming
from .network_policy import NetworkPolicySettings, build_network_policy
from .pod_overlay import apply_pod_template

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Written by the API server (or kubectl) rather than the user: not part of the manifest the pods read.
_SERVER_METADATA = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink")
_SERVER_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
RESOLVED_FILE = "resolved.json"
SHM_DIR = "/dev/shm"
WORK_DIR = posixpath.dirname(naming.RUN_DIR)  # an emptyDir: the run dir (tokenizer, shards) lives on local disk
DATA_CACHE_DIR = f"{WORK_DIR}/data-cache"  # spec.data.cache's volume, mounted inside the work emptyDir's path
TERMINATION_LOG = "/dev/termination-log"


def owner_reference(run_name: str, uid: str) -> dict:
    """The reference that makes an object a child of its TrainingRun (garbage-collected with it)."""
    return {
        "apiVersion": f"{naming.GROUP}/{naming.VERSION}",
        "kind": naming.KIND,
        "name": run_name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_attempt(
    run: ResolvedRun,
    *,
    namespace: str,
    uid: str,
    attempt: int,
    phase_index: int,
    network_policy: NetworkPolicySettings | None = None,
) -> list[dict]:
    """[ConfigMap, Service, NetworkPolicy, Job] for one attempt, all named ``naming.attempt_name(run.name, attempt)``
    (no NetworkPolicy without ``network_policy`` settings or when they disable it).

    Create them in this order: the Job's pods mount the ConfigMap and resolve each other through the Service, and
    their ports are closed to strangers (operator/network_policy.py) before the first of them starts.
    """
    kwargs: dict[str, Any] = dict(namespace=namespace, uid=uid, attempt=attempt, phase_index=phase_index)
    objects = [build_configmap(run, **kwargs), build_service(run, **kwargs)]
    if network_policy is not None and network_policy.enabled:
        phase = _phase(run, phase_index)
        metadata = _metadata(run, namespace=namespace, uid=uid, attempt=attempt, phase=phase)
        objects.append(build_network_policy(run, phase, metadata=metadata, attempt=attempt, settings=network_policy))
    return [*objects, build_job(run, **kwargs)]


def build_configmap(run: ResolvedRun, *, namespace: str, uid: str, attempt: int, phase_index: int) -> dict:
    """The manifest as the user wrote it (``trainingrun.yaml``, what the pods train from) and a resolved summary."""
    phase = _phase(run, phase_index)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, namespace=namespace, uid=uid, attempt=attempt, phase=phase),
        # Not immutable: an accepted edit of later phases is written here, and the kubelet refreshes the mounted
        # file, so a trainer that reaches those phases in the same gang picks the edit up (it re-reads at phase ends).
        "data": {
            naming.MANIFEST_FILE: yaml.safe_dump(user_manifest(run), sort_keys=False),
            RESOLVED_FILE: json.dumps(resolved_summary(run), indent=2) + "\n",
        },
    }


def build_service(run: ResolvedRun, *, namespace: str, uid: str, attempt: int, phase_index: int) -> dict:
    """A headless Service: gives pod ``<job>-<index>`` the DNS name ``<job>-<index>.<service>``."""
    phase = _phase(run, phase_index)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, namespace=namespace, uid=uid, attempt=attempt, phase=phase),
        "spec": {
            "clusterIP": "None",
            # The rendezvous happens before any pod is ready: its peers must resolve before readiness.
            "publishNotReadyAddresses": True,
            "selector": {naming.LABEL_ATTEMPT: str(attempt), naming.LABEL_RUN: run.name},
            "ports": [
                {"name": "rdzv", "port": naming.RDZV_PORT, "targetPort": naming.RDZV_PORT, "protocol": "TCP"},
                {"name": "status", "port": naming.STATUS_PORT, "targetPort": naming.STATUS_PORT, "protocol": "TCP"},
            ],
        },
    }


def build_job(run: ResolvedRun, *, namespace: str, uid: str, attempt: int, phase_index: int) -> dict:
    """An Indexed Job with one pod per node; pod 0 hosts the c10d rendezvous."""
    phase = _phase(run, phase_index)
    spec = run.manifest.spec
    if not spec.image:
        raise ValueError(
            "spec.image is required on Kubernetes: set the trainer image, e.g. ghcr.io/example/stagerun:0.1"
        )
    name = attempt_object_name(run, attempt)
    nodes = phase.resources.nodes
    last_host = f"{name}-{nodes - 1}"  # Indexed Jobs name each pod's hostname <job>-<index>
    if len(last_host) > 63:
        raise ValueError(
            f"pod hostname {last_host!r} is longer than 63 characters: shorten metadata.name "
            f"{run.name!r} or use fewer nodes"
        )
    metadata = _metadata(run, namespace=namespace, uid=uid, attempt=attempt, phase=phase)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # one failed pod fails the gang; the operator relaunches all of it from a checkpoint
    }
    if spec.queue_name:
        metadata["labels"][naming.LABEL_KUEUE_QUEUE] = spec.queue_name
        metadata["labels"] = dict(sorted(metadata["labels"].items()))
        job_spec["suspend"] = True  # Kueue admits the Job by unsuspending it once the whole gang fits
    template = {
        "metadata": {"labels": dict(sorted(naming.attempt_labels(run.name, attempt, phase.name).items()))},
        "spec": _pod_spec(run, phase, name=name, uid=uid, attempt=attempt),
    }
    job_spec["template"] = apply_pod_template(template, spec.pod_template)  # the same for every phase
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def attempt_object_name(run: ResolvedRun, attempt: int) -> str:
    """The name of an attempt's objects, checked: a DNS-1123 label with room for the pod index."""
    if len(run.name) > naming.MAX_RUN_NAME:
        raise ValueError(
            f"metadata.name {run.name!r} is {len(run.name)} characters; the operator allows at most "
            f"{naming.MAX_RUN_NAME} (its Jobs' pods are named <name>-a<attempt>-<index>): shorten it"
        )
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be a positive integer, got {attempt!r}")
    name = naming.attempt_name(run.name, attempt)
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(
            f"{name!r} (from metadata.name {run.name!r}) is not a DNS-1123 label: use lowercase letters, digits and '-'"
        )
    return name


def user_manifest(run: ResolvedRun) -> dict:
    """The TrainingRun as its author wrote it (explicit fields only), without status and server-set metadata."""
    manifest = to_manifest(run.manifest, only_explicit=True)
    manifest.pop("status", None)
    metadata = manifest.get("metadata", {})
    for key in _SERVER_METADATA:
        metadata.pop(key, None)
    annotations = metadata.get("annotations")
    if annotations:
        for key in _SERVER_ANNOTATIONS:
            annotations.pop(key, None)
        if not annotations:
            del metadata["annotations"]
    return manifest


def resolved_summary(run: ResolvedRun) -> dict:
    """Every phase with every value stated (for people reading the ConfigMap; the pods resolve the manifest)."""
    return {"run": run.name, "phases": [_phase_summary(phase) for phase in run.phases]}


def _phase_summary(phase: ResolvedPhase) -> dict:
    lr = phase.lr
    return {
        "name": phase.name,
        "startTokens": phase.start_tokens,
        "tokens": phase.tokens,
        "seqLen": phase.seq_len,
        "ramp": [{"tokens": tokens, "size": size} for tokens, size in phase.ramp],
        "microBatchSize": phase.micro_batch_size,
        "lr": {
            "schedule": lr.schedule,
            "peak": lr.peak,
            "end": lr.end,
            "warmupTokens": lr.warmup_tokens,
            "decayFraction": lr.decay_fraction,
            "decayShape": lr.decay_shape,
        },
        "weights": dict(phase.weights),
        "worldSize": phase.world_size,
    }


def _phase(run: ResolvedRun, phase_index: int) -> ResolvedPhase:
    if isinstance(phase_index, bool) or not isinstance(phase_index, int) or not 0 <= phase_index < len(run.phases):
        raise ValueError(
            f"phase index {phase_index!r} is not one of spec.phases[0..{len(run.phases) - 1}] of run {run.name!r}"
        )
    return run.phases[phase_index]


def _metadata(run: ResolvedRun, *, namespace: str, uid: str, attempt: int, phase: ResolvedPhase) -> dict:
    return {
        "name": attempt_object_name(run, attempt),
        "namespace": namespace,
        "labels": dict(sorted(naming.attempt_labels(run.name, attempt, phase.name).items())),
        "annotations": {naming.LABEL_ATTEMPT: str(attempt)},
        "ownerReferences": [owner_reference(run.name, uid)],
    }


def _pod_spec(run: ResolvedRun, phase: ResolvedPhase, *, name: str, uid: str, attempt: int) -> dict:
    spec = run.manifest.spec
    scheduling = spec.scheduling
    pod: dict[str, Any] = {
        "subdomain": name,  # the Service's name: pods resolve as <job>-<index>.<service>
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": naming.TERMINATION_GRACE_SECONDS,
    }
    if scheduling.service_account_name:
        pod["serviceAccountName"] = scheduling.service_account_name
    # The trainer never calls the Kubernetes API: no token in its pods unless the run asks for one (code of its own
    # that calls the API, or a cloud workload identity that reads the mounted token; docs/security.md).
    pod["automountServiceAccountToken"] = scheduling.automount_service_account_token is True
    # What PodSecurity `restricted` asks for (non-root, no privilege escalation, no capabilities, RuntimeDefault
    # seccomp), so trainer pods are admitted in namespaces that enforce it.
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": naming.TRAINER_UID,
        "runAsGroup": naming.TRAINER_UID,
        "fsGroup": naming.TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(sorted(scheduling.node_selector.items()))
    if scheduling.tolerations:
        pod["tolerations"] = _plain(scheduling.tolerations)
    if scheduling.affinity:
        pod["affinity"] = _plain(scheduling.affinity)
    if scheduling.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in scheduling.image_pull_secrets]
    pod["containers"] = [_container(run, phase, name=name, uid=uid, attempt=attempt)]
    pod["volumes"] = _volumes(run, phase, name)
    return pod


def _container(run: ResolvedRun, phase: ResolvedPhase, *, name: str, uid: str, attempt: int) -> dict:
    spec = run.manifest.spec
    container: dict[str, Any] = {
        "name": naming.CONTAINER,
        "image": spec.image,
        "command": ["stagerun", "launch"],
        "env": _env(run, phase, name=name, uid=uid, attempt=attempt),
    }
    container["ports"] = [
        {"name": "rdzv", "containerPort": naming.RDZV_PORT, "protocol": "TCP"},
        {"name": "status", "containerPort": naming.STATUS_PORT, "protocol": "TCP"},
    ]
    resources = _resources(phase)
    if resources:
        container["resources"] = resources
    container["volumeMounts"] = _volume_mounts(run)
    container["terminationMessagePath"] = TERMINATION_LOG
    container["terminationMessagePolicy"] = "File"
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return container


def _env(run: ResolvedRun, phase: ResolvedPhase, *, name: str, uid: str, attempt: int) -> list[dict]:
    """The contract with ``stagerun launch``: where the manifest is, the gang's shape, and how to rendezvous."""
    values: dict[str, str] = {
        PodEnv.MANIFEST: f"{naming.MANIFEST_DIR}/{naming.MANIFEST_FILE}",
        PodEnv.RUN_DIR: naming.RUN_DIR,
        PodEnv.ATTEMPT: str(attempt),
        PodEnv.PHASE_INDEX: str(phase.index),
        PodEnv.NNODES: str(phase.resources.nodes),
        PodEnv.NPROC_PER_NODE: str(phase.resources.procs_per_node),
        PodEnv.SERVICE: name,
        PodEnv.RDZV_ENDPOINT: f"{name}-0.{name}:{naming.RDZV_PORT}",
        # Unique per attempt: a pod left over from an earlier attempt can never join this rendezvous.
        PodEnv.RDZV_ID: f"{uid}-{attempt}",
        PodEnv.STATUS_PORT: str(naming.STATUS_PORT),
        PodEnv.CACHE: f"{WORK_DIR}/cache",
    }
    if (cache := run.manifest.spec.data.cache) is not None:  # the chunk cache on its own volume (_volumes)
        values[PodEnv.DATA_CACHE_DIR] = DATA_CACHE_DIR
        values[PodEnv.DATA_CACHE_BYTES] = str(data_cache_bytes(cache.size_limit))
    if run.checkpoint.credentials_secret:  # paths only: the keys stay in files (core/credentials.py)
        values[PodEnv.CREDENTIALS_DIR] = credentials.CREDENTIALS_MOUNT
        values[credentials.SHARED_CREDENTIALS_FILE_ENV] = credentials.SHARED_CREDENTIALS_FILE
    # Names as plain str: a StrEnum member would not survive yaml.safe_dump (the golden files).
    env: list[dict] = [{"name": str(key), "value": value} for key, value in values.items()]
    for key, path in (
        (PodEnv.POD_IP, "status.podIP"),
        (PodEnv.POD_NAME, "metadata.name"),
        (PodEnv.POD_NAMESPACE, "metadata.namespace"),
    ):
        env.append({"name": key.value, "valueFrom": {"fieldRef": {"fieldPath": path}}})
    return env


def _resources(phase: ResolvedPhase) -> dict:
    res = phase.resources
    amounts: dict[str, Any] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus_per_node > 0:
        amounts[res.gpu_resource] = res.gpus_per_node
    if not amounts:
        return {}
    amounts = dict(sorted(amounts.items()))
    # Requests equal limits: Guaranteed QoS, and extended resources (GPUs) must not be overcommitted anyway.
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _volumes(run: ResolvedRun, phase: ResolvedPhase, name: str) -> list[dict]:
    volumes = [
        {"name": "manifest", "configMap": {"name": name}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": phase.resources.shared_memory}},
        {"name": "work", "emptyDir": {}},
    ]
    if run.checkpoint.volume_claim:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": run.checkpoint.volume_claim}})
    if (cache := run.manifest.spec.data.cache) is not None:
        volumes.append(_data_cache_volume(cache))
    if run.checkpoint.credentials_secret:
        volumes.append(credentials.projected_volume(run.checkpoint.credentials_secret))
    return volumes


def data_cache_bytes(size_limit: str) -> int:
    """The chunk cache's LRU limit: 7/8 of the volume, room for chunks being written and eviction lag (the node's
    ranks each evict after writing 1/16 of the limit / ranks: remote_io.ChunkCache)."""
    return int(resource_quantity_value(size_limit) * 7 / 8)


def _data_cache_volume(cache: DataCacheSpec) -> dict:
    """spec.data.cache's volume: an emptyDir of sizeLimit (the kubelet evicts a pod that outgrows it), or a per-pod
    ephemeral claim of its StorageClass (e.g. local NVMe), deleted with the pod."""
    if cache.storage_class:
        claim = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": cache.storage_class,
            "resources": {"requests": {"storage": cache.size_limit}},
        }
        return {"name": "data-cache", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
    empty_dir = {"sizeLimit": cache.size_limit, **({"medium": cache.medium} if cache.medium else {})}
    return {"name": "data-cache", "emptyDir": empty_dir}


def _volume_mounts(run: ResolvedRun) -> list[dict]:
    mounts: list[dict] = [
        {"name": "manifest", "mountPath": naming.MANIFEST_DIR, "readOnly": True},
        {"name": "shm", "mountPath": SHM_DIR},
        {"name": "work", "mountPath": WORK_DIR},
    ]
    if run.checkpoint.volume_claim:
        mounts.append({"name": "checkpoints", "mountPath": run.checkpoint.path})
    if run.manifest.spec.data.cache is not None:
        mounts.append({"name": "data-cache", "mountPath": DATA_CACHE_DIR})
    if run.checkpoint.credentials_secret:
        mounts.append(credentials.VOLUME_MOUNT)
    return mounts


def _plain(value: Any) -> Any:
    """A deep copy as YAML/JSON-ready data: tuples become lists, nothing is shared with the frozen spec."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
