"""Container images for the tests: built by the real build command (docker/build.sh, buildah) and run by runc as a
kubelet's runtime would run them (tests/test_images.py).

`Container` runs one container of an image: the image's own user, environment, entrypoint and working directory
(a pod's `command` replaces the entrypoint, `args` the arguments), a read-only root filesystem (the chart's and a
restricted pod's securityContext), no capabilities, no new privileges, PID/IPC/UTS/mount namespaces of its own.
Only the network is the host's: the test control plane listens on the host's loopback, and so does everything the
container serves. Writable are only the mounts a test gives it. runc rather than crun: Debian's crun 1.8 refuses
a hybrid cgroup v1/v2 hierarchy (this machine's), which runc handles.

`build_machine_leftovers` lists what an image must not carry from the machine that built it: pip or uv
configuration, build-time variables, a build secret, a certificate of the machine's own CAs (a proxy's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "docker" / "build.sh"
INSTALL = "apt-get install -y buildah runc mmdebstrap"
BUILD_TIMEOUT_S = 3000  # the trainer's torch and nvidia-* wheels, downloaded and installed on a busy 2-core machine


def why_no_image_tools() -> str | None:
    missing = [tool for tool in ("buildah", "runc") if shutil.which(tool) is None]
    if not (shutil.which("mmdebstrap") or shutil.which("debootstrap")):
        missing.append("mmdebstrap (or debootstrap)")  # for the Debian base, when python:3.11-slim cannot be pulled
    if missing:
        return f"{', '.join(missing)} not installed: the image tests need them ({INSTALL}, as root)"
    if os.geteuid() != 0:
        return "the image tests build (buildah, mmdebstrap) and run (runc) containers as root: run them as root"
    return None


def image_names() -> dict[str, tuple[str, Path]]:
    """What docker/build.sh builds: target -> (image reference, OCI archive), from its own --print-names."""
    out = subprocess.run([str(BUILD), "--print-names"], capture_output=True, text=True, check=True).stdout
    names = {}
    for line in out.splitlines():
        reference, archive = line.split()
        names[reference.rsplit("/", 1)[1].split(":")[0].removeprefix("stagerun-")] = (reference, Path(archive))
    return names


@dataclass
class Image:
    reference: str
    archive: Path | None

    @property
    def config(self) -> dict:
        out = output_of("buildah", "inspect", "--type", "image", self.reference)
        return json.loads(out)["OCIv1"]["config"]


def output_of(*args: str, timeout: float = 120) -> str:
    """A command's stdout; the test fails, with its output, when it fails."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def build(target: str, out: Path, *options: str) -> Image:
    reason = why_no_image_tools()
    if reason:
        pytest.skip(reason)
    command = [str(BUILD), target, "--out", str(out), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr[-6000:]}"
    reference, _ = image_names()[target]
    archive = out / f"stagerun-{target}-{reference.rsplit(':', 1)[1]}.oci.tar"
    return Image(reference, None if "--no-archive" in options else archive)


# -- running: runc with a kubelet's restrictions -------------------------------------------------------------------


@dataclass
class Mount:
    target: str
    source: Path | None = None  # None: a tmpfs
    read_only: bool = False

    def spec(self) -> dict:
        if self.source is None:
            return {"destination": self.target, "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}
        return {
            "destination": self.target,
            "type": "bind",
            "source": str(self.source),
            "options": ["rbind", "ro" if self.read_only else "rw"],
        }


def writable_dir(path: Path, owner: int | None = None) -> Path:
    """A folder as an emptyDir is (world-writable), or owned by ``owner`` (a volume writable by that uid)."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is None:
        path.chmod(0o777)
    else:
        os.chown(path, owner, owner)
        path.chmod(0o770)
    return path


class Container:
    """One container of an image, run by runc in the foreground (``runc run``) until it exits or is stopped."""

    def __init__(
        self,
        image: Image,
        workdir: Path,
        *,
        command: list[str] | None = None,
        args: list[str] | None = None,
        env: dict | None = None,
        mounts: list[Mount] = (),
    ):
        config = image.config
        self.image, self.workdir, self.id = image, workdir, f"stagerun-test-{uuid.uuid4().hex[:12]}"
        self.log = workdir / "container.log"
        user, _, group = config["User"].partition(":")
        environment = dict(item.split("=", 1) for item in config.get("Env", []))
        environment.update(env or {})
        # A pod's rule: `command` replaces the image's entrypoint (and its default arguments), `args` its arguments.
        if command is None:
            command = [*(config.get("Entrypoint") or []), *(args if args is not None else config.get("Cmd") or [])]
        elif args:
            command = [*command, *args]
        self.args, self.user, self.mounts = command, (int(user), int(group or user)), list(mounts)
        self.environment, self.cwd = environment, config.get("WorkingDir") or "/"
        self._process: subprocess.Popen | None = None
        self._working: str | None = None

    def _runtime_config(self, rootfs: str) -> dict:
        hosts = self.workdir / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        hosts.chmod(0o644)
        standard = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=1g"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            Mount("/etc/hosts", hosts, read_only=True).spec(),
        ]
        no_capabilities = {key: [] for key in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": self.user[0], "gid": self.user[1]},
                "args": self.args,
                "env": [f"{key}={value}" for key, value in self.environment.items()],
                "cwd": self.cwd,
                "capabilities": no_capabilities,
                "noNewPrivileges": True,
            },
            "root": {"path": rootfs, "readonly": True},
            "hostname": "stagerun-test",
            "mounts": standard + [mount.spec() for mount in self.mounts],
            "linux": {
                # No network namespace: the container reaches the control plane on the host's loopback.
                "namespaces": [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        }

    def __enter__(self) -> Container:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._working = output_of("buildah", "from", "--pull-never", self.image.reference).strip()
        rootfs = output_of("buildah", "mount", self._working).strip()
        (self.workdir / "config.json").write_text(json.dumps(self._runtime_config(rootfs)))
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                ["runc", "run", "--bundle", str(self.workdir), self.id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._process is not None and self._process.poll() is None:
                self.stop(timeout=10)
        finally:
            subprocess.run(["runc", "delete", "--force", self.id], capture_output=True)
            if self._working:
                subprocess.run(["buildah", "umount", self._working], capture_output=True)
                subprocess.run(["buildah", "rm", self._working], capture_output=True)

    def wait(self, timeout: float) -> int:
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.args} still running after {timeout:.0f} s:\n{self.logs()}")

    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as a kubelet does, then SIGKILL after ``timeout``; the exit status."""
        subprocess.run(["runc", "kill", self.id, "TERM"], capture_output=True)
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True)
            return self._process.wait(30)

    def logs(self, max_chars: int = 8000) -> str:
        return self.log.read_text(errors="replace")[-max_chars:]


def run_to_end(image: Image, workdir: Path, timeout: float = 120, **kwargs) -> tuple[int, str]:
    with Container(image, workdir, **kwargs) as container:
        code = container.wait(timeout)
        return code, container.logs()


def http_get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return None


def wait_for(what: str, check, timeout: float, diagnostics) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{diagnostics()}")
        time.sleep(0.3)


# Where pip and uv read configuration from (an index, a CA bundle), and the variables that would carry one.
CONFIG_NAMES = ("pip.conf", "pip.ini", "uv.toml")
BUILD_ENV = (
    "PIP_CERT",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_TRUSTED_HOST",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "UV_INDEX_URL",
    "UV_NATIVE_TLS",
    "UV_SYSTEM_CERTS",
)
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # where Debian keeps a machine's own CAs (a proxy's)
CERT_FILE = re.compile(r"(\.(pem|crt|cer)$)|ca-?bundle|cacert|ca-certificates")


def _pem_bodies(text: str) -> set[str]:
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    return {"".join(block.split()) for block in blocks}


def build_machine_leftovers(rootfs: Path, config: dict, local_cas: Path = LOCAL_CAS) -> list[str]:
    """What of the build machine an image's filesystem (``rootfs``) and configuration hold: pip/uv configuration
    files anywhere, build-time variables in its environment, a build secret, a certificate of ``local_cas``."""
    local: set[str] = set()
    for path in local_cas.rglob("*.crt") if local_cas.is_dir() else ():
        local |= _pem_bodies(path.read_text())
    found = [f"ENV {item}" for item in config.get("Env", []) if item.split("=", 1)[0] in BUILD_ENV]
    # The build's secret mount point may stay behind as an empty folder; nothing may be in it.
    found += [f"/{p.relative_to(rootfs)} (a build secret)" for p in (rootfs / "run" / "secrets").glob("**/*")]
    for folder, dirs, files in os.walk(rootfs):
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
        for name in files:
            path = Path(folder, name)
            if path.is_symlink():  # an absolute link would be read on the host, not in the image
                continue
            inside = "/" + str(path.relative_to(rootfs))
            if name in CONFIG_NAMES:
                found.append(f"{inside} (pip/uv configuration)")
            elif local and CERT_FILE.search(name.lower()) and path.stat().st_size < 8_000_000:
                if _pem_bodies(path.read_text(errors="replace")) & local:
                    found.append(f"{inside} (holds a CA of this machine's {local_cas})")
    return found
