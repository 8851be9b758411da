"""The operator at scale: many TrainingRuns of 8-node gangs on hundreds of kwok GPU nodes, on a real control plane.

    python benchmarks/operator_scale.py --runs 100 500            # 520 nodes; each size on a fresh control plane
    python benchmarks/operator_scale.py --runs 10 --nodes 40       # a small validation run (~11 minutes)
    python benchmarks/operator_scale.py --runs 3 --gang 2 --nodes 6 --steady-seconds 10 --failures 1 \\
        --failure-wait 30 --setting STAGERUN_RECONCILE_SECONDS=2   # a smoke run (tests/test_benchmarks.py)

It stands in for a busy production cluster: the real v1.36 kube-apiserver, etcd, controller-manager (Job
controller, garbage collector), scheduler and kwok of tests/cluster/ (build them with tests/cluster/build.sh), and
the real operator, started as `stagerun operator` is in the chart (a separate process, the chart's
operator.settings as its environment), so its RSS and CPU time are read from /proc. Per size it:

1. adds --nodes kwok nodes with 8 nvidia.com/gpu each, installs the CRD (`kubectl apply --server-side -f crds/`);
2. applies --runs TrainingRuns (examples/multinode-gpu.yaml as an --gang-node gang of --gpus-per-pod GPUs per pod)
   by server-side apply, in bursts, and times apply -> the first attempt's Job, as a watch on Jobs sees it;
3. waits for the gangs' pods to run, then reads the operator's CPU time and reconciles over a steady window;
   then creates --new-runs more runs one at a time among the running ones, and times apply -> Job for those too
   (a cluster in use, where a burst of hundreds is the exception);
4. fails one rank of --failures running gangs as a kubelet would (the pod's /status: Failed, exit code 1) and times
   failure -> teardown started (the operator deletes the Job) and failure -> the next attempt's Job.

Reconciles are counted from the operator's log (kopf's "Handler 'on_change' ..." and "Timer 'on_timer' ..." lines):
they count every reconcile, including those that raise, and need no metrics endpoint. Everything is bounded
(--timeout for the whole invocation); a latency that was not seen before its wait ended is printed as ">x", its
lower bound. Timings are what a loaded machine gives: compare runs made on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the control plane lives with the tests (tests/cluster/), not the package

from cluster import binaries  # noqa: E402
from cluster.control_plane import ApiError, ControlPlane  # noqa: E402
from cluster.processes import Process, free_ports, listening_addresses, stop_all  # noqa: E402

NAMESPACE = "scale"
EXAMPLE = ROOT / "examples" / "multinode-gpu.yaml"
VALUES = ROOT / "charts" / "stagerun" / "values.yaml"
GPUS_PER_NODE = 8
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"  # the example's nodeSelector: the nodes carry it, as GPU feature discovery would
LOOPBACK_PREFIXES = ("127.", "::1")
COLUMNS = (
    "runs|gang pods|nodes|Jobs|apply→Job median s|apply→Job p95 s|new run→Job median s|new run→Job p95 s|failures|"
    "failure→teardown median s|failure→teardown p95 s|failure→new attempt median s|failure→new attempt p95 s|"
    "reconciles/s|CPU % of a core|CPU ms/reconcile|RSS MB|peak RSS MB|reconcile errors"
).split("|")
RECONCILE_LINE = re.compile(r"(?:Handler|Timer) '(?:on_change|on_timer)[^']*' (succeeded|failed)")
PREVIOUS = (
    "Previous measurement (issue 13 item 1: 2-pod gangs, one operator process, real v1.36 apiserver, kwok): 50 runs "
    "apply→Job p95 0.86 s at 31 % of a core; 150 runs on 300 nodes apply→Job median 18.8 s, p95 58.7 s, 80 % of a "
    "core, 177 MB RSS."
)


# -- talking to the apiserver ------------------------------------------------------------------------------------
class Api:
    """The admin's calls to the test apiserver (loopback, its own CA), plus a raw watch stream of JSON lines."""

    def __init__(self, plane: ControlPlane) -> None:
        self.host, self.port = "127.0.0.1", plane.api_port
        self.token = plane.token
        self.ssl = ssl.create_default_context(cafile=str(plane.pki.ca_cert))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"https://{self.host}:{self.port}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", content_type)
        req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=60) as reply:
                return json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            status = json.loads(exc.read() or b"{}")  # a metav1.Status: its message says what was wrong
            raise ApiError(exc.code, status.get("message", str(exc.reason)), method, path) from None

    def count(self, path: str) -> int:
        """How many objects a list returns, fetching metadata only (a list of 4,000 pods is megabytes otherwise)."""
        accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
        return len(self.request("GET", path, accept=accept).get("items") or [])

    def stream(self, path: str, stop: threading.Event) -> Iterator[dict]:
        """The events of one watch request until the server ends it (timeoutSeconds) or `stop` is set."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=90)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            reply = conn.getresponse()
            if reply.status != 200:
                raise OSError(f"watch {path}: {reply.status} {reply.read()[:300]!r}")
            while not stop.is_set():
                line = reply.readline()
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()


class JobWatch:
    """When each attempt's Job first appeared and when its deletion began, as a watch on the namespace's Jobs saw it
    (receipt times on this process's monotonic clock: one watch, rather than a poll per run)."""

    def __init__(self, api: Api, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.created: dict[tuple[str, int], float] = {}
        self.deleting: dict[tuple[str, int], float] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)
        self._path = f"/apis/batch/v1/namespaces/{namespace}/jobs"

    def start(self) -> None:
        self._resource_version = self._list()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()  # the stream ends at the server's timeoutSeconds at the latest; the thread is a daemon

    def _list(self) -> str:
        listing = self.api.request("GET", self._path)
        for job in listing["items"]:
            self._record("ADDED", job)
        return listing["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            query = urllib.parse.urlencode(
                {"watch": "1", "resourceVersion": self._resource_version, "allowWatchBookmarks": "true"}
            )
            try:
                for event in self.api.stream(f"{self._path}?{query}&timeoutSeconds=60", self._stop):
                    obj = event["object"]
                    if event["type"] == "ERROR":  # 410 Gone: the resourceVersion is too old; start from a list
                        self._resource_version = self._list()
                        break
                    self._resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._record(event["type"], obj)
            except (OSError, http.client.HTTPException, ValueError):
                time.sleep(0.5)  # a dropped stream: resume from the last resourceVersion seen

    def _record(self, kind: str, job: dict) -> None:
        now = time.monotonic()
        labels = job["metadata"].get("labels") or {}
        if "stagerun.io/run" not in labels:
            return
        key = (labels["stagerun.io/run"], int(labels.get("stagerun.io/attempt", "0")))
        with self.changed:
            self.created.setdefault(key, now)
            if kind == "DELETED" or job["metadata"].get("deletionTimestamp"):
                self.deleting.setdefault(key, now)
            self.changed.notify_all()

    def wait(self, done: Callable[[], bool], deadline: float, on_change: Callable[[], None] = lambda: None) -> bool:
        with self.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
                on_change()
            return True


# -- the operator as a process ---------------------------------------------------------------------------------
class OperatorProcess:
    """`stagerun operator` with the chart's settings as environment, all namespaces, one replica (--standalone: the
    chart's standby replicas do no work), with the control plane's kubeconfig; kopf's health endpoint on loopback
    tells when it is up."""

    def __init__(self, plane: ControlPlane, settings: dict[str, str], logs: Path) -> None:
        self.health_port = free_ports(1)[0]
        env = {"KUBECONFIG": str(plane.kubeconfig), "PYTHONUNBUFFERED": "1", **settings}
        args = [sys.executable, "-m", "stagerun.trainer.cli", "operator", "--standalone", "-A"]
        args.append(f"--liveness=http://127.0.0.1:{self.health_port}/healthz")
        self.process = Process("stagerun-operator", args, logs, env=env)
        self.pid = self.process.popen.pid

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.process.check_running()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as reply:
                    if reply.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"the operator's /healthz did not answer in {timeout_s:.0f} s:\n{self.process.log_tail()}")

    def cpu_seconds(self) -> float:
        """utime + stime of the operator process, all its threads (fields 14 and 15 of /proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM: the peak RSS) in MB."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB
        return values["VmRSS"], values["VmHWM"]

    def log_counts(self) -> tuple[int, int]:
        """(reconciles finished, reconciles that raised) so far, from kopf's per-handler log lines."""
        text = self.process.log.read_text(errors="replace")
        outcomes = RECONCILE_LINE.findall(text)
        return len(outcomes), outcomes.count("failed")

    def listening_addresses(self) -> set[str]:
        return listening_addresses(self.pid)

    def stop(self) -> None:
        stop_all([self.process])


def chart_settings(overrides: list[str]) -> dict[str, str]:
    """The chart's operator.settings (what a default install runs with), then NAME=VALUE overrides."""
    settings = {name: str(value) for name, value in yaml.safe_load(VALUES.read_text())["operator"]["settings"].items()}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("STAGERUN_"):
            raise SystemExit(f"--setting {item!r}: expected STAGERUN_NAME=VALUE")
        settings[name] = value
    return settings


# -- what is applied -------------------------------------------------------------------------------------------
class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML is YAML 1.1, where `3e-4` is a string; kubectl (YAML 1.2) sends a number, which the CRD's schema wants."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


def training_run(name: str, gang: int, gpus_per_pod: int) -> dict:
    """examples/multinode-gpu.yaml as a `gang`-pod run: no Kueue queue (nothing would admit it), and no
    ServiceAccount, PriorityClass or Secret the test cluster lacks (admission would refuse the pods)."""
    manifest = yaml.load(EXAMPLE.read_text(), Loader=_Yaml12Loader)
    manifest["metadata"] = {"name": name, "namespace": NAMESPACE, "labels": manifest["metadata"]["labels"]}
    spec = manifest["spec"]
    spec.pop("queueName")
    # Small CPU and memory requests: the example's whole-node ones would not fit 8 pods on a node.
    spec["resources"].update(nodes=gang, gpusPerNode=gpus_per_pod, cpu="1", memory="4Gi", sharedMemory="2Gi")
    spec["checkpoint"].pop("credentialsSecret")
    spec["checkpoint"]["path"] = f"s3://example-llm/runs/{name}"
    scheduling = spec["scheduling"]
    for absent in ("priorityClassName", "serviceAccountName", "affinity"):  # affinity: keep the scheduler's work small
        scheduling.pop(absent)
    return manifest


def add_nodes(plane: ControlPlane, count: int) -> None:
    labels = {"nvidia.com/gpu.product": GPU_PRODUCT}

    def add(index: int) -> None:
        zone = {"topology.kubernetes.io/zone": f"zone-{index % 4}"}
        plane.add_node(f"gpu-{index:04d}", gpus=GPUS_PER_NODE, labels={**labels, **zone}, wait=False)

    with ThreadPoolExecutor(8) as pool:
        list(tqdm(pool.map(add, range(count)), total=count, desc="nodes", file=sys.stderr, mininterval=1))


def poll_until(what: str, done: Callable[[], bool], until: float, interval_s: float = 2.0) -> None:
    """Poll every `interval_s` (a list of hundreds of nodes is not free for a 2-core apiserver either)."""
    while not done():
        if time.monotonic() > until:
            raise TimeoutError(f"{what}: not reached in time")
        time.sleep(interval_s)


def ready_nodes(api: Api) -> int:
    ready = 0
    for node in api.request("GET", "/api/v1/nodes")["items"]:
        conditions = (node.get("status") or {}).get("conditions") or []
        ready += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return ready


def fail_one_rank(api: Api, pod: dict) -> None:
    """What a kubelet reports when the trainer exits with code 1: the pod Failed, its container terminated."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = ((pod["status"].get("containerStatuses") or [{}])[0].get("state") or {}).get("running", {})
    terminated = {"exitCode": 1, "reason": "Error", "startedAt": started.get("startedAt", now), "finishedAt": now}
    not_ready = {"status": "False", "reason": "PodFailed", "lastTransitionTime": now}
    patch = {
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "Ready", **not_ready}, {"type": "ContainersReady", **not_ready}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": False,
                    "started": False,
                    "state": {"running": None, "terminated": terminated},
                }
            ],
        }
    }
    path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}/status"
    api.request("PATCH", path, patch, content_type="application/strategic-merge-patch+json")


def gang_pods(api: Api, run: str, attempt: int) -> list[dict]:
    selector = urllib.parse.quote(f"stagerun.io/run={run},stagerun.io/attempt={attempt}")
    return api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")["items"]


def gang_running(pods: list[dict], gang: int) -> bool:
    running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return len(running) == gang


# -- statistics --------------------------------------------------------------------------------------------------
def percentile(seen: list[float], unseen: list[float], q: float) -> str:
    """Nearest-rank percentile of every sample; `unseen` are lower bounds (waited that long, not seen yet), so a
    percentile that falls on one is printed as ">x"."""
    samples = sorted([(v, False) for v in seen] + [(v, True) for v in unseen])
    if not samples:
        return "n/a"
    value, censored = samples[max(math.ceil(q / 100 * len(samples)) - 1, 0)]
    return f">{value:.2f}" if censored else f"{value:.2f}"


def latencies(starts: dict[str, float], ends: dict[str, float], until: float) -> tuple[list[float], list[float]]:
    seen = [ends[k] - t for k, t in starts.items() if k in ends]
    unseen = [until - t for k, t in starts.items() if k not in ends]
    return seen, unseen


# -- one size ----------------------------------------------------------------------------------------------------
@dataclass
class Size:
    runs: int
    gang: int
    nodes: int
    gpus_per_pod: int
    notes: list[str] = field(default_factory=list)


def measure(args: argparse.Namespace, size: Size, deadline: float, work: Path) -> dict[str, str]:
    """One size on a fresh control plane: every column of its row."""
    plane = ControlPlane(work / f"cluster-{size.runs}")
    operator: OperatorProcess | None = None
    watch: JobWatch | None = None
    began = time.monotonic()
    plane.start()
    try:
        api = Api(plane)
        print(f"control plane ready in {plane.ready_after_s:.1f} s", file=sys.stderr, flush=True)
        prepare_cluster(plane, api, size)
        operator = start_operator(plane, args, size)
        watch = JobWatch(api, NAMESPACE)
        watch.start()
        names = [f"run-{index:04d}" for index in range(size.runs)]
        row = first_jobs(api, watch, operator, names, size, args, deadline)
        running = wait_for_pods(api, size, min(deadline, time.monotonic() + args.settle_wait))
        size.notes.append(f"pods Running before the steady window: {running}/{size.runs * size.gang}")
        row |= steady_window(operator, min(args.steady_seconds, max(deadline - time.monotonic() - 60, 1)))
        row |= new_runs(api, watch, operator, size, args, deadline)
        row |= relaunches(api, watch, operator, names, size, args, deadline)
        rss, peak = operator.memory_mb()
        reconciles, errors = operator.log_counts()
        row |= {"RSS MB": f"{rss:.0f}", "peak RSS MB": f"{peak:.0f}", "reconcile errors": str(errors)}
        size.notes.append(f"operator: {reconciles} reconciles logged in all")
    finally:
        if watch is not None:
            watch.stop()
        if operator is not None:
            operator.stop()
        plane.stop()
    size.notes.append(f"wall time of this size: {time.monotonic() - began:.0f} s")
    return {"runs": str(size.runs), "gang pods": str(size.gang), "nodes": str(size.nodes), **row}


def prepare_cluster(plane: ControlPlane, api: Api, size: Size) -> None:
    """The GPU nodes (all Ready), the CRD (Established) and the runs' namespace."""
    add_nodes(plane, size.nodes)
    poll_until(f"{size.nodes} nodes Ready", lambda: ready_nodes(api) == size.nodes, time.monotonic() + 300)
    plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=Established", "crd/trainingruns.stagerun.io", "--timeout=60s")
    plane.create_namespace(NAMESPACE)


def start_operator(plane: ControlPlane, args: argparse.Namespace, size: Size) -> OperatorProcess:
    operator = OperatorProcess(plane, chart_settings(args.setting), plane.logs)
    operator.wait_ready()
    listening = operator.listening_addresses()
    if not all(address.startswith(LOOPBACK_PREFIXES) for address in listening):
        raise RuntimeError(f"the operator listens beyond loopback: {sorted(listening)}")
    size.notes.append(f"operator listening on {sorted(listening)}")
    return operator


def first_jobs(
    api: Api,
    watch: JobWatch,
    operator: OperatorProcess,
    names: list[str],
    size: Size,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, str]:
    """Apply every run, then wait for each one's first Job: the apply -> Job columns."""
    applied = apply_runs(api, names, size, args)
    seen = lambda: sum((name, 1) in watch.created for name in names)  # noqa: E731
    with tqdm(total=size.runs, desc="apply → Job", file=sys.stderr, mininterval=1) as bar:

        def progress() -> None:
            operator.process.check_running()  # a crashed operator says why now, not after the wait
            bar.update(seen() - bar.n)

        watch.wait(lambda: seen() == size.runs, min(deadline, time.monotonic() + args.job_wait), progress)
    created = {name: watch.created[(name, 1)] for name in names if (name, 1) in watch.created}
    apply_seen, apply_unseen = latencies(applied, created, time.monotonic())
    return {
        "Jobs": f"{len(created)}/{size.runs}",
        "apply→Job median s": percentile(apply_seen, apply_unseen, 50),
        "apply→Job p95 s": percentile(apply_seen, apply_unseen, 95),
    }


def new_runs(
    api: Api, watch: JobWatch, operator: OperatorProcess, size: Size, args: argparse.Namespace, deadline: float
) -> dict[str, str]:
    """Runs created one at a time while the others are running (a cluster in use, rather than a burst of hundreds):
    the new run -> Job columns."""
    names = [f"new-{index:03d}" for index in range(args.new_runs)]
    applied: dict[str, float] = {}
    for name in tqdm(names, desc="new run → Job", file=sys.stderr, mininterval=1):
        if time.monotonic() > deadline - 120:
            break
        manifest = training_run(name, size.gang, size.gpus_per_pod)
        path = f"/apis/stagerun.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns/{name}"
        applied[name] = time.monotonic()
        query = "?fieldManager=operator-scale&force=true"
        api.request("PATCH", path + query, manifest, content_type="application/apply-patch+yaml")
        watch.wait(lambda n=name: (n, 1) in watch.created, time.monotonic() + args.new_run_spacing)
        operator.process.check_running()
        time.sleep(max(0.0, applied[name] + args.new_run_spacing - time.monotonic()))
    watch.wait(lambda: all((n, 1) in watch.created for n in applied), min(deadline - 60, time.monotonic() + 30))
    created = {n: watch.created[(n, 1)] for n in applied if (n, 1) in watch.created}
    seen, unseen = latencies(applied, created, time.monotonic())
    size.notes.append(f"new runs applied one at a time every {args.new_run_spacing:g} s: {len(created)}/{len(applied)}")
    return {"new run→Job median s": percentile(seen, unseen, 50), "new run→Job p95 s": percentile(seen, unseen, 95)}


def relaunches(
    api: Api,
    watch: JobWatch,
    operator: OperatorProcess,
    names: list[str],
    size: Size,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, str]:
    """Fail a rank in a sample of running gangs, then wait for teardown and the next attempt: those columns."""
    failed_at = inject_failures(api, names, size, args, deadline)
    done = lambda: all((n, 1) in watch.deleting and (n, 2) in watch.created for n in failed_at)  # noqa: E731
    with tqdm(total=len(failed_at), desc="failure → new attempt", file=sys.stderr, mininterval=1) as bar:

        def progress() -> None:
            operator.process.check_running()
            bar.update(sum((name, 2) in watch.created for name in failed_at) - bar.n)

        watch.wait(done, min(deadline - 20, time.monotonic() + args.failure_wait), progress)
    end = time.monotonic()
    teardown = latencies(failed_at, {n: watch.deleting[(n, 1)] for n in failed_at if (n, 1) in watch.deleting}, end)
    relaunch = latencies(failed_at, {n: watch.created[(n, 2)] for n in failed_at if (n, 2) in watch.created}, end)
    return {
        "failures": str(len(failed_at)),
        "failure→teardown median s": percentile(*teardown, 50),
        "failure→teardown p95 s": percentile(*teardown, 95),
        "failure→new attempt median s": percentile(*relaunch, 50),
        "failure→new attempt p95 s": percentile(*relaunch, 95),
    }


def apply_runs(api: Api, names: list[str], size: Size, args: argparse.Namespace) -> dict[str, float]:
    """Server-side apply, --burst runs at a time (8 connections), a pause between bursts; returns when each
    apply was sent."""
    sent: dict[str, float] = {}

    def apply(name: str) -> None:
        manifest = training_run(name, size.gang, size.gpus_per_pod)
        path = f"/apis/stagerun.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns/{name}"
        sent[name] = time.monotonic()
        query = "?fieldManager=operator-scale&force=true"
        api.request("PATCH", path + query, manifest, content_type="application/apply-patch+yaml")

    with ThreadPoolExecutor(8) as pool, tqdm(total=len(names), desc="apply", file=sys.stderr, mininterval=1) as bar:
        for start in range(0, len(names), args.burst):
            burst = names[start : start + args.burst]
            list(pool.map(apply, burst))
            bar.update(len(burst))
            if start + args.burst < len(names):
                time.sleep(args.burst_pause)
    return sent


def wait_for_pods(api: Api, size: Size, until: float) -> int:
    """Pods Running in the namespace, waited for until every gang that fits runs (or `until`)."""
    fits = min(size.runs, size.nodes * GPUS_PER_NODE // size.gpus_per_pod // size.gang) * size.gang
    path = f"/api/v1/namespaces/{NAMESPACE}/pods?fieldSelector=status.phase%3DRunning"
    running = api.count(path)
    with tqdm(total=fits, desc="pods Running", file=sys.stderr, mininterval=1) as bar:
        while running < fits and time.monotonic() < until:
            time.sleep(3)
            running = api.count(path)
            bar.update(running - bar.n)
    return running


def steady_window(operator: OperatorProcess, seconds: float) -> dict[str, str]:
    """The operator's CPU time and reconciles over `seconds` of steady state (every run Running, nothing changing)."""
    cpu0, (count0, _), t0 = operator.cpu_seconds(), operator.log_counts(), time.monotonic()
    time.sleep(seconds)
    cpu1, (count1, _), t1 = operator.cpu_seconds(), operator.log_counts(), time.monotonic()
    reconciles, cpu, wall = count1 - count0, cpu1 - cpu0, t1 - t0
    return {
        "reconciles/s": f"{reconciles / wall:.2f}",
        "CPU % of a core": f"{100 * cpu / wall:.0f}",
        "CPU ms/reconcile": f"{1e3 * cpu / reconciles:.1f}" if reconciles else "n/a",
    }


def inject_failures(
    api: Api, names: list[str], size: Size, args: argparse.Namespace, deadline: float
) -> dict[str, float]:
    """Fail one rank in each of --failures running gangs spread over the runs, --failure-spacing apart; returns
    when each failure was reported."""
    count = min(args.failures, size.runs)
    sample = [names[index * size.runs // count] for index in range(count)] if count else []
    failed_at: dict[str, float] = {}
    for number, run in enumerate(tqdm(sample, desc="failing a rank", file=sys.stderr, mininterval=1)):
        pods = gang_pods(api, run, 1)
        if time.monotonic() > deadline - 60 or not gang_running(pods, size.gang):
            size.notes.append(f"{run}: gang not running, no failure injected")
            continue
        victim = sorted(pods, key=lambda p: p["metadata"]["name"])[number % size.gang]
        failed_at[run] = time.monotonic()
        fail_one_rank(api, victim)
        time.sleep(args.failure_spacing)
    return failed_at


# -- the report --------------------------------------------------------------------------------------------------
def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def goals(row: dict[str, str]) -> str:
    """Issue 13's goals at this size (they are stated for 500 runs)."""

    def met(cell: str, limit: float) -> str:
        if cell == "n/a":
            return "not measured"
        return "met" if not cell.startswith(">") and float(cell) <= limit else "not met"

    return (
        f"{row['runs']} runs: apply→Job p95 ≤ 1 s: in bursts of --burst {met(row['apply→Job p95 s'], 1)}, one at a "
        f"time among running runs {met(row['new run→Job p95 s'], 1)}; failure→teardown ≤ 2 s (p95) "
        f"{met(row['failure→teardown p95 s'], 2)}; RSS < 200 MB {met(row['peak RSS MB'], 199.99)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=int, nargs="+", default=[100, 500], help="TrainingRuns per size (default 100 500)"
    )
    parser.add_argument("--nodes", type=int, default=520, help="kwok nodes with 8 GPUs each (default 520)")
    parser.add_argument("--gang", type=int, default=8, help="pods per gang: spec.resources.nodes (default 8)")
    parser.add_argument(
        "--gpus-per-pod",
        type=int,
        default=1,
        help="spec.resources.gpusPerNode (default 1: 500 gangs of 8 pods fill 500 nodes of 8 GPUs)",
    )
    parser.add_argument("--burst", type=int, default=50, help="runs applied at once (default 50)")
    parser.add_argument("--burst-pause", type=float, default=2.0, help="seconds between bursts (default 2)")
    parser.add_argument("--job-wait", type=float, default=300, help="longest wait for the first Jobs (default 300 s)")
    parser.add_argument("--settle-wait", type=float, default=300, help="longest wait for pods to run (default 300 s)")
    parser.add_argument("--steady-seconds", type=float, default=60, help="the CPU/reconcile window (default 60 s)")
    parser.add_argument(
        "--new-runs", type=int, default=20, help="runs created one at a time once the others run (default 20)"
    )
    parser.add_argument(
        "--new-run-spacing", type=float, default=2.0, help="seconds between two of those creations (default 2)"
    )
    parser.add_argument("--failures", type=int, default=20, help="gangs that lose a rank (default 20)")
    parser.add_argument("--failure-spacing", type=float, default=1.0, help="seconds between failures (default 1)")
    parser.add_argument(
        "--failure-wait",
        type=float,
        default=660,
        help="longest wait for the new attempts (default 660 s: survivors may take their 600 s grace)",
    )
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="override a chart operator.setting"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="hard cap on the whole invocation (default 1800 s)")
    parser.add_argument("--work", type=Path, help="where the control planes live (default: a new temp dir, removed)")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if binaries.missing():
        print(binaries.skip_reason(), file=sys.stderr)
        return 2
    began = time.monotonic()
    deadline = began + args.timeout
    work = args.work or Path(tempfile.mkdtemp(prefix="stagerun-scale-"))
    rows, notes = [], []
    settings = chart_settings(args.setting)
    load_before = os.getloadavg()[0]
    try:
        for runs in args.runs:
            if deadline - time.monotonic() < 120:
                notes.append(f"{runs} runs: skipped, the --timeout {args.timeout:.0f} s was spent")
                continue
            size = Size(runs, args.gang, max(args.nodes, 1), args.gpus_per_pod)
            print(f"== {runs} runs of {args.gang}-pod gangs on {size.nodes} nodes", file=sys.stderr, flush=True)
            rows.append(measure(args, size, deadline, work))
            notes += [f"{runs} runs: {note}" for note in size.notes]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        f"operator settings: {' '.join(f'{k}={v}' for k, v in sorted(settings.items()))}; "
        f"{args.gpus_per_pod} GPU(s) per pod, {GPUS_PER_NODE} per node; {os.cpu_count()} CPUs, load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    text = "\n".join(
        [header, "", markdown(rows), "", *[f"- {n}" for n in notes], *[f"- goal, {goals(r)}" for r in rows], ""]
    )
    text += f"\n{PREVIOUS}\n\nwall time: {time.monotonic() - began:.0f} s"
    print(text, flush=True)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
