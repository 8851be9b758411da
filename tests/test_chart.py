"""The Helm chart (charts/stagerun): it lints, renders with default and non-default values, every object it renders
is valid for its kind, its values schema refuses bad values, and what it deploys matches what the operator expects.

Rendering uses a real Helm (tests/helm_tool.py). Built-in kinds are checked against the Kubernetes 1.33 OpenAPI
schemas bundled with ``kubernetes-validate`` (strict: unknown fields are errors). ServiceMonitor and PodMonitor are
checked by hand for the fields the Prometheus Operator requires and for consistency with what they select: their CRD
schemas are not available offline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from helm_tool import helm_binary, why_no_helm

CHART = ROOT / "charts" / "stagerun"
RELEASE, RELEASE_NS = "stagerun", "stagerun"
KUBERNETES_VERSION = "1.33"
MONITOR_KINDS = {"ServiceMonitor", "PodMonitor"}
PEERING_KINDS = {"ClusterKopfPeering", "KopfPeering"}  # kopf.dev, CRDs in crds/kopf-peering.yaml: checked by hand
CRD_KINDS = ["CustomResourceDefinition"] * 3  # TrainingRun, ClusterKopfPeering, KopfPeering

# Every optional part on, and every value off its default.
FULL_VALUES = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.example.com/ml/stagerun-operator", "tag": "0.2.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "verbose": True,
        "settings": {"STAGERUN_RECONCILE_SECONDS": 30, "STAGERUN_BACKOFF_MAX_SECONDS": "600"},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    },
    "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"cpu": 2, "memory": "1Gi"}},
    "podAnnotations": {"example.com/owner": "ml-platform"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
    "serviceAccount": {"name": "trainer-operator", "annotations": {"iam.example.com/role": "stagerun"}},
    "rbac": {"readNodes": False},
    "networkPolicy": {"enabled": False},
    "allowList": {
        "serviceAccounts": [],
        "secrets": ["s3-*", "team-a/registry"],
        "volumeClaims": ["ckpt-*"],
        "mountPathPrefixes": ["/data", "/scratch"],
    },
    "metrics": {
        "port": 9091,
        "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "kps"}},
    },
    "grafana": {
        "dashboards": {
            "enabled": True,
            "namespace": "monitoring",
            "label": "grafana_dashboard",
            "labelValue": "yes",
            "annotations": {"grafana_folder": "Training"},
        }
    },
}


@pytest.fixture(scope="module")
def helm() -> Path:
    path = helm_binary()
    if path is None:
        pytest.skip(why_no_helm())
    return path


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the `dev` extra)")


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)


def template(helm: Path, values: dict | None = None, tmp_path: Path | None = None, *extra: str) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "-n", RELEASE_NS, "--include-crds", *extra]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["-f", str(values_file)]
    result = helm_run(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def default_objects(helm) -> list[dict]:
    return template(helm)


@pytest.fixture(scope="module")
def full_objects(helm, tmp_path_factory) -> list[dict]:
    return template(helm, FULL_VALUES, tmp_path_factory.mktemp("values"))


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(objects: list[dict]) -> dict:
    return only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def dashboard_files() -> list[Path]:
    return sorted((CHART / "dashboards").glob("*.json"))


# -- lint and render ---------------------------------------------------------------------------------------------------


def test_helm_lint(helm, tmp_path):
    result = helm_run(helm, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(FULL_VALUES))
    result = helm_run(helm, "lint", "--strict", str(CHART), "-f", str(values_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_install_renders_the_operator_and_its_clusterwide_rbac(default_objects):
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            *CRD_KINDS,
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )
    cluster_scoped = ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering")
    for obj in default_objects:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == RELEASE_NS, obj["metadata"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]
    args = container(default_objects)["command"]
    assert args[:5] == [
        "stagerun",
        "operator",
        "--peering=stagerun",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=8081",
    ]
    assert args[5] == "-A"
    assert len(args) == 7 and args[6].startswith("--network-policy-status-from=")  # the next test reads it
    assert container(default_objects)["image"] == f"ghcr.io/stagerun/stagerun-operator:{chart()['appVersion']}"


def test_install_dry_run_prints_the_next_steps(helm):
    """`helm install` itself (client-side dry run: no cluster), as the README's one command, with its NOTES."""
    result = helm_run(helm, "install", RELEASE, str(CHART), "-n", RELEASE_NS, "--create-namespace", "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl get trainingruns" in notes and "kubectl apply" in notes and "spec.image" in notes


def test_full_values_render_every_optional_part(full_objects):
    kinds = sorted(o["kind"] for o in full_objects)
    expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        *CRD_KINDS,
        "Deployment",
        "KopfPeering",
        "KopfPeering",
        "PodDisruptionBudget",
        "PodMonitor",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    if dashboard_files():
        expected.append("ConfigMap")
    assert kinds == sorted(expected)
    assert {o["metadata"]["namespace"] for o in full_objects if o["kind"] in ("Role", "RoleBinding")} == {
        "team-a",
        "team-b",
    }
    main = container(full_objects)
    assert main["command"][5:] == [
        "-n",
        "team-a",
        "-n",
        "team-b",
        "--verbose",
        "--no-network-policy",
        "--allowed-service-accounts=",
        "--allowed-secrets=s3-*,team-a/registry",
        "--allowed-volume-claims=ckpt-*",
        "--allowed-mount-prefixes=/data,/scratch",
    ]
    assert "--metrics-port=9091" in main["command"]
    assert main["image"] == "registry.example.com/ml/stagerun-operator:0.2.0-rc1"
    assert main["imagePullPolicy"] == "Always"
    assert main["resources"] == FULL_VALUES["resources"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["STAGERUN_RECONCILE_SECONDS"] == "30" and env["STAGERUN_BACKOFF_MAX_SECONDS"] == "600"
    assert env["STAGERUN_SUSPEND_GRACE_SECONDS"] == "600"  # the other defaults stay
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    pod = only(full_objects, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["annotations"] == FULL_VALUES["podAnnotations"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod["spec"][key] == FULL_VALUES[key]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["serviceAccountName"] == "trainer-operator"
    assert only(full_objects, "ServiceAccount")["metadata"]["annotations"] == {"iam.example.com/role": "stagerun"}
    cluster_role = only(full_objects, "ClusterRole")
    assert "nodes" not in {r for rule in cluster_role["rules"] for r in rule["resources"]}  # rbac.readNodes false


def test_default_settings_are_the_operators_own_defaults(default_objects):
    """values.yaml lists the operator's settings with their defaults: they must be the documented ones
    (docs/operator.md, "Operator settings"), which are the operator's (state.Settings)."""
    import re

    from stagerun.operator.state import Settings
    from stagerun.operator.workers import WORKERS

    # handlers.py reads it from the environment at import (importing it here would register kopf handlers).
    handlers_source = (ROOT / "operator" / "handlers.py").read_text()
    node_check_default = re.search(r'"STAGERUN_NODE_CHECK_SECONDS", "(\d+)"', handlers_source).group(1)

    env = {e["name"]: e["value"] for e in container(default_objects)["env"] if e["name"].startswith("STAGERUN_")}
    documented = dict(re.findall(r"`(STAGERUN_[A-Z_]+)` \((\d+)\)", (ROOT / "docs" / "operator.md").read_text()))
    assert set(env) == set(documented), "values.yaml operator.settings and docs/operator.md list other settings"
    assert {k: float(v) for k, v in env.items()} == {k: float(v) for k, v in documented.items()}
    from_code = {
        "STAGERUN_BACKOFF_BASE_SECONDS": Settings.backoff_base_seconds,
        "STAGERUN_BACKOFF_MAX_SECONDS": Settings.backoff_max_seconds,
        "STAGERUN_FAILURE_GRACE_SECONDS": Settings.failure_grace_seconds,
        "STAGERUN_SUSPEND_GRACE_SECONDS": Settings.suspend_grace_seconds,
        "STAGERUN_FORCE_DELETE_AFTER_SECONDS": Settings.force_delete_after_seconds,
        "STAGERUN_IMAGE_PULL_DEADLINE_SECONDS": Settings.image_pull_deadline_seconds,
        "STAGERUN_NODE_CHECK_SECONDS": node_check_default,
        **{variable: default for variable, default in WORKERS.values()},
    }
    assert all(float(env[k]) == float(v) for k, v in from_code.items())


# -- validity of every object ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "full"])
def test_every_object_is_valid_for_its_kind(which, request, kubernetes_validate):
    objects = request.getfixturevalue(f"{which}_objects")
    checked = []
    for obj in objects:
        if obj["kind"] in MONITOR_KINDS | PEERING_KINDS:
            continue  # below, by hand
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc}")
        checked.append(obj["kind"])
    assert "Deployment" in checked and "CustomResourceDefinition" in checked


def test_service_monitor_scrapes_the_operator_metrics_service(full_objects):
    monitor = only(full_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints"}
    service = only(full_objects, "Service")
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    (endpoint,) = spec["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    # The Service's "metrics" port reaches the container's metrics port, which the operator serves on.
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == 9091 and port["targetPort"] == "metrics"
    pod = only(full_objects, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {"name": "metrics", "containerPort": 9091, "protocol": "TCP"} in container(full_objects)["ports"]


def test_pod_monitor_selects_the_trainer_pods_the_operator_creates(full_objects, default_objects):
    monitor = only(full_objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints"}
    assert spec["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint == {"port": "status", "path": "/metrics", "interval": "1m"}
    # Against what the operator really creates (the golden Job of tests/test_builders.py): labels and port name.
    golden = [d for d in yaml.safe_load_all((ROOT / "tests" / "golden" / "quickstart-a1.yaml").read_text()) if d]
    template = next(d for d in golden if d["kind"] == "Job")["spec"]["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert endpoint["port"] in ports
    # The operator's own pod is not a trainer: the PodMonitor must not select it.
    operator_labels = only(full_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not spec["selector"]["matchLabels"].items() <= operator_labels.items()
    assert not [o for o in default_objects if o["kind"] in MONITOR_KINDS]


def test_pod_monitor_watches_every_namespace_by_default(helm, tmp_path):
    objects = template(helm, {"metrics": {"podMonitor": {"enabled": True}}}, tmp_path)
    assert only(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


# -- what the Deployment promises -------------------------------------------------------------------------------------


def test_crd_is_a_byte_identical_copy_of_the_repositorys():
    assert (CHART / "crds" / "trainingrun.yaml").read_bytes() == (ROOT / "crds" / "trainingrun.yaml").read_bytes(), (
        "charts/stagerun/crds/trainingrun.yaml is stale: cp crds/trainingrun.yaml charts/stagerun/crds/"
    )


def test_operator_runs_non_root_read_only_with_health_probes(default_objects):
    deployment = only(default_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    main = container(default_objects)
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532 and security["runAsGroup"] == 65532
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs a writable /tmp.
    (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    # Both probes hit kopf's health endpoint, which --liveness serves.
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert "--liveness=http://0.0.0.0:8080/healthz" in main["command"]
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in main["ports"]
    assert main["resources"]["requests"] and main["resources"]["limits"]


def test_operator_command_line_is_accepted_by_the_operator(default_objects, full_objects):
    """The chart's command line parses with the operator's own argument parser (flags renamed there break this)."""
    import argparse

    from stagerun.operator.main import add_arguments

    for objects in (default_objects, full_objects):
        command = container(objects)["command"]
        assert command[:2] == ["stagerun", "operator"]
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(command[2:])
        assert not args.standalone and args.peering == "stagerun" and args.priority is None  # priority by start time
        assert args.liveness == "http://0.0.0.0:8080/healthz"
        assert args.all_namespaces or args.namespace


def operator_settings(command: list[str]) -> dict[str, str]:
    """The settings the operator takes from its command line (the flags as the environment it reads)."""
    import argparse

    from stagerun.operator.main import _settings_to_env, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env: dict[str, str] = {}
    _settings_to_env(parser.parse_args(command[2:]), env)
    return env


def test_network_policy_lets_the_operators_own_pods_and_prometheus_reach_the_status_port(default_objects):
    """By default the operator creates a NetworkPolicy per attempt whose status-port peers are the chart's operator
    pods (their namespace and exactly the labels the Deployment gives them) and the documented Prometheus."""
    from stagerun.operator import allow_list, network_policy

    env = operator_settings(container(default_objects)["command"])
    settings = network_policy.settings_from_env(env)
    assert settings.enabled
    operator_pods, prometheus = settings.status_from
    pod_labels = only(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert operator_pods["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": RELEASE_NS}}
    assert operator_pods["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert operator_pods["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert prometheus == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    assert allow_list.from_env(env) == allow_list.AllowList()  # by default everything is allowed


def test_allow_list_and_disabled_policy_reach_the_operator(full_objects):
    from stagerun.operator import allow_list, network_policy

    env = operator_settings(container(full_objects)["command"])
    assert not network_policy.settings_from_env(env).enabled
    assert allow_list.from_env(env) == allow_list.AllowList(
        service_accounts=(),
        secrets=("s3-*", "team-a/registry"),
        volume_claims=("ckpt-*",),
        mount_prefixes=("/data", "/scratch"),
    )


def test_rbac_lets_the_operator_manage_the_attempts_network_policies(default_objects, full_objects):
    """Granted with the policy disabled too: the operator still removes the policies of runs it launched before."""
    for objects in (default_objects, full_objects):
        rules = [r for o in objects if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]
        granted = {v for r in rules if "networkpolicies" in r["resources"] for v in r["verbs"]}
        assert granted == {"create", "list", "delete"}


# -- the values schema -------------------------------------------------------------------------------------------------


def test_an_image_digest_replaces_the_tag(helm, tmp_path):
    digest = "sha256:" + "ab" * 32
    objects = template(
        helm, {"image": {"repository": "registry.example/stagerun-operator", "digest": digest}}, tmp_path
    )
    assert container(objects)["image"] == f"registry.example/stagerun-operator@{digest}"


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (["--set", "replicaCount=0"], "replicaCount"),
        (["--set", "replicaCount=one"], "replicaCount"),
        (["--set", "podDisruptionBudget.enabled=maybe"], "enabled"),
        (["--set", "podDisruptionBudget.minAvailable=1"], "minAvailable"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "image.digest=latest"], "digest"),
        (["--set", "surprise=1"], "surprise"),
        (["--set", "image.registry=example.com"], "registry"),
        (["--set", "resources.limits.cpu=-1"], "cpu"),
        (["--set", "resources.requests.memory=-256Mi"], "memory"),
        (["--set", "resources.requests.memory=lots"], "memory"),
        (["--set", "watchNamespaces=team-a"], "watchNamespaces"),
        (["--set", "watchNamespaces={Team_A}"], "watchNamespaces"),
        (["--set", "rbac.readNodes=maybe"], "readNodes"),
        (["--set", "operator.settings.RECONCILE=5"], "RECONCILE"),
        (["--set", "metrics.port=8080"], "port"),
        (["--set", "metrics.serviceMonitor.interval=often"], "interval"),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name"),
        (["--set", "networkPolicy.enabled=sometimes"], "enabled"),
        (["--set", "networkPolicy.metricsFrom[0].podLabels.app=prometheus"], "podLabels"),
        (["--set", "allowList.secrets=s3-credentials"], "secrets"),
        (["--set", "allowList.secrets={Bad Name}"], "secrets"),
        (["--set", "allowList.mountPathPrefixes={data}"], "mountPathPrefixes"),
    ],
)
def test_bad_values_are_refused(helm, bad, complaint):
    result = helm_run(helm, "template", RELEASE, str(CHART), "-n", RELEASE_NS, *bad)
    assert result.returncode != 0, f"{bad} was accepted"
    assert complaint in result.stderr, result.stderr


def test_values_yaml_documents_every_key():
    """Every key of values.yaml has a comment on the line above it; the entries of resources (requests/limits,
    cpu/memory) are documented together above `resources:`."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, parents = [], []  # parents: (indent, key) of the enclosing mappings
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        parents = [(i, k) for i, k in parents if i < indent]
        key = stripped.split(":", 1)[0]
        inside_resources = any(k == "resources" for _, k in parents)
        if not inside_resources and not lines[number - 1].strip().startswith("#"):
            undocumented.append(key)
        parents.append((indent, key))
    assert not undocumented, f"keys of values.yaml without a comment above them: {undocumented}"


# -- Grafana dashboards ------------------------------------------------------------------------------------------------


def test_dashboards_configmap_carries_every_dashboard(full_objects):
    files = dashboard_files()
    if not files:
        pytest.skip("charts/stagerun/dashboards/ has no *.json yet")
    configmap = only(full_objects, "ConfigMap")
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "yes"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert sorted(configmap["data"]) == [f.name for f in files]
    for file in files:
        assert configmap["data"][file.name] == file.read_text(), file.name
    size = sum(len(v.encode()) for v in configmap["data"].values())
    assert size < 900_000, f"dashboards take {size} bytes: a ConfigMap holds 1 MiB at most"


def test_dashboards_default_to_the_sidecars_label(helm, tmp_path):
    if not dashboard_files():
        pytest.skip("charts/stagerun/dashboards/ has no *.json yet")
    objects = template(helm, {"grafana": {"dashboards": {"enabled": True}}}, tmp_path)
    configmap = only(objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == RELEASE_NS


def chart() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_chart_metadata():
    meta = chart()
    assert meta["apiVersion"] == "v2" and meta["name"] == "stagerun" and meta["type"] == "application"
    assert meta["appVersion"] == _project_version()
    schema = (CHART / "values.schema.json").read_text()
    assert '"http://json-schema.org/draft-07/schema#"' in schema


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
