"""The process kubelet (tests/cluster/process_kubelet.py) on the real control plane: pods of real Jobs run as local
processes, and what it reports drives the real Job controller.

Each test creates plain Kubernetes objects through the apiserver (Jobs, Pods, Services, ConfigMaps), lets the real
scheduler bind them to the kubelet's nodes, and reads back what the kubelet reported in the pod status, what the
Job controller concluded from it, and what the processes printed.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster.control_plane import ApiError, ControlPlane
from cluster.process_kubelet import ProcessKubelet
from cluster.process_node import LABEL

WAIT_S = 60.0  # for a reaction of the cluster on a loaded 2-core machine
KWOK_PODS = ipaddress.ip_network("127.1.0.0/16")


@pytest.fixture(scope="module")
def kubelet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessKubelet]:
    with ProcessKubelet(control_plane, tmp_path_factory.mktemp("kubelet"), nodes=2, max_grace_s=30) as kubelet:
        yield kubelet


def eventually(what: str, check: Callable[[], object], diagnostics: Callable[[], str], timeout_s: float = WAIT_S):
    """`check()`'s first truthy value, polled; on timeout the test fails with `diagnostics()`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s\n{diagnostics()}")
        time.sleep(0.2)


def python_container(script: str, **extra) -> dict:
    return {"name": "main", "image": "python:3.11", "command": ["python", "-c", textwrap.dedent(script)], **extra}


def indexed_job(name: str, kubelet: ProcessKubelet, container: dict, *, grace_s: int = 30) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": grace_s,
                    "containers": [container],
                    **kubelet.placement(),
                },
            },
        },
    }


def headless_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": {"app": name}, "ports": [{"name": "p", "port": 1234}]},
    }


def bare_pod(name: str, kubelet: ProcessKubelet, container: dict, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **kubelet.placement(), **spec},
    }


def create(plane: ControlPlane, namespace: str, obj: dict) -> dict:
    plural = {"Job": "jobs", "Pod": "pods", "Service": "services", "ConfigMap": "configmaps"}[obj["kind"]]
    prefix = "/apis/batch/v1" if obj["kind"] == "Job" else "/api/v1"
    return plane.request("POST", f"{prefix}/namespaces/{namespace}/{plural}", obj)


def get_pod(plane: ControlPlane, namespace: str, name: str) -> dict | None:
    try:
        return plane.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


def job_pods(plane: ControlPlane, namespace: str, job: str) -> list[dict]:
    pods = plane.request("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{job}")["items"]
    return sorted(pods, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))


def job_condition(plane: ControlPlane, namespace: str, job: str) -> dict | None:
    status = plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}").get("status") or {}
    return next(
        (c for c in status.get("conditions") or () if c["type"] in ("Complete", "Failed") and c["status"] == "True"),
        None,
    )


def terminated(pod: dict) -> dict:
    (status,) = pod["status"]["containerStatuses"]
    return status["state"].get("terminated") or {}


def printed_report(kubelet: ProcessKubelet, pod: str, namespace: str) -> dict:
    """The JSON line a test container printed as `REPORT {...}`."""
    line = printed(kubelet, pod, namespace, "REPORT ")
    assert line, kubelet.logs(pod, namespace=namespace)
    return json.loads(line.removeprefix("REPORT "))


def alive(pid: int) -> bool:
    try:
        state = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


# What an Indexed Job's pod prints: its environment, a peer's name as the kubelet resolved it, and who the
# apiserver says it is when it uses the mounted ServiceAccount token the way an in-cluster client does.
REPORTING_SCRIPT = """
    import json, os, ssl, sys, urllib.request
    account = "/var/run/secrets/kubernetes.io/serviceaccount"
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    review = urllib.request.Request(
        f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": "Bearer " + open(account + "/token").read(), "Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=account + "/ca.crt")
    user = json.load(urllib.request.urlopen(review, context=context, timeout=30))["status"]["userInfo"]["username"]
    keys = ("JOB_COMPLETION_INDEX", "POD_IP", "GREETING", "PEER", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    report = {key: os.environ.get(key) for key in keys}
    report.update(user=user, namespace=open(account + "/namespace").read(), argv=sys.argv[1:])
    print("REPORT " + json.dumps(report), flush=True)
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    open("/dev/termination-log", "w").write(f"done {index}")
    sys.exit(int(sys.argv[1 + index]))
"""


def reporting_job(name: str, kubelet: ProcessKubelet, exit_codes: tuple[int, int]) -> dict:
    container = python_container(
        REPORTING_SCRIPT,
        args=[str(code) for code in exit_codes],
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "value": "hello $(POD_NAME)"},
            {"name": "PEER", "value": f"{name}-0.{name}:1234"},
        ],
    )
    return indexed_job(name, kubelet, container)


# -- nodes ---------------------------------------------------------------------------------------------------
def test_nodes_register_stay_ready_on_their_lease_and_go_with_the_kubelet(control_plane: ControlPlane, tmp_path):
    with ProcessKubelet(control_plane, tmp_path / "kubelet", nodes=1, gpus=2) as kubelet:
        (name,) = kubelet.nodes
        node = control_plane.request("GET", f"/api/v1/nodes/{name}")
        assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})  # kwok leaves it alone
        assert node["metadata"]["labels"][LABEL] == kubelet.id
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        assert {a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"} == {"127.0.0.1"}
        assert [t["key"] for t in node["spec"]["taints"]] == [LABEL]  # the not-ready taint is gone: schedulable
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        first = control_plane.request("GET", lease_path)["spec"]["renewTime"]
        eventually(
            "the node's Lease renewed",
            lambda: control_plane.request("GET", lease_path)["spec"]["renewTime"] > first,
            kubelet.all_logs,
            timeout_s=30,
        )
        assert control_plane.node_ready(name)
    for path in (f"/api/v1/nodes/{name}", lease_path):
        with pytest.raises(ApiError) as gone:
            control_plane.request("GET", path)
        assert gone.value.code == 404


# -- pods of Jobs ----------------------------------------------------------------------------------------------
def test_an_indexed_jobs_pods_run_as_processes_and_the_job_controller_completes_the_job(
    control_plane: ControlPlane, namespace: str, kubelet: ProcessKubelet
):
    create(control_plane, namespace, headless_service("work"))
    create(control_plane, namespace, reporting_job("work", kubelet, exit_codes=(0, 0)))

    condition = eventually(
        "Job work Complete or Failed", lambda: job_condition(control_plane, namespace, "work"), kubelet.all_logs
    )
    assert condition["type"] == "Complete", f"{condition}\n{kubelet.all_logs()}"
    pods = job_pods(control_plane, namespace, "work")
    assert [p["status"]["phase"] for p in pods] == ["Succeeded", "Succeeded"]
    addresses = [p["status"]["podIP"] for p in pods]
    assert len(set(addresses)) == 2, addresses
    for pod, address in zip(pods, addresses):
        ip = ipaddress.ip_address(address)
        assert ip.is_loopback and ip not in KWOK_PODS, address
        assert pod["status"]["hostIP"] == "127.0.0.1"
        assert pod["spec"]["nodeName"] in kubelet.nodes
        state = terminated(pod)
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert (state["exitCode"], state["reason"], state.get("message")) == (0, "Completed", f"done {index}")
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == ready["ContainersReady"] == "False" and ready["PodScheduled"] == "True"

        report = printed_report(kubelet, pod["metadata"]["name"], namespace)
        assert report["JOB_COMPLETION_INDEX"] == index  # the Job controller's fieldRef on an annotation
        assert report["POD_IP"] == address
        assert report["GREETING"] == f"hello {pod['metadata']['name']}"
        assert report["PEER"] == f"{addresses[0]}:1234"  # work-0.work, resolved through the headless Service
        assert report["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
        assert report["KUBERNETES_SERVICE_PORT"] == str(control_plane.api_port)
        # The projected token, CA and namespace the ServiceAccount admission plugin mounts, used against the
        # apiserver: the pod authenticates as its ServiceAccount.
        assert report["user"] == f"system:serviceaccount:{namespace}:default"
        assert report["namespace"] == namespace
    job = control_plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/work")
    assert job["status"]["succeeded"] == 2 and not job["status"].get("failed")


def test_a_failing_index_fails_the_job_whose_controller_then_stops_the_other_pod(
    control_plane: ControlPlane, namespace: str, kubelet: ProcessKubelet
):
    # Index 0 listens on its pod address until it is told to stop (SIGTERM: it exits 143, as an unhandled SIGTERM
    # would). Index 1 connects to it by its DNS name, then fails with exit code 3, saying why only on stderr:
    # FallbackToLogsOnError makes that the message.
    script = """
        import os, signal, socket, sys, time
        if os.environ["JOB_COMPLETION_INDEX"] == "1":
            host, port = os.environ["PEER"].split(":")
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            print(f"boom: index 1 reached {host} and gives up", file=sys.stderr, flush=True)
            sys.exit(3)
        def stop(signum, frame):
            print("SIGTERM received", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        listener = socket.create_server((os.environ["POD_IP"], 1234))
        print("listening", flush=True)
        while True:
            listener.accept()[0].close()
    """
    container = python_container(
        script,
        env=[
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PEER", "value": "fail-0.fail:1234"},
        ],
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    create(control_plane, namespace, headless_service("fail"))
    create(control_plane, namespace, indexed_job("fail", kubelet, container, grace_s=600))
    names = eventually(
        "both pods of Job fail created",
        lambda: len(pods := job_pods(control_plane, namespace, "fail")) == 2 and [p["metadata"]["name"] for p in pods],
        kubelet.all_logs,
    )

    condition = eventually(
        "Job fail Complete or Failed", lambda: job_condition(control_plane, namespace, "fail"), kubelet.all_logs
    )
    assert (condition["type"], condition["reason"]) == ("Failed", "BackoffLimitExceeded"), condition
    state = terminated(get_pod(control_plane, namespace, names[1]))
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert f"boom: index 1 reached {kubelet.pod_ip(names[0], namespace)} and gives up" in state["message"]
    # The Job controller deletes the running index 0 with its grace (600 s); the kubelet sends SIGTERM, the process
    # exits, the kubelet reports it and finishes the deletion: the pod is gone long before the grace is over.
    eventually("index 0 deleted", lambda: get_pod(control_plane, namespace, names[0]) is None, kubelet.all_logs)
    assert printed(kubelet, names[0], namespace, "SIGTERM received")
    assert kubelet.run_of(names[0], namespace).containers[0].result["exitCode"] == 143


# -- deletion, crashes ---------------------------------------------------------------------------------------
STUBBORN = """
    import os, signal, subprocess, time
    helper = subprocess.Popen(["sleep", "600"], start_new_session=True)  # as torchrun starts its workers
    signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM ignored", flush=True))
    print(f"PIDS {os.getpid()} {helper.pid}", flush=True)
    while True:
        time.sleep(1)
"""
POLITE = """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM: bye", flush=True), sys.exit(0)))
    print(f"PIDS {os.getpid()}", flush=True)
    time.sleep(600)
"""
HOLD = "stagerun.test/hold"  # a finalizer of the test's: the pod stays readable after the kubelet deleted it


def printed(kubelet: ProcessKubelet, pod: str, namespace: str, prefix: str) -> str | None:
    """The first line the pod's process printed that starts with `prefix` (None: not yet, or not started)."""
    try:
        lines = kubelet.logs(pod, namespace=namespace).splitlines()[1:]  # the first line is the kubelet's `$ argv`
    except LookupError:
        return None
    return next((line for line in lines if line.startswith(prefix)), None)


def pids(kubelet: ProcessKubelet, pod: str, namespace: str) -> list[int]:
    """The pids a pod printed, once it has (`PIDS <main> [<helper>]`)."""
    line = eventually(f"{pod} running", lambda: printed(kubelet, pod, namespace, "PIDS "), kubelet.all_logs)
    return [int(p) for p in line.split()[1:]]


def release(plane: ControlPlane, namespace: str, name: str) -> None:
    plane.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/pods/{name}",
        {"metadata": {"finalizers": None}},
        "application/merge-patch+json",
    )


def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_and_is_reported_before_it_goes(
    control_plane: ControlPlane, namespace: str, kubelet: ProcessKubelet
):
    for name, script, grace in (("stubborn", STUBBORN, 3), ("polite", POLITE, 600)):
        pod = bare_pod(name, kubelet, python_container(script), terminationGracePeriodSeconds=grace)
        pod["metadata"]["finalizers"] = [HOLD]
        create(control_plane, namespace, pod)
    stubborn_pids, polite_pids = pids(kubelet, "stubborn", namespace), pids(kubelet, "polite", namespace)

    deleted_at = time.monotonic()
    for name in ("stubborn", "polite"):
        control_plane.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")  # the pod's own grace

    def finished(name: str) -> dict | None:
        pod = get_pod(control_plane, namespace, name)  # held by our finalizer once the kubelet deleted it
        return pod if pod and pod["metadata"].get("deletionGracePeriodSeconds") == 0 else None

    polite = eventually("polite finished", lambda: finished("polite"), kubelet.all_logs)
    polite_s = time.monotonic() - deleted_at
    stubborn = eventually("stubborn finished", lambda: finished("stubborn"), kubelet.all_logs)
    stubborn_s = time.monotonic() - deleted_at
    for name in ("stubborn", "polite"):
        release(control_plane, namespace, name)

    # polite exits on SIGTERM: done at once (its 600 s grace is a limit, not a wait), Succeeded with exit code 0.
    assert polite_s < 20, polite_s
    assert printed(kubelet, "polite", namespace, "SIGTERM: bye")
    assert polite["status"]["phase"] == "Succeeded" and terminated(polite)["exitCode"] == 0
    assert not alive(polite_pids[0])
    # stubborn ignores SIGTERM: killed when its 3 s are over, with the process it started in a session of its own.
    assert 3 <= stubborn_s < 3 + 20, stubborn_s
    assert printed(kubelet, "stubborn", namespace, "SIGTERM ignored")
    assert stubborn["status"]["phase"] == "Failed"
    assert (terminated(stubborn)["exitCode"], terminated(stubborn)["reason"]) == (137, "Error")
    assert not any(alive(pid) for pid in stubborn_pids), stubborn_pids


def test_a_crash_reports_exit_137_and_a_force_deletion_kills_at_once(
    control_plane: ControlPlane, namespace: str, kubelet: ProcessKubelet
):
    for name in ("crash", "forced"):
        create(control_plane, namespace, bare_pod(name, kubelet, python_container(STUBBORN)))
    crash_pids, forced_pids = pids(kubelet, "crash", namespace), pids(kubelet, "forced", namespace)

    kubelet.kill_container("crash", signal.SIGKILL, namespace=namespace)  # the main process dies, as by OOM
    crash = eventually(
        "crash reported Failed",
        lambda: (p := get_pod(control_plane, namespace, "crash")) and p["status"]["phase"] == "Failed" and p,
        kubelet.all_logs,
    )
    assert (terminated(crash)["exitCode"], terminated(crash)["reason"]) == (137, "Error")
    eventually("the crashed container's other process gone", lambda: not alive(crash_pids[1]), kubelet.all_logs, 10)

    body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
    control_plane.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/forced", body)
    assert get_pod(control_plane, namespace, "forced") is None  # gone from the API at once: nothing waits
    eventually(
        "the force-deleted pod's processes killed",
        lambda: not any(alive(pid) for pid in forced_pids),
        kubelet.all_logs,
        timeout_s=15,
    )


# -- volumes ---------------------------------------------------------------------------------------------------
def test_a_configmap_volume_waits_for_its_configmap_and_follows_its_changes(
    control_plane: ControlPlane, namespace: str, kubelet: ProcessKubelet
):
    script = """
        import time
        path = "/etc/settings/mode"
        print("mode " + open(path).read(), flush=True)
        while open(path).read() != "v2":
            time.sleep(0.2)
        print("mode v2", flush=True)
    """
    container = python_container(
        script,
        volumeMounts=[{"name": "settings", "mountPath": "/etc/settings"}],
        env=[{"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}}],
    )
    pod = bare_pod("reader", kubelet, container, volumes=[{"name": "settings", "configMap": {"name": "settings"}}])
    create(control_plane, namespace, pod)

    def waiting() -> dict | None:
        statuses = ((get_pod(control_plane, namespace, "reader") or {}).get("status") or {}).get("containerStatuses")
        return (statuses or [{}])[0].get("state", {}).get("waiting")

    state = eventually("reader waiting for its ConfigMap", waiting, kubelet.all_logs)
    assert state["reason"] == "ContainerCreating" and 'configmap "settings" not found' in state["message"], state

    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}}
    create(control_plane, namespace, {**configmap, "data": {"mode": "v1", "level": "3"}})
    eventually("reader started", lambda: printed(kubelet, "reader", namespace, "mode v1"), kubelet.all_logs)
    assert kubelet.pod_env("reader", namespace=namespace)["LEVEL"] == "3"
    control_plane.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/configmaps/settings",
        {"data": {"mode": "v2"}},
        "application/merge-patch+json",
    )
    done = eventually(
        "reader saw v2 and exited",
        lambda: (p := get_pod(control_plane, namespace, "reader")) and p["status"]["phase"] == "Succeeded" and p,
        kubelet.all_logs,
    )
    assert terminated(done)["exitCode"] == 0
    assert printed(kubelet, "reader", namespace, "mode v2")
