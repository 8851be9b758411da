"""The container images, built by the real build command (docker/build.sh, buildah) and run by runc as a kubelet's
runtime runs them (tests/images_tool.py): the image's own user and entrypoint, a read-only root filesystem, no
capabilities, writable only the folders the pod mounts (plus /tmp).

- The operator image runs `stagerun operator` against the test control plane (tests/cluster) with the chart's
  read-only root and /tmp emptyDir, answers its liveness and metrics endpoints and reconciles a TrainingRun into its
  Job; its OCI archive names the image the chart installs.
- The trainer image runs `stagerun launch` with the volumes and environment of the pod the operator builds
  (builders.build_attempt), trains, and commits its checkpoints to the claim's mount as uid 65532; it can compile
  what triton compiles on GPUs (gcc, Python's headers).
- Both: `stagerun --version` is the package's version; nothing of the build machine (pip/uv configuration, its own
  CAs, build secrets) is left in them.

Marked `images`; the trainer's tests also `slow`. With buildah installed, `python -m pytest` runs the operator's
(~1 minute; ~2 on a fresh machine, which first makes the Debian base with mmdebstrap). The trainer's install torch
and the nvidia-* wheels (~6 GB, ~5 minutes cold): on demand, `python -m pytest tests/test_images.py -m images`.
Without buildah, runc and mmdebstrap (`apt-get install -y buildah runc mmdebstrap`, as root) they skip, saying so.
The first tests need no engine: the chart's default image, the build command's errors, the leftovers scanner.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE_BYTES, tiny_run
from images_tool import (
    BUILD,
    Container,
    Image,
    Mount,
    build,
    build_machine_leftovers,
    http_get,
    image_names,
    output_of,
    run_to_end,
    wait_for,
    writable_dir,
)

CHART = ROOT / "charts" / "stagerun"
UID = 65532
WAIT_S = 60.0


# -- the chart names what the build writes (no engine needed) ----------------------------------------------------


def test_chart_default_image_is_what_the_build_tags():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = importlib.metadata.version("stagerun")
    assert chart["appVersion"] == version, "Chart.yaml appVersion must be the package version the images carry"
    tag = values["tag"] or chart["appVersion"]  # the chart's "stagerun.image" helper: tag, else appVersion
    reference, archive = image_names()["operator"]
    assert f"{values['repository']}:{tag}" == reference
    trainer, _ = image_names()["trainer"]
    assert trainer.endswith(f"/stagerun-trainer:{version}") and archive.name == f"stagerun-operator-{version}.oci.tar"


def test_build_command_refuses_bad_arguments_naming_the_fix():
    for args, message in (
        (["--base", "ubuntu"], "--base must be public, debian or auto, not 'ubuntu'"),
        (["--compression", "xz"], "--compression must be gzip, zstd or none, not 'xz'"),
        (["--engine", "podman"], "--engine must be buildah, docker or auto, not 'podman'"),
        (["kaniko"], "unknown argument 'kaniko' (see docker/build.sh --help)"),
    ):
        result = subprocess.run([str(BUILD), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.strip() == f"docker/build.sh: {message}", result


def test_leftovers_scanner_finds_what_a_build_could_leave(tmp_path):
    """The scanner the image tests trust: every kind of leftover is found, an absolute link is not followed."""
    body = "MIIB" + "Q" * 60 + "=="
    cert = f"-----BEGIN CERTIFICATE-----\n{body[:40]}\n{body[40:]}\n-----END CERTIFICATE-----\n"
    local = tmp_path / "local-cas"
    local.mkdir()
    (local / "proxy.crt").write_text(cert)
    rootfs = tmp_path / "rootfs"
    for path, text in {
        "etc/pip.conf": "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n",
        "etc/uv/uv.toml": "native-tls = true\n",
        "run/secrets/build-ca": cert,
        "opt/venv/lib/python3.11/site-packages/certifi/cacert.pem": "other\n" + cert,
        "etc/ssl/certs/ca-certificates.crt": "-----BEGIN CERTIFICATE-----\nMIIBother\n-----END CERTIFICATE-----\n",
    }.items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_text(text)
    (rootfs / "etc/ssl/certs/proxy.pem").symlink_to(local / "proxy.crt")  # read on the host, never in an image
    config = {"Env": ["PATH=/usr/bin", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]}
    assert sorted(build_machine_leftovers(rootfs, config, local)) == [
        "/etc/pip.conf (pip/uv configuration)",
        "/etc/uv/uv.toml (pip/uv configuration)",
        f"/opt/venv/lib/python3.11/site-packages/certifi/cacert.pem (holds a CA of this machine's {local})",
        "/run/secrets/build-ca (a build secret)",
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
    ]


# -- the images, built once per session ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def operator_image(tmp_path_factory) -> Image:
    return build("operator", tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def trainer_image(tmp_path_factory) -> Image:
    return build("trainer", tmp_path_factory.mktemp("images"), "--no-archive")


# -- both images ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=["operator", pytest.param("trainer", marks=pytest.mark.slow)])
def image(request) -> Image:
    return request.getfixturevalue(f"{request.param}_image")


@pytest.mark.images
def test_image_runs_as_65532_on_a_read_only_root_and_reports_the_package_version(image, tmp_path):
    assert image.config["User"] == f"{UID}:{UID}"
    code, out = run_to_end(image, tmp_path / "version", args=["--version"])
    assert code == 0 and out.strip().splitlines()[-1] == f"stagerun {importlib.metadata.version('stagerun')}", out
    # The container is what the other tests rely on: the image's uid, /tmp writable, the root filesystem not.
    # Both lines on stderr, flushed: the container's stdout and stderr are collected apart, so a buffered stdout
    # line could land in the middle of the traceback.
    probe = (
        "import os, sys; print('uid', os.getuid(), os.getgid(), file=sys.stderr, flush=True); "
        "open('/tmp/ok', 'w').close(); open('/probe', 'w')"
    )
    tmp = writable_dir(tmp_path / "tmp")
    code, out = run_to_end(image, tmp_path / "probe", command=["python3", "-c", probe], mounts=[Mount("/tmp", tmp)])
    assert code == 1 and f"uid {UID} {UID}" in out and "Read-only file system: '/probe'" in out, out
    assert (tmp / "ok").stat().st_uid == UID


@pytest.mark.images
def test_image_holds_no_ca_bundle_or_pip_configuration_of_the_build_machine(image):
    working = output_of("buildah", "from", "--pull-never", image.reference).strip()
    try:
        rootfs = Path(output_of("buildah", "mount", working).strip())
        assert (rootfs / "etc/ssl/certs/ca-certificates.crt").is_file()  # the image's own CA bundle is scanned too
        assert build_machine_leftovers(rootfs, image.config) == []
    finally:
        subprocess.run(["buildah", "umount", working], capture_output=True)
        subprocess.run(["buildah", "rm", working], capture_output=True)


@pytest.mark.images
def test_operator_archive_is_an_oci_image_named_as_the_chart_expects(operator_image):
    with tarfile.open(operator_image.archive) as archive:
        index = json.load(archive.extractfile("index.json"))
        (manifest_ref,) = index["manifests"]
        assert manifest_ref["annotations"]["org.opencontainers.image.ref.name"] == operator_image.reference
        manifest = json.load(archive.extractfile(f"blobs/sha256/{manifest_ref['digest'].split(':')[1]}"))
        config = json.load(archive.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))
        layers = {member.name for member in archive.getmembers()}
    assert config["config"]["User"] == f"{UID}:{UID}" and config["config"]["Entrypoint"] == ["stagerun"]
    assert all(f"blobs/sha256/{layer['digest'].split(':')[1]}" in layers for layer in manifest["layers"])


# -- the operator image against the test control plane ---------------------------------------------------------------


@pytest.mark.images
def test_operator_image_reconciles_a_trainingrun_into_its_job(
    operator_image, control_plane, namespace, trainingrun_crd, tmp_path
):
    from cluster.control_plane import ApiError
    from cluster.kwok_pods import MERGE, KwokPods
    from cluster.operator import FAST_SETTINGS, quickstart
    from cluster.processes import free_ports

    from stagerun.operator.naming import attempt_name

    pods = KwokPods(control_plane, namespace)
    selector, nodes = pods.add_pool(2, gpus=1)
    kube = tmp_path / "kube"
    kube.mkdir(mode=0o755)
    (kube / "config").write_bytes(control_plane.kubeconfig.read_bytes())  # the admin token; 0644 for uid 65532
    (kube / "config").chmod(0o644)
    health, metrics = free_ports(2)
    # The chart's command, with the endpoints on loopback (the chart binds every interface of its pod).
    command = [
        "stagerun",
        "operator",
        "--standalone",
        "-n",
        namespace,
        f"--liveness=http://127.0.0.1:{health}/healthz",
        f"--metrics-port={metrics}",
        "--metrics-address=127.0.0.1",
    ]
    env = {"KUBECONFIG": "/etc/kube/config", **FAST_SETTINGS}
    mounts = [Mount("/tmp", writable_dir(tmp_path / "tmp")), Mount("/etc/kube", kube, read_only=True)]
    doc = json.loads(json.dumps(quickstart(control_plane)))
    doc["spec"].update(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": "s3://bucket/runs/quickstart"})
    doc["spec"]["scheduling"] = {"nodeSelector": selector}
    runs = f"/apis/stagerun.io/v1alpha1/namespaces/{namespace}/trainingruns"
    job_path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{attempt_name('quickstart', 1)}"

    def get(path: str) -> dict | None:
        try:
            return control_plane.request("GET", path)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    try:
        with Container(operator_image, tmp_path / "operator", command=command, env=env, mounts=mounts) as operator:
            healthy = lambda: (http_get(f"http://127.0.0.1:{health}/healthz") or (0, ""))[0] == 200  # noqa: E731
            wait_for("the operator's liveness endpoint", healthy, WAIT_S, operator.logs)
            created = control_plane.request("POST", runs, doc)
            job = wait_for("the run's Job", lambda: get(job_path), WAIT_S, operator.logs)
            status = wait_for(
                "the run's status",
                lambda: (get(f"{runs}/quickstart") or {}).get("status", {}).get("state"),
                WAIT_S,
                operator.logs,
            )
            scraped = http_get(f"http://127.0.0.1:{metrics}/metrics")
            code = operator.stop()
            logs = operator.logs()
    finally:
        with contextlib.suppress(ApiError):  # nothing would remove kopf's finalizer once the operator is gone
            control_plane.request("PATCH", f"{runs}/quickstart", {"metadata": {"finalizers": None}}, MERGE)
        pods.delete_nodes(nodes)
    assert code == 0, logs  # SIGTERM: kopf stops cleanly
    assert status in ("Starting", "Running"), status
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == doc["spec"]["image"] and pod["containers"][0]["command"] == [
        "stagerun",
        "launch",
    ]
    assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert scraped is not None and scraped[0] == 200 and "stagerun_operator_" in scraped[1], scraped


# -- the trainer image ---------------------------------------------------------------------------------------------


@pytest.mark.images
@pytest.mark.slow
def test_trainer_image_compiles_what_triton_compiles_on_gpus(trainer_image, tmp_path):
    """torch.compile is on by default with GPUs, and triton builds its kernel launchers at run time with the
    system's C compiler against Python's headers: both must be in the image."""
    probe = (
        "import subprocess, sysconfig; open('/tmp/launcher.c', 'w').write('#include <Python.h>\\nint f(void) "
        "{ return 0; }\\n'); subprocess.run(['gcc', '-shared', '-fPIC', '-I' + sysconfig.get_paths()['include'], "
        "'-o', '/tmp/launcher.so', '/tmp/launcher.c'], check=True); import triton; print('built', triton.__version__)"
    )
    tmp = writable_dir(tmp_path / "tmp")
    code, out = run_to_end(trainer_image, tmp_path / "c", command=["python3", "-c", probe], mounts=[Mount("/tmp", tmp)])
    assert code == 0 and "built " in out and (tmp / "launcher.so").stat().st_size > 0, out


# -- the trainer image as the operator's pod runs it ---------------------------------------------------------------


def pod_of_attempt(manifest: dict) -> tuple[dict, dict]:
    """(the attempt's ConfigMap, its Job's pod template), exactly as the operator would create them."""
    from stagerun.core.spec import resolve_run
    from stagerun.operator.builders import build_attempt

    configmap, _service, job = build_attempt(
        resolve_run(manifest), namespace="images", uid="uid-images", attempt=1, phase_index=0
    )
    return configmap, job["spec"]["template"]


@pytest.mark.images
@pytest.mark.slow
def test_trainer_image_runs_the_operators_pod_and_commits_checkpoints(trainer_image, tmp_path):
    from cluster.processes import free_ports

    from stagerun.core.plan import total_steps
    from stagerun.core.spec import resolve_run

    manifest = tiny_run(
        phases=[
            {
                "name": "core",
                "tokens": "8Ki",
                "seqLen": 64,
                "microBatchSize": 4,
                "batch": {"size": "1Ki"},
                "lr": {"schedule": "cosine", "peak": 3e-3, "to": 1e-3, "warmupTokens": "1Ki"},
            }
        ],
        image=trainer_image.reference,
        checkpoint={"path": "/checkpoints", "volumeClaim": "checkpoints", "everyTokens": "4Ki", "keep": 2},
    )
    manifest["metadata"]["name"] = "images"
    configmap, template = pod_of_attempt(manifest)
    pod, (container,) = template["spec"], template["spec"]["containers"]
    assert pod["securityContext"]["runAsUser"] == UID and container["command"] == ["stagerun", "launch"]

    # The pod's volumes as a kubelet provides them: the ConfigMap's files read-only, emptyDirs world-writable, the
    # claim writable by the pod's uid (fsGroup), Memory emptyDirs as tmpfs; plus /tmp, which a read-only root needs.
    folders: dict[str, Path] = {}
    mounts = [Mount("/tmp", writable_dir(tmp_path / "tmp"))]
    for volume in pod["volumes"]:
        name, folder = volume["name"], tmp_path / "volumes" / volume["name"]
        if "configMap" in volume:
            folder.mkdir(parents=True, mode=0o755)
            for key, text in configmap["data"].items():
                (folder / key).write_text(text)
                (folder / key).chmod(0o644)
        elif "persistentVolumeClaim" in volume:
            writable_dir(folder, owner=UID)
        elif volume.get("emptyDir", {}).get("medium") == "Memory":
            folder = None
        else:
            writable_dir(folder)
        folders[name] = folder
    for mount in container["volumeMounts"]:
        mounts.append(Mount(mount["mountPath"], folders[mount["name"]], read_only=mount.get("readOnly", False)))
    termination = tmp_path / "termination-log"
    termination.touch()
    termination.chmod(0o666)  # as a kubelet creates it, writable by any uid
    mounts.append(Mount(container["terminationMessagePath"], termination))

    # Its environment: the values, the downward API's fields (the pod on 127.0.0.1), the Indexed Job's index; the
    # rendezvous and status addresses on loopback ports, as the process kubelet rewrites DNS names.
    rdzv, status_port = free_ports(2)
    fields = {"status.podIP": "127.0.0.1", "metadata.name": "images-a1-0", "metadata.namespace": "images"}
    env = {
        e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in container["env"]
    }
    env.update(
        JOB_COMPLETION_INDEX="0",
        STAGERUN_NODE_ADDR="127.0.0.1",
        STAGERUN_RDZV_ENDPOINT=f"127.0.0.1:{rdzv}",
        STAGERUN_STATUS_PORT=str(status_port),
        STAGERUN_MAX_SOURCE_BYTES=str(SAMPLE_BYTES),
        OMP_NUM_THREADS="1",
    )

    progress = []
    with Container(trainer_image, tmp_path / "pod", command=container["command"], env=env, mounts=mounts) as trainer:
        deadline = time.monotonic() + 900
        while trainer.running() and time.monotonic() < deadline:
            answer = http_get(f"http://127.0.0.1:{status_port}/progress")  # what the operator polls
            if answer:
                progress.append(json.loads(answer[1]))
            time.sleep(0.5)
        code = trainer.wait(10)
        logs = trainer.logs(20000)
    assert code == 0, logs
    message = json.loads(termination.read_text())
    assert message["state"] == "complete", message
    from stagerun.trainer.checkpoint import CheckpointManager

    latest = CheckpointManager(f"file://{folders['checkpoints']}", keep=100).latest()
    assert latest is not None and latest.step == total_steps(resolve_run(manifest)), (latest, logs[-4000:])
    written = [p for p in folders["checkpoints"].rglob("*") if p.is_file()]
    assert written and {p.stat().st_uid for p in written} == {UID}
    assert any(p.get("step", 0) >= 1 for p in progress), progress[-3:]
