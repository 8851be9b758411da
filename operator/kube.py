"""The few Kubernetes API calls the operator makes, through the official client (sync; kopf runs sync handlers in
threads). Creating what exists and deleting what is gone are not errors: every action may be repeated after an
operator restart.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import naming

log = logging.getLogger("stagerun.operator")
_api: client.ApiClient | None = None
# The calls about a gang's pods and nodes go out together: a 64-node gang torn down one DELETE after another took
# 64 round trips before its last pod heard SIGTERM.
_fan_out = ThreadPoolExecutor(8, thread_name_prefix="stagerun-api")


def api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    global _api
    if _api is None:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
        else:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        # Enough connections for every worker thread at once (workers.py, _fan_out): urllib3 otherwise opens and drops
        # one per call beyond its pool, with a warning each time.
        configuration.connection_pool_maxsize = 32
        _api = client.ApiClient(configuration)
    return _api


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def networking() -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api_client())


def _read(call, *args, **kwargs) -> dict:
    """A read's JSON as plain dicts. The client's typed models cost most of the operator's CPU per reconcile (each
    object is built as models, then turned back into dicts); the views in observe.py want dicts anyway."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


def _ignore(status: int, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if exc.status != status:
            raise
        return None


def create(obj: dict) -> None:
    """Create a ConfigMap, Service, NetworkPolicy or Job; one that already exists (a repeated action) is left as it
    is."""
    namespace, kind = obj["metadata"]["namespace"], obj["kind"]
    calls = {
        "ConfigMap": core().create_namespaced_config_map,
        "Service": core().create_namespaced_service,
        "NetworkPolicy": networking().create_namespaced_network_policy,
        "Job": batch().create_namespaced_job,
    }
    _ignore(409, calls[kind], namespace, obj)


def dry_run_refusal(job: dict) -> str | None:
    """The apiserver's message when it would refuse to create this Job as invalid (422/400), checked with a
    server-side dry run (nothing is stored); None when it would accept it, or it exists already."""
    try:
        batch().create_namespaced_job(job["metadata"]["namespace"], job, dry_run="All")
    except ApiException as exc:
        if exc.status not in (400, 422):
            if exc.status == 409:
                return None
            raise
        try:
            return json.loads(exc.body).get("message") or str(exc.reason)
        except (TypeError, ValueError):
            return str(exc.reason)
    return None


def get_job(namespace: str, name: str) -> dict | None:
    return _ignore(404, _read, batch().read_namespaced_job, name, namespace)


def list_pods(namespace: str, run: str, attempt: int | None = None) -> list[dict]:
    selector = f"{naming.LABEL_RUN}={run}" + (f",{naming.LABEL_ATTEMPT}={attempt}" if attempt is not None else "")
    return _read(core().list_namespaced_pod, namespace, label_selector=selector).get("items", [])


def list_events_of(namespace: str, uid: str) -> list[dict]:
    """The core v1 Events about one object (by uid: a Job of an earlier run with the same name is not it)."""
    return _read(core().list_namespaced_event, namespace, field_selector=f"involvedObject.uid={uid}").get("items", [])


def get_nodes(names: list[str]) -> list[dict] | None:
    """The nodes of these names (those that still exist), or None when the operator may not read nodes (then node
    readiness is not considered). One small GET per node of the gang rather than a list of the whole cluster: at
    hundreds of runs on thousands of nodes, the list per reconcile was most of the operator's and apiserver's work."""
    forbidden = object()

    def read(name: str):
        try:
            return _read(core().read_node, name)
        except ApiException as exc:
            if exc.status in (401, 403):
                return forbidden
            if exc.status != 404:  # a node that is gone: its pods are lost, which the pods show
                raise
            return None

    nodes = list(_fan_out.map(read, names))
    if any(node is forbidden for node in nodes):
        return None
    return [node for node in nodes if node is not None]


def delete_attempt(namespace: str, run: str, attempt: int, grace_seconds: int) -> None:
    """The attempt's Job, pods, Service, ConfigMap and NetworkPolicy. Pods get ``grace_seconds`` to exit (SIGTERM
    first)."""
    name = naming.attempt_name(run, attempt)
    # The pods' deletions go out first and together, with our grace period: the Job's garbage collection would use
    # the pods' own (long) one. A pod the Job controller or the collector is already deleting (backoffLimit 0: the
    # Job controller deletes the survivors of a failed rank) has the pod's full grace; deleting it again with a
    # shorter one shortens it, as the apiserver allows, so the relaunch does not wait.
    pod_body = client.V1DeleteOptions(grace_period_seconds=grace_seconds)
    pods = [
        p["metadata"]["name"] for p in list_pods(namespace, run, attempt) if _grace_left_longer_than(p, grace_seconds)
    ]
    deletions = [
        _fan_out.submit(_ignore, 404, core().delete_namespaced_pod, pod, namespace, body=pod_body) for pod in pods
    ]
    body = client.V1DeleteOptions(propagation_policy="Background", grace_period_seconds=grace_seconds)
    _ignore(404, batch().delete_namespaced_job, name, namespace, body=body)
    for deletion in deletions:
        deletion.result()  # an error other than 404 fails the action (it is repeated at the next reconcile)
    _ignore(404, core().delete_namespaced_service, name, namespace)
    _ignore(404, core().delete_namespaced_config_map, name, namespace)
    # Last: the pods deleted above may still be finishing their checkpoint within their grace period.
    _ignore(404, networking().delete_namespaced_network_policy, name, namespace)


def _grace_left_longer_than(pod: dict, grace_seconds: int) -> bool:
    """Whether deleting the pod with ``grace_seconds`` would stop it sooner than what it was given already."""
    meta = pod["metadata"]
    if not meta.get("deletionTimestamp"):
        return True
    given = meta.get("deletionGracePeriodSeconds")
    return given is None or given > grace_seconds


def force_delete_pod(namespace: str, name: str) -> None:
    _ignore(404, core().delete_namespaced_pod, name, namespace, body=client.V1DeleteOptions(grace_period_seconds=0))


def delete_everything(namespace: str, run: str) -> int:
    """Every Job, pod, Service, ConfigMap and NetworkPolicy of the run (all attempts); returns how many objects were
    deleted."""
    selector = f"{naming.LABEL_RUN}={run}"
    count = 0
    body = client.V1DeleteOptions(propagation_policy="Background")
    for job in batch().list_namespaced_job(namespace, label_selector=selector).items:
        count += _ignore(404, batch().delete_namespaced_job, job.metadata.name, namespace, body=body) is not None
    for pod in core().list_namespaced_pod(namespace, label_selector=selector).items:
        count += _ignore(404, core().delete_namespaced_pod, pod.metadata.name, namespace) is not None
    for service in core().list_namespaced_service(namespace, label_selector=selector).items:
        count += _ignore(404, core().delete_namespaced_service, service.metadata.name, namespace) is not None
    for cm in core().list_namespaced_config_map(namespace, label_selector=selector).items:
        count += _ignore(404, core().delete_namespaced_config_map, cm.metadata.name, namespace) is not None
    policies = networking().list_namespaced_network_policy(namespace, label_selector=selector).items
    for policy in policies:
        count += (
            _ignore(404, networking().delete_namespaced_network_policy, policy.metadata.name, namespace) is not None
        )
    return count


def patch_configmap_data(namespace: str, name: str, data: dict[str, str]) -> None:
    _ignore(404, core().patch_namespaced_config_map, name, namespace, {"data": data})


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def get_run(namespace: str, name: str) -> dict | None:
    return _ignore(
        404, custom().get_namespaced_custom_object, naming.GROUP, naming.VERSION, namespace, naming.PLURAL, name
    )


class Conflict(Exception):
    """The TrainingRun changed since it was read (another writer, or kopf's own bookkeeping)."""


def patch_run_status(namespace: str, name: str, resource_version: str, status_changes: dict) -> None:
    """Merge-patch ``status`` on the status subresource, only if the object is still at ``resource_version``
    (optimistic concurrency: a decision taken on a stale read is never written)."""
    body = {"metadata": {"resourceVersion": resource_version}, "status": status_changes}
    try:
        custom().patch_namespaced_custom_object_status(
            naming.GROUP,
            naming.VERSION,
            namespace,
            naming.PLURAL,
            name,
            body,
            _content_type="application/merge-patch+json",
        )
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(f"TrainingRun {namespace}/{name} changed while it was reconciled") from None
        if exc.status != 404:
            raise
