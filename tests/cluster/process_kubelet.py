"""A kubelet for the test control plane whose containers are local processes: for the tests where pods must train.

`ProcessKubelet(plane, workdir, nodes=2)` stands in for the kubelets (and the container runtime, CNI plugin and
cluster DNS) of `nodes` real nodes, talking only to the real apiserver:

- it registers its Nodes without kwok's annotation (so kwok leaves them alone), keeps their Leases renewed, and
  labels and taints them so that only pods with `placement()` land there (process_node.py);
- it watches the pods bound to each node (pod_watch.py) and starts each container's command as a local process
  under container_init.py (which stands in for the container's PID namespace), with the environment, volumes and
  DNS names of pod_rewrite.py and pod_network.py: each pod on its own loopback address;
- it reports what a kubelet reports through the pod's /status subresource (pod_status.py): addresses, phase,
  conditions, container states with exit codes and termination messages;
- a pod with a deletionTimestamp gets SIGTERM to each container's main process (as a runtime signals PID 1 only;
  `stagerun launch` forwards it to torchrun), and every process of the container is killed after
  min(deletionGracePeriodSeconds, `max_grace_s`), a shortened grace taking effect at once; the kubelet then reports
  the final state and deletes the pod with gracePeriodSeconds=0, which is how a kubelet ends a graceful deletion.
  A pod gone from the API (force-deleted) has its processes killed at once.

Not modelled: init containers, probes, restartPolicy other than Never, resource limits (no cgroups), image pulls,
the kubelet's HTTPS API (`kubectl logs`: tests read `logs(pod)`), node-scoped credentials (it acts as admin).
Each pod's files are in `<workdir>/pods/<namespace>.<pod>/` (volumes, `<container>.log`, termination logs);
`<workdir>/kubelet.log` is the kubelet's journal of what it did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import container_init, pod_network, pod_rewrite, pod_status, process_node
from .control_plane import ApiError, ControlPlane
from .pod_watch import PodWatch

INIT = Path(container_init.__file__)
TERMINAL = ("Succeeded", "Failed")
RETRY_START_S = 1.0  # a pod waiting for a ConfigMap/Secret is tried again this often


@dataclass
class ContainerRun:
    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: Path
    termination_log: Path
    policy: str
    init: subprocess.Popen | None = None
    started_at: str = ""
    result: dict | None = None  # the `terminated` state once its process ended (or could not start)

    @property
    def pid_file(self) -> Path:
        return self.log.with_suffix(".pid")

    def alive(self) -> bool:
        return self.init is not None and self.init.poll() is None

    def status(self) -> dict:
        state = {"terminated": self.result} if self.result else {"running": {"startedAt": self.started_at}}
        return pod_status.container_status(
            self.name, self.image, f"process://{self.init.pid if self.init else 0}", state
        )


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    address: str
    files: pod_rewrite.PodFiles
    containers: list[ContainerRun]
    terminating_since: float | None = None
    reported: bool = False
    refreshed_at: float = field(default_factory=time.monotonic)

    def alive(self) -> list[ContainerRun]:
        return [c for c in self.containers if c.alive()]


class ProcessKubelet:
    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        nodes: int = 2,
        *,
        max_grace_s: float = 30.0,
        extra_env: dict[str, str] | None = None,
        cpu: str = "16",
        memory: str = "64Gi",
        gpus: int = 0,
        interval_s: float = 0.2,
        refresh_s: float = 2.0,
    ):
        self.plane = plane
        self.workdir = Path(workdir)
        self.id = uuid.uuid4().hex[:6]
        self.nodes = [f"proc-{self.id}-{i}" for i in range(nodes)]
        self.max_grace_s = max_grace_s
        self.extra_env = dict(extra_env or {})
        self.capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            self.capacity["nvidia.com/gpu"] = str(gpus)
        self.interval_s, self.refresh_s = interval_s, refresh_s
        self.addresses = pod_network.PodAddresses()
        self._lock = threading.RLock()  # guards _runs (the sync thread writes it, tests read it)
        self._runs: dict[str, PodRun] = {}  # uid -> what runs (or ran) for the pod
        self._waiting: dict[str, tuple[float, dict]] = {}  # uid -> (next try, the waiting status last written)
        self._removed: set[str] = set()  # uids this kubelet deleted with grace 0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._watches = [PodWatch(plane, node, self._wake.set, self._note) for node in self.nodes]
        self._threads: list[threading.Thread] = []
        self._journal = self.workdir / "kubelet.log"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> ProcessKubelet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                body = process_node.node_object(node, self.id, self.capacity)
                created = self.plane.request("POST", "/api/v1/nodes", body)
                self.plane.request("POST", process_node.LEASES, process_node.lease_object(created))
            # Every container is started by the sync thread: their parent-death signal is tied to that thread,
            # which lives exactly as long as the kubelet.
            for name, target in (("heartbeat", self._heartbeat), ("sync", self._sync_loop)):
                thread = threading.Thread(target=target, name=f"kubelet-{self.id}-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
            for watch in self._watches:
                watch.start()
            for node in self.nodes:
                self.plane.wait_until(
                    f"node {node} Ready and schedulable",
                    lambda node=node: process_node.schedulable(self.plane.request("GET", f"/api/v1/nodes/{node}")),
                    timeout_s=60,
                )
        except BaseException:
            self.stop()  # no node, lease or thread of a kubelet that never came up is left behind
            raise

    def stop(self) -> None:
        """Kill every container, stop watching, and remove the Nodes (their pods are orphans for the pod GC)."""
        self._stopping.set()
        self._wake.set()
        for watch in self._watches:
            if watch.started:
                watch.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._lock:
            for run in self._runs.values():
                self._kill(run)
        for node in self.nodes:
            self._call("DELETE", process_node.lease_path(node))
            self._call("DELETE", f"/api/v1/nodes/{node}")

    def placement(self) -> dict:
        """The nodeSelector and toleration a pod spec needs to run here (the operator's `scheduling` takes both)."""
        return process_node.placement(self.id)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(process_node.RENEW_SECONDS):
            for node in self.nodes:
                renewal = {"spec": {"renewTime": process_node.micro_time()}}
                try:
                    self._call("PATCH", process_node.lease_path(node), renewal, "application/merge-patch+json")
                except (OSError, ApiError) as exc:  # a slow apiserver: the next renewal is due in a few seconds
                    self._note(f"renewing the lease of {node} failed: {exc}")

    # -- the sync loop ---------------------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval_s)  # a watch event, or the next look at the processes
            self._wake.clear()
            if self._stopping.is_set():
                return
            pods = [(watch.node, pod) for watch in self._watches for pod in watch.pods()]
            for node, pod in pods:
                try:
                    self._sync(node, pod)
                except Exception as exc:  # one pod's trouble must not stop the node: logged, retried next pass
                    self._note(f"sync of {pod['metadata']['name']} failed: {type(exc).__name__}: {exc}")
            present = {pod["metadata"]["uid"] for _, pod in pods}
            for uid, run in list(self._runs.items()):
                if uid not in present and run.alive():
                    self._note(f"{run.namespace}/{run.name} is gone from the API: killing its containers")
                    self._kill(run)

    def _sync(self, node: str, pod: dict) -> None:
        meta = pod["metadata"]
        run = self._runs.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            self._terminate(pod, run)
        elif run is None:
            if (pod.get("status") or {}).get("phase") not in TERMINAL:
                self._start(node, pod)
        elif not run.reported:
            if not run.alive():
                self._report_terminated(run)
            elif time.monotonic() - run.refreshed_at > self.refresh_s:
                run.files.refresh()
                run.refreshed_at = time.monotonic()

    # -- starting a pod ---------------------------------------------------------------------------------------
    def _start(self, node: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid, namespace = meta["uid"], meta["namespace"]
        if time.monotonic() < self._waiting.get(uid, (0.0, {}))[0]:
            return
        address = self.addresses.of_pod(pod, self._controller_job(pod))
        root = self.workdir / "pods" / f"{namespace}.{meta['name']}"
        root.mkdir(parents=True, exist_ok=True)
        try:
            files = pod_rewrite.PodFiles(
                pod, root, self.workdir / "claims", self._read, self._token_issuer(pod), address
            )
            dns = self._dns(namespace, pod, address)
            containers = [self._container(pod, c, address, files, dns, root) for c in spec.get("containers") or ()]
        except pod_rewrite.MissingVolumeSource as exc:
            self._wait(pod, "ContainerCreating", f"MountVolume.SetUp failed: {exc}")
            return
        except pod_rewrite.ContainerConfigError as exc:
            self._wait(pod, "CreateContainerConfigError", str(exc))
            return
        self._waiting.pop(uid, None)
        run = PodRun(uid, namespace, meta["name"], node, address, files, containers)
        with self._lock:
            self._runs[uid] = run
        for container in containers:
            self._spawn(container)
        commands = "; ".join(_short(" ".join(c.argv)) for c in containers)  # in full at the top of each log
        self._note(f"started {namespace}/{meta['name']} at {address}: {commands}")
        start_time = (pod.get("status") or {}).get("startTime")
        self._patch(run.namespace, run.name, pod_status.running(address, start_time, [c.status() for c in containers]))

    def _container(self, pod: dict, container: dict, address: str, files, dns, root: Path) -> ContainerRun:
        namespace, name = pod["metadata"]["namespace"], container["name"]
        termination_log = root / f"{name}.termination-log"
        termination_log.write_text("")
        table = pod_rewrite.mounts(container, files.paths, termination_log)

        def rewrite(text: str) -> str:
            return pod_network.resolve_names(pod_rewrite.rewrite_paths(text, table), namespace, dns)

        own = pod_rewrite.container_env(
            pod, container, address, self._read, pod_rewrite.service_env(self.plane.api_port)
        )
        own = {key: rewrite(value) for key, value in own.items()}
        env = _host_env()
        env.update(self.extra_env)
        env.update(
            {"PYTHONUNBUFFERED": "1", "HOSTNAME": (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]}
        )
        env.update(own)
        # Where a trainer finds its address and termination file when it is not in a container (core/protocol.py).
        env.update({"STAGERUN_NODE_ADDR": address, "STAGERUN_TERMINATION_LOG": str(termination_log)})
        cwd = rewrite(container["workingDir"]) if container.get("workingDir") else str(root)
        Path(cwd).mkdir(parents=True, exist_ok=True)  # as a runtime creates a missing workingDir
        run = ContainerRun(
            name,
            container.get("image", ""),
            [],
            env,
            cwd,
            root / f"{name}.log",
            termination_log,
            container.get("terminationMessagePolicy") or "File",
        )
        try:
            run.argv = pod_rewrite.command_line(container, own, rewrite)
        except ValueError as exc:  # a runtime's StartError: the container ends before it began
            run.result = pod_status.terminated_state(128, pod_status.now(), str(exc), reason="StartError")
        return run

    def _spawn(self, container: ContainerRun) -> None:
        container.started_at = pod_status.now()
        if container.result is not None:
            return
        with container.log.open("ab") as log:
            log.write(f"$ {' '.join(container.argv)}\n".encode())
            log.flush()
            try:
                container.init = subprocess.Popen(
                    [sys.executable, str(INIT), "--pid-file", str(container.pid_file), "--", *container.argv],
                    env=container.env,
                    cwd=container.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:  # e.g. an environment the kernel refuses: a StartError too
                message = f"cannot start the container: {exc}"
                log.write(f"{message}\n".encode())
                container.result = pod_status.terminated_state(128, container.started_at, message, reason="StartError")

    def _wait(self, pod: dict, reason: str, message: str) -> None:
        """The pod cannot start yet: say why (once per change) and try again soon."""
        meta = pod["metadata"]
        status = pod_status.waiting((pod.get("spec") or {}).get("containers") or [], reason, message)
        last = self._waiting.get(meta["uid"], (0.0, {}))[1]
        self._waiting[meta["uid"]] = (time.monotonic() + RETRY_START_S, status)
        if status != last:
            self._note(f"{meta['namespace']}/{meta['name']} waits: {reason}: {message}")
            self._patch(meta["namespace"], meta["name"], status)

    # -- ending a pod ----------------------------------------------------------------------------------------
    def _terminate(self, pod: dict, run: PodRun | None) -> None:
        meta = pod["metadata"]
        if run is None:  # never started here (waiting for a volume, or ended before): nothing to stop
            self._remove(pod)
            return
        if meta["uid"] in self._removed:  # deleted with grace 0 already; a finalizer (the Job controller's) holds it
            return
        grace = float(meta.get("deletionGracePeriodSeconds") or 0)
        now = time.monotonic()
        if run.terminating_since is None:
            run.terminating_since = now
            if grace > 0 and run.alive():
                self._note(f"{run.namespace}/{run.name} deleted with {grace:.0f} s grace: SIGTERM")
                for container in run.alive():
                    self._signal_main(container, signal.SIGTERM)
        # The grace is read again each pass: a second deletion with a shorter one takes effect at once.
        if run.alive() and now >= run.terminating_since + min(grace, self.max_grace_s):
            self._note(f"{run.namespace}/{run.name}: {'grace over' if grace else 'deleted with 0 s grace'}, SIGKILL")
            self._kill(run)
        if run.alive():
            return
        if not run.reported:
            self._report_terminated(run)
        self._remove(pod)

    def _remove(self, pod: dict) -> None:
        """The last step of a graceful deletion: delete with gracePeriodSeconds=0 (once: finalizers may hold it)."""
        meta = pod["metadata"]
        if meta["uid"] in self._removed:
            return
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        self._call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        self._removed.add(meta["uid"])
        self._waiting.pop(meta["uid"], None)

    def _kill(self, run: PodRun) -> None:
        """Every process of every container, SIGKILL (what a runtime does when the grace is over)."""
        for container in run.containers:
            if container.init is None:
                continue
            container_init.kill_tree(container.init.pid, include_root=False)
            try:
                container.init.wait(timeout=5)  # it exits with the main process's status once that is gone
            except subprocess.TimeoutExpired:
                container.init.kill()
                container.init.wait(timeout=10)

    def _signal_main(self, container: ContainerRun, sig: int) -> None:
        """A signal to the container's main process only, as a runtime sends SIGTERM to PID 1."""
        try:
            os.kill(_main_pid(container), sig)
        except (ProcessLookupError, FileNotFoundError, ValueError):
            pass

    def _report_terminated(self, run: PodRun) -> None:
        for container in run.containers:
            if container.result is None:
                code = container.init.wait()
                code = code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as runtimes say
                message = pod_status.termination_message(
                    code, container.termination_log, container.log, container.policy
                )
                container.result = pod_status.terminated_state(code, container.started_at, message)
        status = pod_status.terminated([c.status() for c in run.containers])
        exits = ", ".join(f"{c.name} exit {c.result['exitCode']}" for c in run.containers)
        self._note(f"{run.namespace}/{run.name} {status['phase']}: {exits}")
        self._patch(run.namespace, run.name, status)
        run.reported = True

    # -- API helpers -----------------------------------------------------------------------------------------
    def _patch(self, namespace: str, name: str, status: dict) -> None:
        # Strategic merge: conditions merge by type, so those of the scheduler and the Job controller stay.
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        self._call("PATCH", path, {"status": status}, "application/strategic-merge-patch+json")

    def _call(self, method: str, path: str, body=None, content_type: str = "application/json"):
        """One API call; a 404 (the object is gone) or 409 (a precondition failed) is no error here."""
        try:
            return self.plane.request(method, path, body, content_type)
        except ApiError as exc:
            if exc.code not in (404, 409):
                raise
            return None

    def _read(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")

    def _token_issuer(self, pod: dict):
        """Issues the pod's ServiceAccount tokens, bound to the pod, through the TokenRequest API (as kubelets do)."""
        meta = pod["metadata"]
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"

        def issue(audience: str | None, seconds: int) -> str:
            request = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [audience] if audience else None,
                    "expirationSeconds": seconds,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
                },
            }
            path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
            return self.plane.request("POST", path, request)["status"]["token"]

        return issue

    def _controller_job(self, pod: dict) -> dict | None:
        owner = pod_network.controller_uid(pod)
        if owner is None:
            return None
        name = next(o["name"] for o in pod["metadata"]["ownerReferences"] if o["uid"] == owner)
        job = self._call("GET", f"/apis/batch/v1/namespaces/{pod['metadata']['namespace']}/jobs/{name}")
        return job if job is not None and job["metadata"]["uid"] == owner else None

    def _dns(self, namespace: str, pod: dict, address: str) -> dict[tuple[str, str], str]:
        """What the cluster DNS would answer in `namespace`: read from its Services, Jobs and running pods."""
        services = self.plane.request("GET", f"/api/v1/namespaces/{namespace}/services")["items"]
        jobs = self.plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
        watched = {p["metadata"]["uid"]: p for watch in self._watches for p in watch.pods()}
        with self._lock:
            known = [
                (watched[r.uid], r.address)
                for r in self._runs.values()
                if r.namespace == namespace and r.uid in watched
            ]
        return pod_network.dns_table(services, jobs, [*known, (pod, address)], self.addresses)

    def _note(self, text: str) -> None:
        with self._journal.open("a") as journal:
            journal.write(f"{datetime.now(UTC).strftime('%H:%M:%S.%f')[:-3]} {text}\n")

    # -- for tests -------------------------------------------------------------------------------------------
    def run_of(self, pod: str, namespace: str | None = None) -> PodRun:
        """The newest run of the pod named `pod` (in `namespace`, if given); LookupError if it never started."""
        with self._lock:
            found = [r for r in self._runs.values() if r.name == pod and namespace in (None, r.namespace)]
        if not found:
            raise LookupError(f"pod {pod!r} never started on this kubelet; see {self._journal}")
        return found[-1]

    def _container_of(self, pod: str, container: str | None, namespace: str | None) -> ContainerRun:
        return next(c for c in self.run_of(pod, namespace).containers if container in (None, c.name))

    def pod_ip(self, pod: str, namespace: str | None = None) -> str:
        return self.run_of(pod, namespace).address

    def main_pid(self, pod: str, container: str | None = None, namespace: str | None = None) -> int:
        return _main_pid(self._container_of(pod, container, namespace))

    def kill_container(
        self, pod: str, sig: int = signal.SIGKILL, container: str | None = None, namespace: str | None = None
    ) -> None:
        """A crash inside the pod: `sig` to the container's main process (the container's other processes die with
        it, as in a PID namespace)."""
        os.kill(self.main_pid(pod, container, namespace), sig)

    def pod_env(self, pod: str, container: str | None = None, namespace: str | None = None) -> dict[str, str]:
        return dict(self._container_of(pod, container, namespace).env)

    def pod_argv(self, pod: str, container: str | None = None, namespace: str | None = None) -> list[str]:
        return list(self._container_of(pod, container, namespace).argv)

    def logs(self, pod: str, container: str | None = None, namespace: str | None = None) -> str:
        """The container's output ('' before it printed anything); its first line is the kubelet's `$ argv`."""
        path = self._container_of(pod, container, namespace).log
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self, max_chars: int = 20_000) -> str:
        """Every container's output (the end of each) and the kubelet's journal: for assertion messages."""
        parts = [
            f"----- {path.parent.name}/{path.name} -----\n{path.read_text(errors='replace')[-max_chars:]}"
            for path in sorted(self.workdir.glob("pods/*/*.log"))
        ]
        if self._journal.exists():
            parts.append(f"----- kubelet journal -----\n{self._journal.read_text()[-max_chars:]}")
        return "\n".join(parts)


def _main_pid(container: ContainerRun, timeout_s: float = 5.0) -> int:
    """The pid of the container's command, which container_init writes right after starting it."""
    deadline = time.monotonic() + timeout_s
    while not container.pid_file.exists():
        if container.init is None or container.init.poll() is not None or time.monotonic() > deadline:
            raise FileNotFoundError(container.pid_file)
        time.sleep(0.01)
    return int(container.pid_file.read_text())


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _host_env() -> dict[str, str]:
    """This process's environment without what would point a pod at another cluster or confuse the trainer."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "STAGERUN_")) and k != "KUBECONFIG"}
