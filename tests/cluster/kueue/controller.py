"""The real Kueue controller (sigs.k8s.io/kueue/cmd/kueue, built by tests/cluster/kueue/build.sh) against the test
control plane, as a cluster runs it: its CRDs, its admission and conversion webhooks, its own certificates.

How its webhooks are reached on loopback: Kueue's internal certificate management issues its serving certificate for
`kueue-webhook-service.kueue-system.svc` only (no IP address), and the apiserver verifies a `service`-referenced
webhook against exactly that name. The Service here is of type ExternalName with `externalName: 127.0.0.1`: the
apiserver's service resolver dials an ExternalName Service's name at the webhook's port, so the calls go to Kueue on
127.0.0.1 while TLS is verified for the service name, with the CA bundle Kueue injects itself. No ClusterIP is ever
dialled and Kueue listens on 127.0.0.1 only (webhooks, health, metrics; the on-demand visibility API server, which
would bind every interface, is off).

The webhook configurations are Kueue's own (config/components/webhook/manifests.yaml) cut down to what runs here:
the batch/v1 Job integration and Kueue's own kinds. The Job webhooks only see namespaces labelled
NAMESPACE_LABEL, and Kueue manages Jobs only there (managedJobsNamespaceSelector), so other tests' Jobs on the same
control plane never depend on Kueue; the configurations are deleted when it stops.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import ssl
import urllib.request
from pathlib import Path

import yaml

from ..control_plane import ApiError, ControlPlane
from ..processes import Process, free_ports, listening_addresses, stop_all

HERE = Path(__file__).resolve().parent
BUILD_COMMAND = "tests/cluster/kueue/build.sh"
NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
NAMESPACE_LABEL = ("stagerun.test/kueue", "true")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
API = "/apis/kueue.x-k8s.io/v1beta2"
# The CRDs Kueue converts between v1beta1 and v1beta2 with its webhook (its kustomize patches webhook_in_*.yaml; its
# certificate rotator injects the CA bundle into exactly these).
CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}
START_TIMEOUT_S = 120.0


def cache_root() -> Path:
    """Where build.sh puts the binary and Kueue's manifests: keyed like it by sha256(go.mod go.sum)."""
    key = hashlib.sha256((HERE / "go.mod").read_bytes() + (HERE / "go.sum").read_bytes()).hexdigest()[:16]
    base = os.environ.get("STAGERUN_CLUSTER_CACHE") or Path.home() / ".cache" / "stagerun-cluster"
    return Path(base) / f"kueue-{key}"


def missing() -> list[str]:
    root = cache_root()
    wanted = [root / "bin" / "kueue", root / "config" / "webhook-manifests.yaml", root / "config" / "crds"]
    return [str(path.relative_to(root)) for path in wanted if not path.exists()]


def skip_reason() -> str:
    return (
        f"the Kueue controller is not built (missing in {cache_root()}: {', '.join(missing())}); run "
        f"`{BUILD_COMMAND}` from the repository root (~4 minutes cold on 2 cores, a second when cached)"
    )


class Kueue:
    """Kueue running against ``plane`` until ``stop()``; its log is ``<workdir>/kueue.log``."""

    def __init__(self, plane: ControlPlane, workdir: Path):
        self.plane, self.workdir = plane, workdir
        self.root = cache_root()
        self.webhook_port, self.health_port, self.metrics_port = free_ports(3)
        self.process: Process | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._install_crds()
        self._namespace_and_service()
        self._webhook_configurations()
        config = self.workdir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(self._configuration()))
        self.process = Process(
            "kueue",
            [str(self.root / "bin" / "kueue"), f"--config={config}", "--zap-log-level=2"],
            self.workdir,
            {"KUBECONFIG": str(self.plane.kubeconfig)},
        )
        try:
            # In a pod the Secret is a volume at certDir and the kubelet writes its files; here the harness does.
            self.plane.wait_until("Kueue's certificate in its Secret", self._mount_certificate, timeout_s=60)
            self.plane.wait_until("Kueue /readyz", self._ready, timeout_s=START_TIMEOUT_S)
            # Ready once its certificates exist and its CA is in the webhook configurations; then the apiserver must
            # reach it: a dry-run ResourceFlavor goes through its mutating and validating webhooks.
            self.plane.wait_until("the apiserver reaching Kueue's webhooks", self._webhooks_answer, timeout_s=60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_all([self.process])
        for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
            name = f"kueue-{kind.removesuffix('webhookconfigurations')}-webhook-configuration"
            try:
                self.plane.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}")
            except ApiError as exc:
                if exc.code != 404:
                    raise

    def listening(self) -> set[str]:
        """The addresses Kueue's process listens on."""
        assert self.process is not None
        return listening_addresses(self.process.popen.pid)

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process else ""

    # -- what it needs in the cluster --------------------------------------------------------------------------------
    def _install_crds(self) -> None:
        for path in sorted((self.root / "config" / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            plural = crd["spec"]["names"]["plural"]
            if plural in CONVERTED:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {"service": self._service_ref("/convert")},
                        "conversionReviewVersions": ["v1"],
                    },
                }
            self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
        for path in (self.root / "config" / "crds").glob("*.yaml"):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            self.plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")

    def _namespace_and_service(self) -> None:
        try:
            self.plane.create_namespace(NAMESPACE)
        except ApiError as exc:
            if exc.code != 409:  # a second Kueue of the session
                raise
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {"type": "ExternalName", "externalName": "127.0.0.1"},
        }
        # The certificate rotator fills this Secret (its deployment ships it empty, config/components/internalcert) and
        # reuses what an earlier Kueue of the session left in it while it is valid.
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NAMESPACE}}
        for kind, body in (("services", service), ("secrets", secret)):
            try:
                self.plane.request("POST", f"/api/v1/namespaces/{NAMESPACE}/{kind}", body)
            except ApiError as exc:
                if exc.code != 409:
                    raise

    def _service_ref(self, path: str) -> dict:
        return {"namespace": NAMESPACE, "name": SERVICE, "path": path, "port": self.webhook_port}

    def _webhook_configurations(self) -> None:
        manifests = yaml.safe_load_all((self.root / "config" / "webhook-manifests.yaml").read_text())
        key, value = NAMESPACE_LABEL
        for doc in manifests:
            if not doc:
                continue
            doc = copy.deepcopy(doc)
            kind = "mutating" if doc["kind"] == "MutatingWebhookConfiguration" else "validating"
            doc["metadata"] = {"name": f"kueue-{kind}-webhook-configuration"}
            kept = []
            for hook in doc["webhooks"]:
                groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
                if not groups <= WEBHOOK_GROUPS:
                    continue  # integrations that do not run here (their paths are not served)
                hook["clientConfig"] = {"service": self._service_ref(hook["clientConfig"]["service"]["path"])}
                if groups == {"batch"}:
                    hook["namespaceSelector"] = {"matchLabels": {key: value}}
                kept.append(hook)
            doc["webhooks"] = kept
            self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(doc))

    def _configuration(self) -> dict:
        key, value = NAMESPACE_LABEL
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {
                "healthProbeBindAddress": f"127.0.0.1:{self.health_port}",
                "readinessEndpointName": "/readyz",
                "livenessEndpointName": "/healthz",
            },
            "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(self.workdir / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": True, "webhookServiceName": SERVICE, "webhookSecretName": SECRET},
            "integrations": {"frameworks": ["batch/job"]},
            "managedJobsNamespaceSelector": {"matchLabels": {key: value}},
            "featureGates": {"VisibilityOnDemand": False},
        }

    # -- readiness ---------------------------------------------------------------------------------------------------
    def _mount_certificate(self) -> bool:
        """Kueue's serving certificate, once its rotator wrote it into the Secret, as files in its certDir (what a
        Secret volume holds), written atomically; False until the Secret has it."""
        assert self.process is not None
        self.process.check_running()
        data = self.plane.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}").get("data") or {}
        if not {"tls.crt", "tls.key"} <= set(data):
            return False
        folder = self.workdir / "certs"
        folder.mkdir(exist_ok=True)
        for name, value in data.items():
            partial = folder / f".{name}.tmp"
            partial.write_bytes(base64.b64decode(value))
            partial.rename(folder / name)
        return True

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    def _webhooks_answer(self) -> bool:
        flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "probe"}}
        try:
            self.plane.request("POST", f"{API}/resourceflavors?dryRun=All", flavor)
            return True
        except ApiError as exc:
            if exc.code == 500 and "webhook" in exc.message:  # TLS not trusted yet, or not listening yet
                return False
            raise
        except (OSError, ssl.SSLError):
            return False
