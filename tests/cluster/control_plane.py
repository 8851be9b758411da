"""A real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (fake nodes whose pods get 127.1.x.x addresses), built by tests/cluster/build.sh.

The apiserver runs as a production cluster's does where it matters to an operator: Node+RBAC authorisation, the
admission plugins PodSecurity, OwnerReferencesPermissionEnforcement, ResourceQuota and ServiceAccount, and the
controller-manager's controllers (Job, garbage collector, ServiceAccount tokens, ...) acting with their own
service-account credentials. One static token in system:masters is the admin; tests that must be checked by the
real authoriser use a ServiceAccount's token instead, and the apiserver's audit log (`audit_events()`, audit.py)
records what those accounts asked and what RBAC decided.

Loopback only: every listener binds 127.0.0.1 and kwok hands nodes 127.0.0.1 and pods 127.1.0.0/16, because the
operator dials pod IPs and a test must never send traffic anywhere else. Service ClusterIPs (10.96.0.0/16) are
allocated but nothing dials them.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import audit, binaries
from .pki import Pki, make_pki
from .processes import Process, free_ports, processes_mentioning, stop_all

POD_CIDR = "127.1.0.0/16"
NODE_IP = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")  # nodes carrying it are kwok's; a process kubelet will own others
ADMISSION_PLUGINS = "PodSecurity,OwnerReferencesPermissionEnforcement,ResourceQuota,ServiceAccount"
START_TIMEOUT_S = 120.0  # cold page cache on a busy 2-core machine: ~11 s is usual


class ApiError(Exception):
    def __init__(self, code: int, message: str, method: str, path: str):
        super().__init__(f"{method} {path}: {code} {message}")
        self.code = code
        self.message = message


class ControlPlane:
    """Start with `start()`, stop with `stop()` (which also checks nothing it started is left)."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None, stages_dir: Path | None = None):
        self.workdir = workdir
        self.bin_dir = bin_dir or binaries.bin_dir()
        self.stages_dir = stages_dir or binaries.stages_dir()
        self.logs = workdir / "logs"
        self.token = secrets.token_hex(16)
        self.processes: list[Process] = []
        self.etcd_port, self.api_port, self.cm_port, self.sched_port, self.kwok_port = free_ports(5)
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.audit_log = self.logs / "audit.log"  # ServiceAccounts' requests and RBAC's decisions (audit.py)
        self.pki: Pki | None = None
        self.ready_after_s: float | None = None  # start() -> /readyz and the default ServiceAccount
        self._ssl: ssl.SSLContext | None = None  # verifies the apiserver against pki.ca_cert

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        began = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.workdir / "pki")
        self._ssl = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        self._write_kubeconfig()
        try:
            self._start("etcd", self._etcd_args())
            self.wait_until(
                "etcd /health", lambda: _http_ok(f"http://127.0.0.1:{self.etcd_port}/health", None, b'"health":"true"')
            )
            self._start("kube-apiserver", self._apiserver_args())
            self.wait_until("kube-apiserver /readyz", lambda: self._api_ok("/readyz"))
            self._start("kube-controller-manager", self._controller_manager_args())
            self._start("kube-scheduler", self._scheduler_args())
            self._start("kwok", self._kwok_args())
            insecure = _unverified_tls()  # their serving certs are self-signed; only /healthz is read from them
            self.wait_until(
                "kube-controller-manager /healthz",
                lambda: _http_ok(f"https://127.0.0.1:{self.cm_port}/healthz", insecure),
            )
            self.wait_until(
                "kube-scheduler /healthz", lambda: _http_ok(f"https://127.0.0.1:{self.sched_port}/healthz", insecure)
            )
            self.wait_until("kwok /healthz", lambda: _http_ok(f"http://127.0.0.1:{self.kwok_port}/healthz", None))
            # Pods need it (the ServiceAccount admission plugin refuses pods whose account does not exist yet).
            self.wait_until(
                "ServiceAccount default/default",
                lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            )
        except BaseException:
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - began

    def stop(self) -> None:
        """End every process (clients first, then apiserver, then etcd) and fail if any outlives it."""
        by_name = {p.name: p for p in self.processes}
        for group in (("kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",)):
            stop_all([by_name[n] for n in group if n in by_name])
        left = processes_mentioning(str(self.workdir))
        if left:
            raise RuntimeError("control-plane processes outlived teardown:\n" + "\n".join(left))

    # -- component command lines ---------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> None:
        self.processes.append(Process(name, [str(self.bin_dir / name), *args], self.logs))

    def _etcd_args(self) -> list[str]:
        peer = f"http://127.0.0.1:{free_ports(1)[0]}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        return [
            "--name=test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--unsafe-no-fsync",  # throwaway data: fsync would only make the tests slower
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--cert-dir={self.workdir / 'apiserver'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={ADMISSION_PLUGINS}",
            # Privileged pods are allowed cluster-wide, so a refusal in a `restricted` namespace is PodSecurity's.
            "--allow-privileged=true",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            # The authoriser's own record of what each ServiceAccount asked and was allowed (tests/test_rbac.py).
            f"--audit-policy-file={audit.write_policy(self.workdir / 'audit-policy.yaml')}",
            f"--audit-log-path={self.audit_log}",
        ]

    def _component_args(self, port: int, name: str) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / name}",
        ]

    def _controller_manager_args(self) -> list[str]:
        pki = self.pki
        return [
            *self._component_args(self.cm_port, "kube-controller-manager"),
            # Not the Endpoints/EndpointSlice controllers: the apiserver refuses loopback endpoint addresses, so
            # for every headless Service they would retry for ever (load, log noise); nothing here resolves
            # Services through them (the process kubelet maps DNS names to pod addresses itself).
            "--controllers=*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller",
            "--use-service-account-credentials",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
        ]

    def _scheduler_args(self) -> list[str]:
        return self._component_args(self.sched_port, "kube-scheduler")

    def _kwok_args(self) -> list[str]:
        key, value = KWOK_ANNOTATION
        # Not pod-complete: a Job's pods must stay Running until a test (or a process kubelet) ends them.
        stages = [f"--config={self.stages_dir / name}" for name in binaries.STAGES]
        return [
            f"--kubeconfig={self.kubeconfig}",
            *stages,
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            f"--server-address=127.0.0.1:{self.kwok_port}",
        ]

    def _write_kubeconfig(self) -> None:
        ca = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stagerun-test", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "stagerun-test", "context": {"cluster": "stagerun-test", "user": "admin"}}],
            "current-context": "stagerun-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    # -- waiting and talking to the API --------------------------------------------------------------------
    def wait_until(self, what: str, ready: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for proc in self.processes:
                proc.check_running()  # a component that died says why at once, rather than after the timeout
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.log_tail(15)}" for p in self.processes)
                raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{tails}")
            time.sleep(0.2)

    def _api_ok(self, path: str) -> bool:
        return _http_ok(self.url + path, self._ssl, token=self.token)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        """One call to the apiserver as admin; returns the decoded JSON, or raises ApiError with its status."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            status = json.loads(exc.read() or b"{}")  # a metav1.Status: its message is what a user would see
            raise ApiError(exc.code, status.get("message", str(exc.reason)), method, path) from None

    def audit_events(self, username: str | None = None) -> list[audit.AuditEvent]:
        """Requests of ServiceAccounts outside kube-system (optionally of one user) as the apiserver audited them."""
        return audit.read_events(self.audit_log, username)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The v1.36 kubectl built beside the servers, as admin; check=True raises with its stderr on failure."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    # -- fixtures for tests --------------------------------------------------------------------------------
    def add_node(
        self,
        name: str,
        *,
        gpus: int = 8,
        cpu: str = "64",
        memory: str = "512Gi",
        labels: dict[str, str] | None = None,
        wait: bool = True,
    ) -> dict:
        """A kwok node with `gpus` nvidia.com/gpu (an extended resource, as the device plugin would publish)."""
        key, value = KWOK_ANNOTATION
        resources = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value},
                "labels": {"kubernetes.io/hostname": name, "type": "kwok", **(labels or {})},
            },
            "status": {"capacity": resources, "allocatable": resources},
        }
        self.request("POST", "/api/v1/nodes", node)
        if wait:
            self.wait_until(f"node {name} Ready", lambda: self.node_ready(name), timeout_s=60)
        return self.request("GET", f"/api/v1/nodes/{name}")

    def node_ready(self, name: str) -> bool:
        conditions = self.request("GET", f"/api/v1/nodes/{name}").get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A namespace plus its `default` ServiceAccount (made by the controller-manager: pods need it first)."""
        self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})
        self.wait_until(
            f"ServiceAccount {name}/default",
            lambda: self._api_ok(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            timeout_s=60,
        )


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _http_ok(url: str, context: ssl.SSLContext | None, expect: bytes = b"", token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=context, timeout=5) as resp:
            return resp.status == 200 and expect in resp.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
