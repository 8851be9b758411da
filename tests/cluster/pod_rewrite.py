"""What a node gives a container, rebuilt for a local process: volumes as directories, the environment, the command.

A container image and a mount namespace are what make `/etc/stagerun/trainingrun.yaml` or `/dev/termination-log`
exist inside a real container. A local process has neither, so the process kubelet materialises each volume as a
directory under the pod's folder and rewrites every path under a mount path (in env values, arguments and the
working directory) to that directory:

- ConfigMap and Secret volumes, and projected volumes (ConfigMap, Secret, downward API and ServiceAccount token
  sources: what the ServiceAccount admission plugin mounts at /var/run/secrets/kubernetes.io/serviceaccount) are
  files, rewritten when their source changes (`refresh`); a missing source keeps the pod in ContainerCreating, as
  a kubelet's failing mount does;
- an emptyDir is a fresh directory, a hostPath is itself, a PersistentVolumeClaim is one directory per claim shared
  by every pod of the kubelet (a ReadWriteMany volume);
- the termination message path is a file of the pod's folder.

The environment is built as a kubelet builds it: the `KUBERNETES_SERVICE_*` variables (pointing at the apiserver on
127.0.0.1: ClusterIPs are never dialled, and no other Service's variables are given for the same reason), then
`envFrom`, then `env` with `$(VAR)` expansion, `fieldRef`, `configMapKeyRef` and `secretKeyRef` (a missing key is
CreateContainerConfigError). Commands map to this interpreter: `stagerun` runs `python -m stagerun.trainer.cli`,
`python`/`python3` run `sys.executable`, `torchrun` runs `python -m torch.distributed.run`.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "stagerun": [sys.executable, "-m", "stagerun.trainer.cli"],
    "python": [sys.executable],
    "python3": [sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")

# (kind, namespace, name) -> the object, or None when it does not exist; kind is "configmaps" or "secrets".
Reader = Callable[[str, str, str], Mapping | None]
# (audience or None, expirationSeconds) -> a token for the pod's ServiceAccount, bound to the pod.
TokenIssuer = Callable[[str | None, int], str]


class MissingVolumeSource(Exception):
    """A volume's ConfigMap/Secret does not exist yet: the pod waits in ContainerCreating (retried)."""


class ContainerConfigError(Exception):
    """The container's environment names a missing ConfigMap/Secret or key: CreateContainerConfigError (retried)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are substituted, others stay as written, `$$` is `$`."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(substitute, text)


def field_value(pod: Mapping, path: str, address: str, host_address: str) -> str:
    """A downward-API `fieldRef` (env or volume file)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    keyed = _FIELD_KEY.match(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": address,
        "status.podIPs": address,
        "status.hostIP": host_address,
        "status.hostIPs": host_address,
    }
    if path not in values:
        raise ContainerConfigError(f"fieldRef {path!r} is not supported by the process kubelet")
    return values[path]


def _source_data(read: Reader, kind: str, namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's or Secret's entries as text (None when it does not exist)."""
    obj = read(kind, namespace, name)
    if obj is None:
        return None
    data = dict(obj.get("data") or {})
    if kind == "secrets":
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
    for key, value in (obj.get("binaryData") or {}).items():
        data[key] = base64.b64decode(value).decode(errors="replace")
    return data


def _select(data: Mapping[str, str], items: list | None) -> dict[str, str]:
    if not items:
        return dict(data)
    return {item.get("path", item["key"]): data[item["key"]] for item in items if item["key"] in data}


@dataclass
class FileVolume:
    """A volume whose content is files computed from API objects (kept to refresh them)."""

    volume: dict
    local: Path
    files: dict[str, str] = field(default_factory=dict)


class PodFiles:
    """The volumes of one pod, materialised under `root/volumes/<name>`."""

    def __init__(
        self, pod: Mapping, root: Path, shared_claims: Path, read: Reader, issue_token: TokenIssuer, address: str
    ):
        self.pod, self.root, self.read, self.issue_token, self.address = pod, root, read, issue_token, address
        self.namespace = pod["metadata"]["namespace"]
        self.paths: dict[str, Path] = {}
        self.file_volumes: list[FileVolume] = []
        self._tokens: dict[tuple[str | None, int], str] = {}  # issued once per pod: they outlive any test
        for volume in (pod.get("spec") or {}).get("volumes") or ():
            local = root / "volumes" / volume["name"]
            if any(kind in volume for kind in ("configMap", "secret", "projected", "downwardAPI")):
                entry = FileVolume(volume, local)
                self._write(entry, self._files(volume))
                self.file_volumes.append(entry)
            elif "persistentVolumeClaim" in volume:
                local = shared_claims / self.namespace / volume["persistentVolumeClaim"]["claimName"]
                local.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                local = Path(volume["hostPath"]["path"])
            else:  # emptyDir, and anything else a test might use: a fresh directory
                local.mkdir(parents=True, exist_ok=True)
            self.paths[volume["name"]] = local

    def _named(self, kind: str, source: Mapping) -> dict[str, str]:
        name = source.get("name") or source.get("secretName") or ""
        data = _source_data(self.read, kind, self.namespace, name)
        if data is None:
            if source.get("optional"):
                return {}
            raise MissingVolumeSource(f'{kind[:-1]} "{name}" not found')
        return _select(data, source.get("items"))

    def _files(self, volume: Mapping) -> dict[str, str]:
        if "configMap" in volume:
            return self._named("configmaps", volume["configMap"])
        if "secret" in volume:
            return self._named("secrets", volume["secret"])
        if "downwardAPI" in volume:
            return self._downward(volume["downwardAPI"].get("items") or ())
        files: dict[str, str] = {}
        for source in volume["projected"].get("sources") or ():
            if "configMap" in source:
                files.update(self._named("configmaps", source["configMap"]))
            elif "secret" in source:
                files.update(self._named("secrets", source["secret"]))
            elif "downwardAPI" in source:
                files.update(self._downward(source["downwardAPI"].get("items") or ()))
            elif "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                key = (token.get("audience"), int(token.get("expirationSeconds") or 3600))
                if key not in self._tokens:
                    self._tokens[key] = self.issue_token(*key)
                files[token["path"]] = self._tokens[key]
        return files

    def _downward(self, items) -> dict[str, str]:
        return {
            item["path"]: field_value(self.pod, item["fieldRef"]["fieldPath"], self.address, "127.0.0.1")
            for item in items
            if "fieldRef" in item
        }

    @staticmethod
    def _write(entry: FileVolume, files: dict[str, str]) -> None:
        """Each file replaced atomically (a reader never sees half of one); files gone from the source go too."""
        entry.local.mkdir(parents=True, exist_ok=True)
        for relative, text in files.items():
            path = entry.local / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(text)
            os.replace(temporary, path)
        for relative in set(entry.files) - set(files):
            (entry.local / relative).unlink(missing_ok=True)
        entry.files = dict(files)

    def refresh(self) -> None:
        """As a kubelet's volume manager does (only sooner): changed sources show in the running pod's files."""
        for entry in self.file_volumes:
            try:
                files = self._files(entry.volume)
            except MissingVolumeSource:
                continue  # deleted under a running pod: the files stay as they were
            if files != entry.files:
                self._write(entry, files)


def mounts(container: Mapping, volume_paths: Mapping[str, Path], termination_log: Path) -> list[tuple[str, str]]:
    """`(mount path, local directory)` of a container, the termination message path included."""
    found = [
        (m["mountPath"].rstrip("/") or "/", str(volume_paths[m["name"]] / m.get("subPath", "")).rstrip("/"))
        for m in container.get("volumeMounts") or ()
        if m.get("name") in volume_paths
    ]
    found.append((container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, str(termination_log)))
    return found


def rewrite_paths(text: str, mount_table: list[tuple[str, str]]) -> str:
    """Paths at or under a mount path -> the local directory (the longest mount path wins)."""
    if not mount_table:
        return text
    ordered = sorted(mount_table, key=lambda m: len(m[0]), reverse=True)
    local = dict(ordered)
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(m) for m, _ in ordered) + r")(?=/|$|[^\w.-])")
    return pattern.sub(lambda match: local[match.group(1)], text)


def service_env(api_port: int) -> dict[str, str]:
    """The variables a kubelet gives every container for the `kubernetes` Service, aimed at loopback."""
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port),
        "KUBERNETES_PORT": f"tcp://127.0.0.1:{api_port}",
    }


def container_env(pod: Mapping, container: Mapping, address: str, read: Reader, base: Mapping[str, str]) -> dict:
    """The container's own variables (`base`: those the kubelet sets first, visible to `$(VAR)`)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = dict(base)
    for source in container.get("envFrom") or ():
        for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
            if key in source:
                data = _source_data(read, kind, namespace, source[key]["name"])
                if data is None and not source[key].get("optional"):
                    raise ContainerConfigError(f'{kind[:-1]} "{source[key]["name"]}" not found')
                env.update({source.get("prefix", "") + k: v for k, v in (data or {}).items()})
    for item in container.get("env") or ():
        name, value_from = item["name"], item.get("valueFrom")
        if value_from is None:
            env[name] = expand(str(item.get("value", "")), env)
        elif "fieldRef" in value_from:
            env[name] = field_value(pod, value_from["fieldRef"]["fieldPath"], address, "127.0.0.1")
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            kind, key = (
                ("secrets", "secretKeyRef") if "secretKeyRef" in value_from else ("configmaps", "configMapKeyRef")
            )
            ref = value_from[key]
            data = _source_data(read, kind, namespace, ref["name"])
            if data is not None and ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind[:-1]} {namespace}/{ref['name']}")
        else:  # resourceFieldRef: there are no cgroups to read a limit from
            raise ContainerConfigError(f"env {name}: {sorted(value_from)} is not supported by the process kubelet")
    return env


def command_line(container: Mapping, env: Mapping[str, str], rewrite: Callable[[str], str]) -> list[str]:
    """The argv of the container's process; ValueError when it cannot run here (no command: the image decides)."""
    words = [str(w) for w in (container.get("command") or ())] + [str(a) for a in (container.get("args") or ())]
    if not container.get("command"):
        raise ValueError("the container has no command: the image's entrypoint is unknown to a process kubelet")
    argv = [rewrite(expand(word, env)) for word in words]
    if argv[0] in COMMANDS:
        return [*COMMANDS[argv[0]], *argv[1:]]
    if shutil.which(argv[0]) is None:
        raise ValueError(f'exec: "{argv[0]}": executable file not found in $PATH')
    return argv
