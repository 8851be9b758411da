"""kopf handlers: thin glue between TrainingRun events and the pure state machine (state.py).

Every handler funnels into ``reconcile_run``: read the manifest (accepting or refusing edits), observe the current
attempt (Job, pods, nodes, rank 0's progress), let ``state.reconcile`` decide, carry out its actions, post its Events
and write the new status. It is level-triggered and idempotent, so a timer, a restart of the operator, or a repeated
event all converge on the same state.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any

import kopf

from stagerun.core.protocol import Progress
from stagerun.core.spec.changes import immutable_changes

from . import allow_list, builders, kube, metrics, naming, network_policy, workers
from .observe import (
    Observation,
    failed_create_messages,
    job_change_matters,
    job_view,
    not_ready_nodes,
    pod_view,
)
from .progress_poller import ProgressPoller
from .spec_changes import manifest_of, parse
from .state import DeleteAttempt, ForceDeletePod, Launch, Settings, reconcile
from .status import FAILED, PENDING, STARTING, TERMINAL, set_condition

log = logging.getLogger("stagerun.operator")
RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)
JOB_RESOURCE = ("batch", "v1", "jobs")
RECONCILE_SECONDS = float(os.environ.get("STAGERUN_RECONCILE_SECONDS", "10"))
# How often the nodes of a gang whose pods all look well are read anyway (a kubelet that reports its node NotReady
# leaves the pods' Ready condition as it was); the nodes of a pod that is not Ready or is being deleted are read at
# every reconcile.
NODE_CHECK_SECONDS = float(os.environ.get("STAGERUN_NODE_CHECK_SECONDS", "60"))
PROGRESS_TIMEOUT_SECONDS = 2.0


def settings_from_env() -> Settings:
    env = os.environ
    return Settings(
        backoff_base_seconds=float(env.get("STAGERUN_BACKOFF_BASE_SECONDS", Settings.backoff_base_seconds)),
        backoff_max_seconds=float(env.get("STAGERUN_BACKOFF_MAX_SECONDS", Settings.backoff_max_seconds)),
        failure_grace_seconds=int(env.get("STAGERUN_FAILURE_GRACE_SECONDS", Settings.failure_grace_seconds)),
        suspend_grace_seconds=int(env.get("STAGERUN_SUSPEND_GRACE_SECONDS", Settings.suspend_grace_seconds)),
        force_delete_after_seconds=float(
            env.get("STAGERUN_FORCE_DELETE_AFTER_SECONDS", Settings.force_delete_after_seconds)
        ),
        image_pull_deadline_seconds=float(
            env.get("STAGERUN_IMAGE_PULL_DEADLINE_SECONDS", Settings.image_pull_deadline_seconds)
        ),
    )


def clock() -> float:
    """Seconds since the epoch; a seam so tests can move the operator's time (hang detection) and nothing else."""
    return time.time()


def fetch_progress(pod_ip: str, port: int) -> Progress | None:
    """Rank 0's /progress (trainer/status_server.py); None when it does not answer (yet) or answers nonsense."""
    url = f"http://{pod_ip}:{port}{Progress.PATH}"
    try:
        with urllib.request.urlopen(url, timeout=PROGRESS_TIMEOUT_SECONDS) as reply:
            return Progress.from_json(reply.read())
    except (OSError, http.client.HTTPException, ValueError):  # ValueError: not JSON, or not shaped as a Progress
        return None


@kopf.on.login()
def login(**kwargs):
    """kopf's own API client authenticates like the operator's: in-cluster, or the kubeconfig."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # kopf's bookkeeping goes to annotations, so status holds only what users read.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.stagerun.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.stagerun.io")
    settings.persistence.finalizer = "stagerun.io/cleanup"
    settings.posting.level = logging.INFO
    # A deletion waits for a running timer to be cancelled; kopf checks every 60 s by default, which made deleting a
    # run take up to a minute.
    settings.background.cancellation_polling = 1.0
    # The operator's own Jobs only, filtered by the apiserver. Not the pods: kopf keeps every watched object's body
    # in memory (a pod's is ~100 KB as Python objects), which took the operator to 930 MB at 500 runs of 8-pod
    # gangs; the Job controller folds every pod failure into its Job's status within a second anyway.
    settings.watching.label_selectors[JOB_RESOURCE] = naming.LABEL_RUN
    # Peering (`stagerun operator --peering`): a replica's keep-alive record expires this long after it was written
    # (rewritten every lifetime - 5..10 s), so a standby takes over at most this long after the active replica died
    # without a goodbye (kill -9, a lost node); a graceful stop removes the record at once. kopf's default is 60 s.
    settings.peering.lifetime = int(os.environ.get("STAGERUN_PEERING_LIFETIME_SECONDS", "30"))
    kube.api_client()  # fail at startup, not at the first event, when there are no credentials
    port = os.environ.get("STAGERUN_METRICS_PORT")
    if port:
        metrics.serve(int(port), os.environ.get("STAGERUN_METRICS_ADDRESS", "0.0.0.0"))


# Handlers are coroutines that hand the (blocking) reconcile to a pool of workers.py: creations, edits and children's
# events to the urgent one, timer ticks to the periodic one.
@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def on_change(body, **_) -> None:
    await workers.run_in(workers.URGENT, reconcile_run, body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.timer(*RESOURCE, interval=RECONCILE_SECONDS, initial_delay=RECONCILE_SECONDS, sharp=True)
async def on_timer(body, **_) -> None:
    if (body.get("status") or {}).get("state") not in TERMINAL:
        meta = body["metadata"]
        await workers.run_in(workers.PERIODIC, reconcile_run, meta["namespace"], meta["name"], False)


def _job_event_matters(type, body, **_) -> bool:
    # Evaluated by kopf before the handler is scheduled on a thread: most Job updates (active/ready counts) are
    # dropped here. None is the initial listing, which the runs' timers cover.
    return type is not None and (type == "DELETED" or job_change_matters(body))


@kopf.on.event(*JOB_RESOURCE, labels={naming.LABEL_RUN: kopf.PRESENT}, when=_job_event_matters)
async def on_job_event(body, **_) -> None:
    """A pod that failed, ended or was lost (the Job controller counts it in the Job's status within a second), a
    Job that completed, failed or was suspended: its run is reconciled at once, not at its next timer tick."""
    await workers.run_in(workers.URGENT, _reconcile_for_child, body)


def _reconcile_for_child(body: dict) -> None:
    meta = body["metadata"]
    run = (meta.get("labels") or {}).get(naming.LABEL_RUN)
    if run:
        try:
            reconcile_run(meta["namespace"], run, wait=False)
        except Exception as exc:  # kopf would only log it too; the run's timer retries
            log.warning("reconcile of %s/%s after a change of %s failed: %s", meta["namespace"], run, meta["name"], exc)


@kopf.on.delete(*RESOURCE)
async def on_delete(body, **_) -> None:
    await workers.run_in(workers.URGENT, _delete_children, body)


def _delete_children(body: dict) -> None:
    """Children carry owner references (the garbage collector removes them); deleting them here as well makes the
    cleanup immediate and independent of the collector. Checkpoints in storage are kept."""
    meta = body["metadata"]
    count = kube.delete_everything(meta["namespace"], meta["name"])
    metrics.RUNS.set(meta["namespace"], meta["name"], None)
    _progress.forget(meta["namespace"], meta["name"])
    _locks.pop((meta["namespace"], meta["name"]), None)
    _nodes_read_at.pop((meta["namespace"], meta["name"]), None)
    log.info(
        "TrainingRun %s/%s deleted: removed %d child objects; checkpoints are kept",
        meta["namespace"],
        meta["name"],
        count,
    )


def accepted_run(body: dict, status: dict):
    """The manifest to run (new, or the last accepted one when the edit is refused) and the condition to show."""
    manifest = manifest_of(body)
    run, problems = parse(manifest)
    accepted_spec = status.get("acceptedSpec")
    accepted = parse({**manifest, "spec": accepted_spec})[0] if accepted_spec else None
    if run is None:
        text = "; ".join(str(p) for p in problems)
        return accepted, ("InvalidSpec", f"the manifest is invalid: {text}")
    # The admin's allow-list (operator/allow_list.py): a new run naming anything outside it fails, an edit that does
    # is refused like an invalid one (the accepted spec was allowed when it was accepted).
    namespace = body["metadata"].get("namespace", "")
    refused = allow_list.refusals(manifest.get("spec") or {}, namespace, allow_list.from_env())
    if refused:
        return accepted, ("InvalidSpec", f"the manifest is not allowed here: {'; '.join(refused)}")
    if accepted is not None and status.get("attempt", 0) > 0:
        changed = immutable_changes(accepted, run, status.get("phaseIndex", 0))
        if changed:
            return accepted, (
                "ImmutableFieldChanged",
                f"refused: {', '.join(changed)} cannot change while the run is "
                "past them; running on with the accepted spec. Revert them, or create a new run",
            )
    return run, None


def observe(namespace: str, name: str, status: dict) -> Observation:
    attempt = status.get("attempt", 0)
    if not attempt:
        return Observation(now=clock())
    raw_job = kube.get_job(namespace, naming.attempt_name(name, attempt))
    raw_pods = kube.list_pods(namespace, name, attempt)
    nodes = kube.get_nodes(_nodes_to_read(namespace, name, raw_pods))
    unready = not_ready_nodes(nodes) if nodes is not None else None
    zero = next((p for p in raw_pods if _is_index_zero_running(p)), None)
    if zero is not None:
        progress = _progress.progress(namespace, name, attempt, zero["status"]["podIP"])
    else:
        progress = None
        _progress.forget(namespace, name)
    # Pods the Job controller could not create leave no trace but its Events: read them only while Starting.
    warnings: tuple[str, ...] = ()
    if status.get("state") == STARTING and raw_job is not None:
        warnings = failed_create_messages(kube.list_events_of(namespace, raw_job["metadata"]["uid"]))
    return Observation(
        now=clock(),
        job=job_view(raw_job) if raw_job else None,
        pods=tuple(pod_view(p, unready) for p in raw_pods),
        progress=progress,
        job_warnings=warnings,
    )


def _nodes_to_read(namespace: str, name: str, raw_pods: list[dict]) -> list[str]:
    """The nodes of the gang, when one of its pods does not look well (not Ready, or being deleted) or every
    NODE_CHECK_SECONDS; otherwise none. A node that stops heartbeating shows in its pods first (the node lifecycle
    controller marks them not Ready), so a healthy gang's nodes are read once a minute, not every tick: at 500
    gangs of 8 that was 4,000 GETs per tick."""
    bound = sorted({p["spec"]["nodeName"] for p in raw_pods if (p.get("spec") or {}).get("nodeName")})
    now, key = time.monotonic(), (namespace, name)
    if any(not _looks_well(p) for p in raw_pods) or now - _nodes_read_at.get(key, -math.inf) >= NODE_CHECK_SECONDS:
        _nodes_read_at[key] = now
        return bound
    return []


def _looks_well(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _is_index_zero_running(pod: dict) -> bool:
    annotations = pod["metadata"].get("annotations") or {}
    return (
        annotations.get(naming.JOB_INDEX_ANNOTATION) == "0"
        and (pod.get("status") or {}).get("phase") == "Running"
        and bool((pod.get("status") or {}).get("podIP"))
    )


# fetch_progress is looked up at each call, so a test's replacement of it is the one used.
_progress = ProgressPoller(lambda pod_ip: fetch_progress(pod_ip, naming.STATUS_PORT), workers.pool(workers.PROGRESS))
_nodes_read_at: dict[tuple[str, str], float] = {}  # time.monotonic() of the last read of a run's nodes
_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_again: set[tuple[str, str]] = set()  # runs whose children changed while they were being reconciled


def reconcile_run(namespace: str, name: str, wait: bool = True) -> None:
    """Reconcile one run. Serialised per run in this process, and every decision is taken on a fresh read and
    written with that read's resourceVersion: a decision based on a stale status is never written (kopf retries).

    ``wait=False`` (a child's event): when the run is being reconciled already, it is marked to be reconciled once
    more right after, instead of queueing a thread per event behind the lock (a gang's pods fail together)."""
    key = (namespace, name)
    lock = _locks[key]
    if not lock.acquire(blocking=wait):
        _again.add(key)
        return
    try:
        while True:
            _again.discard(key)
            _reconcile_once(namespace, name)
            if key not in _again:
                return
    finally:
        lock.release()


def _reconcile_once(namespace: str, name: str) -> None:
    with metrics.RECONCILE_SECONDS.time():
        body = kube.get_run(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            metrics.RUNS.set(namespace, name, None)
            return
        try:
            _reconcile(body)
        except kube.Conflict as exc:
            metrics.RECONCILE_ERRORS.inc()
            raise kopf.TemporaryError(str(exc), delay=1) from None
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise


def _reconcile(body: dict) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    old = body.get("status") or {}
    status = dict(old)
    run, refusal = accepted_run(body, status)
    now = clock()
    if run is None:  # invalid and nothing accepted before: nothing can run
        _fail_invalid(body, old, status, refusal, now)
        return
    if status.get("failureReason") == "InvalidSpec" and status.get("attempt", 0) == 0:
        status = {"conditions": status.get("conditions", []), "state": PENDING}  # fixed before it ever ran
    if refusal is None:
        _accept(namespace, name, run, body, status)
    decision = reconcile(run, status, observe(namespace, name, status), settings_from_env())
    job_refused = _refused_by_apiserver(run, namespace, meta["uid"], decision.actions)
    if job_refused:  # e.g. an invalid volume in spec.podTemplate: retrying would fail the same way, forever
        _fail_invalid(body, old, status, ("InvalidSpec", job_refused), now)
        return
    new_status = decision.status
    new_status["observedGeneration"] = meta.get("generation")
    ok, reason, text = (True, "Accepted", "the manifest is running") if refusal is None else (False, *refusal)
    new_status["conditions"] = set_condition(new_status["conditions"], "SpecAccepted", ok, reason, text, now)
    # Intent first: the status (conditional on the resourceVersion read) is written before anything is done, so a
    # 409 leaves nothing half-done to be replayed from a stale status, and a crash after it is repaired by the state
    # machine (a Starting attempt without its Job is launched again: every action is idempotent).
    _write_status(body, old, new_status)
    if refusal is not None and old.get("conditions") != new_status["conditions"]:
        kopf.warn(body, reason=refusal[0], message=refusal[1])
    for event in decision.events:
        (kopf.info if event.type == "Normal" else kopf.warn)(body, reason=event.reason, message=event.message)
    for action in decision.actions:
        _apply(action, run, namespace, name, meta["uid"])
    metrics.RUNS.set(namespace, name, new_status["state"])
    metrics.record_decision(decision.events)
    if new_status.get("restarts", 0) > old.get("restarts", 0):
        metrics.RESTARTS.labels(new_status["lastFailure"]["reason"]).inc()


def _fail_invalid(body: dict, old: dict, status: dict, refusal: tuple[str, str], now: float) -> None:
    """The run is Failed for what its manifest says; a fix of the manifest before its first launch starts it."""
    meta = body["metadata"]
    if status.get("state") != FAILED or status.get("message") != refusal[1]:
        kopf.warn(body, reason=refusal[0], message=refusal[1])
    status.update(state=FAILED, failureReason=refusal[0], message=refusal[1])
    status["conditions"] = set_condition(status.get("conditions", []), "Failed", True, refusal[0], refusal[1], now)
    _write_status(body, old, status)
    metrics.RUNS.set(meta["namespace"], meta["name"], FAILED)


def _refused_by_apiserver(run, namespace: str, uid: str, actions) -> str | None:
    """The apiserver's words when it would refuse the Job a Launch creates (a server-side dry run, before the
    attempt is recorded): what only the apiserver checks, such as the Kubernetes blocks of spec.podTemplate and
    spec.scheduling, fails the run with the reason instead of a launch retried forever."""
    launch = next((a for a in actions if isinstance(a, Launch)), None)
    if launch is None:
        return None
    job = builders.build_job(run, namespace=namespace, uid=uid, attempt=launch.attempt, phase_index=launch.phase_index)
    problem = kube.dry_run_refusal(job)
    if problem is None:
        return None
    return (
        f"the apiserver refuses the attempt's Job: {problem}; fix spec.podTemplate or spec.scheduling (the pod's "
        "Kubernetes fields) and apply the manifest again"
    )


def _accept(namespace: str, name: str, run, body: dict, status: dict) -> None:
    """Record the manifest as accepted; a running gang's ConfigMap gets the edit too, so its trainer picks up
    changed later phases when it reaches them (it re-reads the manifest at every phase end)."""
    spec = body.get("spec", {})
    if status.get("acceptedSpec") == spec:
        return
    had = status.get("acceptedSpec") is not None
    status["acceptedSpec"] = spec
    status["acceptedGeneration"] = body["metadata"].get("generation")
    if had and status.get("attempt"):
        configmap = builders.build_configmap(
            run,
            namespace=namespace,
            uid=body["metadata"]["uid"],
            attempt=status["attempt"],
            phase_index=status.get("phaseIndex", 0),
        )
        kube.patch_configmap_data(namespace, naming.attempt_name(name, status["attempt"]), configmap["data"])


def _apply(action, run, namespace: str, name: str, uid: str) -> None:
    if isinstance(action, Launch):
        for obj in builders.build_attempt(
            run,
            namespace=namespace,
            uid=uid,
            attempt=action.attempt,
            phase_index=action.phase_index,
            network_policy=network_policy.settings_from_env(),
        ):
            kube.create(obj)
    elif isinstance(action, DeleteAttempt):
        kube.delete_attempt(namespace, name, action.attempt, action.grace_seconds)
    elif isinstance(action, ForceDeletePod):
        kube.force_delete_pod(namespace, action.name)


def merge_patch_diff(old: dict, new: dict) -> dict:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``: removed keys become None, nested mappings are
    diffed recursively (a plain ``{}`` would merge into the old mapping instead of replacing it)."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            patch[key] = merge_patch_diff(before, after)
        else:
            patch[key] = after
    return patch


def _write_status(body: dict, old: dict, new: dict) -> None:
    """Merge-patch what changed, conditional on the resourceVersion that was read."""
    changes = merge_patch_diff(old, new)
    if changes:
        meta = body["metadata"]
        kube.patch_run_status(meta["namespace"], meta["name"], meta["resourceVersion"], changes)
