"""A kubelet that really runs the pods: each container's command is a local process (for end-to-end tests).

``ProcessCluster(api, workdir)`` is a :class:`~kube.kubelet.FakeCluster` (same nodes, job controller, scheduler and
test controls) whose kubelet starts every scheduled pod's containers with ``subprocess.Popen`` in a new session, and
rewrites what a real node provides through volumes and DNS:

- each pod gets its own loopback address, ``STAGERUN_NODE_ADDR`` and ``status.podIP``: ``127.0.<n>.<10 + index>``
  for an Indexed Job's pods (``n`` per Job, so peers share the prefix and index 0 string-sorts first), else
  ``127.1.<a>.<b>``;
- env: literal values with ``$(VAR)`` expansion, ``fieldRef`` (metadata.name/namespace/uid/labels[..]/annotations[..],
  spec.nodeName, spec.serviceAccountName, status.podIP/podIPs/hostIP), ``secretKeyRef``/``configMapKeyRef`` and
  ``envFrom`` (Secrets and ConfigMaps read from the API); ``command``/``args`` get the same ``$(VAR)`` expansion;
- volumes: ConfigMap and Secret volumes are written as files under ``<workdir>/pods/<pod>/volumes/<volume>`` (and
  rewritten while the pod runs when the ConfigMap/Secret changes, as a kubelet does: ``refresh_volumes``),
  emptyDirs are directories there (e.g. the one at ``/var/lib/stagerun``), a hostPath is itself; every env value
  and argument naming a path under such a mount path is rewritten to the local directory. A PVC is the local
  directory at its mount path (created if missing, shared by every pod): e2e tests mount their claims, e.g. the
  checkpoint volumeClaim at ``checkpoint.path``, on a temporary directory;
- the termination message file (``/dev/termination-log`` or the container's ``terminationMessagePath``) is
  ``<workdir>/pods/<pod>/<container>.termination-log``, exported as ``STAGERUN_TERMINATION_LOG`` (and rewritten
  where named);
- DNS: ``<hostname>.<subdomain>`` (optionally ``.<namespace>[.svc[.cluster.local]]``) of a pod, or of a would-be pod
  of an Indexed Job, becomes that pod's address in env values and arguments;
- ``stagerun`` runs as ``[sys.executable, "-m", "stagerun.trainer.cli"]``, ``python``/``python3`` as
  ``sys.executable``, ``torchrun`` as ``[sys.executable, "-m", "torch.distributed.run"]``;
- the process environment is this process's (minus ``KUBECONFIG``, ``KUBERNETES_*`` and ``STAGERUN_*``) plus
  ``PYTHONUNBUFFERED=1``, ``HOSTNAME`` and the pod's env.

A process exit sets the container terminated (exitCode, reason Completed/Error, ``message`` = the termination-log
file, or the log tail with ``terminationMessagePolicy: FallbackToLogsOnError``) and the pod Succeeded/Failed. A
graceful pod deletion sends SIGTERM to the process group and SIGKILL after ``min(grace, max_grace)`` seconds, then
removes the pod; a force deletion (the pod vanishes) SIGKILLs at once. ``node_not_ready`` SIGKILLs the node's
processes (a dead node) and leaves its pods as they are. Output goes to ``<workdir>/<pod>.log`` (further containers:
``<workdir>/<pod>.<container>.log``); ``logs(pod)`` / ``all_logs()`` read them, and the API serves them as
``GET .../pods/<name>/log``. Init containers are not run.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .emulator import Api
from .kubelet import TERMINAL, FakeCluster, _meta, controller_uid, pod_index

COMMANDS: dict[str, list[str]] = {
    "stagerun": [sys.executable, "-m", "stagerun.trainer.cli"],
    "python": [sys.executable],
    "python3": [sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}
MAX_MESSAGE = 4096
_DNS_NAME = re.compile(
    r"(?<![A-Za-z0-9.-])[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)+"
    r"(?![A-Za-z0-9-])"
)
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^(metadata\.(?:labels|annotations))\['(.+)'\]$")


class PodNotReady(Exception):
    """The pod cannot start yet (a ConfigMap/Secret it needs is missing): retried on the next pass."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are substituted, ``$$`` is a literal ``$``."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(substitute, text)


@dataclasses.dataclass
class _Container:
    name: str
    process: subprocess.Popen | None
    termination_log: Path
    log_path: Path
    policy: str
    cwd: str
    result: tuple[int, str, str | None] | None = None  # exit code, reason, message


@dataclasses.dataclass
class _PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    hostname: str | None
    subdomain: str | None
    root: Path
    containers: list[_Container]
    env: dict[str, dict[str, str]]
    argv: dict[str, list[str]]
    sources: list[dict]
    term_at: float | None = None
    kill_at: float | None = None
    reported: bool = False
    abandoned: bool = False  # its node was lost: nothing is reported any more

    def alive(self) -> list[_Container]:
        return [c for c in self.containers if c.process is not None and c.process.poll() is None]


class ProcessCluster(FakeCluster):
    """A FakeCluster whose kubelet runs each pod's containers as local processes (see the module docstring)."""

    def __init__(
        self,
        api: Api,
        workdir: str | Path,
        nodes: Iterable[str] = ("node-1", "node-2"),
        *,
        max_grace: float = 30.0,
        commands: dict[str, list[str]] | None = None,
        extra_env: dict[str, str] | None = None,
        auto_run: bool = True,
        interval: float = 0.1,
        refresh_volumes: bool = True,
    ):
        super().__init__(api, nodes, auto_run=auto_run, interval=interval, pod_ip_prefix="127.1")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.max_grace = max_grace
        self.commands = {**COMMANDS, **(commands or {})}
        self.extra_env = dict(extra_env or {})
        self.refresh_volumes = refresh_volumes
        self.runs: dict[str, _PodRun] = {}
        self._blocks: dict[str, int] = {}  # job uid -> third octet of its pods' addresses
        self._other_ips = 0

    # lifecycle

    def start(self) -> ProcessCluster:
        super().start()
        self.api.emulator.log_provider = self._log_text
        return self

    def stop(self) -> None:
        super().stop()
        if self.api.emulator is not None and self.api.emulator.log_provider == self._log_text:
            self.api.emulator.log_provider = None
        with self._lock:
            for run in self.runs.values():
                self._signal(run, signal.SIGKILL)
            for run in self.runs.values():
                for container in run.containers:
                    if container.process is not None:
                        try:
                            container.process.wait(5)
                        except subprocess.TimeoutExpired:
                            pass

    # addresses & names

    def _block(self, job_uid: str) -> int:
        if job_uid not in self._blocks:
            self._blocks[job_uid] = len(self._blocks) % 254 + 1
        return self._blocks[job_uid]

    def _pod_ip(self, pod: dict) -> str:
        index, owner = pod_index(pod), controller_uid(pod)
        if index is not None and owner is not None and index < 245:
            return f"127.0.{self._block(owner)}.{10 + index}"
        self._other_ips += 1
        return f"127.1.{self._other_ips // 250 % 250 + 1}.{self._other_ips % 250 + 2}"

    def _dns_table(self, namespace: str) -> dict[tuple[str, str], str]:
        """``(hostname, subdomain) -> address`` in ``namespace``: running pods', and those every Indexed Job's pods
        have or will have (so a pod can name a peer that does not exist yet)."""
        table: dict[tuple[str, str], str] = {}
        for job in self.api.list("jobs", namespace):
            meta, spec = _meta(job), job.get("spec") or {}
            subdomain = ((spec.get("template") or {}).get("spec") or {}).get("subdomain")
            if spec.get("completionMode") == "Indexed" and subdomain:
                for index in range(min(int(spec.get("completions") or 0), 245)):
                    table[(f"{meta['name']}-{index}", subdomain)] = f"127.0.{self._block(meta['uid'])}.{10 + index}"
        for run in self.runs.values():
            if run.namespace == namespace and run.hostname and run.subdomain:
                table[(run.hostname, run.subdomain)] = run.ip
        return table

    def _rewrite(
        self, text: str, namespace: str, mounts: list[tuple[str, str]], dns: dict[tuple[str, str], str]
    ) -> str:
        """Paths under mount paths -> local directories; ``host.subdomain[.ns[.svc[.cluster.local]]]`` -> address."""
        if mounts:
            ordered = sorted(mounts, key=lambda m: len(m[0]), reverse=True)
            table = dict(ordered)
            pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(m) for m, _ in ordered) + r")(?=/|$|[^\w.-])")
            text = pattern.sub(lambda match: table[match.group(1)], text)

        def resolve(match: re.Match) -> str:
            labels = match.group(0).split(".")
            if labels[2:] not in ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"]):
                return match.group(0)
            return dns.get((labels[0], labels[1]), match.group(0))

        return _DNS_NAME.sub(resolve, text) if dns else text

    # building a pod's processes

    def _source(self, kind: str, namespace: str, name: str, optional: bool) -> tuple[dict[str, str] | None, str]:
        """A ConfigMap's or Secret's data as text and its resourceVersion (None, "" if missing and optional;
        PodNotReady if missing)."""
        obj = self.api.get("configmaps" if kind == "configMap" else "secrets", namespace, name)
        if obj is None:
            if optional:
                return None, ""
            raise PodNotReady(f"{kind} {name!r} not found")
        data = {k: v for k, v in (obj.get("data") or {}).items()}
        if kind == "secret":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value).decode(errors="replace")
        return data, _meta(obj)["resourceVersion"]

    @staticmethod
    def _materialize(local: Path, data: dict[str, str] | None, items: list | None) -> None:
        """Write a ConfigMap/Secret volume's files (each replaced atomically; keys gone from the source go too)."""
        local.mkdir(parents=True, exist_ok=True)
        wanted: dict[str, str] = {}
        for key, value in (data or {}).items():
            for target in [i.get("path", key) for i in items if i.get("key") == key] if items else [key]:
                wanted[target] = value
        for target, value in wanted.items():
            path = local / target
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(value)
            os.replace(temporary, path)
        for path in local.rglob("*"):
            if path.is_file() and str(path.relative_to(local)) not in wanted:
                path.unlink()

    def _volumes(self, pod: dict, root: Path) -> tuple[dict[str, Path], list[dict]]:
        """Local directories of the pod's volumes, and the ConfigMap/Secret sources (for refreshes)."""
        namespace, spec = _meta(pod)["namespace"], pod.get("spec") or {}
        paths: dict[str, Path] = {}
        sources: list[dict] = []
        for volume in spec.get("volumes") or ():
            name = volume["name"]
            local = root / "volumes" / name
            if "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                source = volume[kind]
                source_name = source.get("name") or source.get("secretName")
                data, version = self._source(kind, namespace, source_name, bool(source.get("optional")))
                self._materialize(local, data, source.get("items"))
                sources.append(
                    {
                        "local": local,
                        "kind": kind,
                        "name": source_name,
                        "items": source.get("items"),
                        "optional": bool(source.get("optional")),
                        "version": version,
                    }
                )
            elif "persistentVolumeClaim" in volume:
                continue  # the local directory at the mount path itself (shared by every pod mounting it)
            elif "hostPath" in volume:
                local = Path(volume["hostPath"]["path"])
            else:  # emptyDir and anything else: a fresh directory
                local.mkdir(parents=True, exist_ok=True)
            paths[name] = local
        return paths, sources

    def _refresh_volumes(self, run: _PodRun) -> None:
        """As a kubelet does (only sooner): a changed ConfigMap/Secret shows in the running pod's mounted files."""
        for source in run.sources:
            try:
                data, version = self._source(source["kind"], run.namespace, source["name"], source["optional"])
            except PodNotReady:
                continue  # deleted under a running pod: the files stay as they were
            if version != source["version"]:
                self._materialize(source["local"], data, source["items"])
                source["version"] = version

    def _env(self, pod: dict, container: dict, ip: str) -> dict[str, str]:
        meta, spec = _meta(pod), pod.get("spec") or {}
        namespace = meta["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or ():
            prefix = source.get("prefix", "")
            for kind, key in (("configMap", "configMapRef"), ("secret", "secretRef")):
                if key in source:
                    data, _ = self._source(kind, namespace, source[key]["name"], bool(source[key].get("optional")))
                    env.update({prefix + k: v for k, v in (data or {}).items()})
        status = pod.get("status") or {}
        for item in container.get("env") or ():
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            value_from = item["valueFrom"]
            if "fieldRef" in value_from:
                path = value_from["fieldRef"]["fieldPath"]
                keyed = _FIELD_KEY.match(path)
                if keyed:
                    section = meta.get(keyed.group(1).split(".")[1]) or {}
                    env[name] = str(section.get(keyed.group(2), ""))
                else:
                    env[name] = str(
                        {
                            "metadata.name": meta["name"],
                            "metadata.namespace": namespace,
                            "metadata.uid": meta["uid"],
                            "spec.nodeName": spec.get("nodeName", ""),
                            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                            "status.podIP": ip,
                            "status.podIPs": ip,
                            "status.hostIP": status.get("hostIP", "127.0.0.1"),
                            "status.hostIPs": status.get("hostIP", "127.0.0.1"),
                        }.get(path, "")
                    )
            elif "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
                kind = "secret" if "secretKeyRef" in value_from else "configMap"
                ref = value_from["secretKeyRef" if kind == "secret" else "configMapKeyRef"]
                data, _ = self._source(kind, namespace, ref["name"], bool(ref.get("optional")))
                if data is not None and ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise PodNotReady(f"{kind} {ref['name']!r} has no key {ref['key']!r}")
            else:  # resourceFieldRef and the like: not modelled
                env[name] = ""
        return env

    def _start(self, pod: dict, node: dict) -> None:
        meta, spec = _meta(pod), pod.get("spec") or {}
        uid = meta["uid"]
        if uid in self.runs:
            return
        root = self.workdir / "pods" / meta["name"]
        root.mkdir(parents=True, exist_ok=True)
        ip = self._pod_ip(pod)
        dns = self._dns_table(meta["namespace"])
        if spec.get("hostname") and spec.get("subdomain"):
            dns[(spec["hostname"], spec["subdomain"])] = ip
        try:
            volumes, sources = self._volumes(pod, root)
            containers, envs, argvs = [], {}, {}
            for i, container in enumerate(spec.get("containers") or ()):
                cname = container["name"]
                termination_log = root / f"{cname}.termination-log"
                termination_log.write_text("")
                mounts = [
                    (m["mountPath"].rstrip("/") or "/", str(volumes[m["name"]] / m.get("subPath", "")))
                    for m in container.get("volumeMounts") or ()
                    if m.get("name") in volumes
                ]
                for mount in container.get("volumeMounts") or ():
                    if mount.get("name") not in volumes:  # a PVC: the mount path is a local (test) directory
                        Path(mount["mountPath"]).mkdir(parents=True, exist_ok=True)
                mounts.append((container.get("terminationMessagePath", "/dev/termination-log"), str(termination_log)))
                pod_env = self._env(pod, container, ip)
                pod_env = {k: self._rewrite(v, meta["namespace"], mounts, dns) for k, v in pod_env.items()}
                env = {
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("STAGERUN_", "KUBERNETES_")) and k != "KUBECONFIG"
                }
                env.update(self.extra_env)
                env.update({"PYTHONUNBUFFERED": "1", "HOSTNAME": spec.get("hostname") or meta["name"]})
                env.update(pod_env)
                env.update({"STAGERUN_NODE_ADDR": ip, "STAGERUN_TERMINATION_LOG": str(termination_log)})
                argv = [
                    self._rewrite(expand(str(a), pod_env), meta["namespace"], mounts, dns)
                    for a in list(container.get("command") or ()) + list(container.get("args") or ())
                ]
                if argv and argv[0] in self.commands:
                    argv = list(self.commands[argv[0]]) + argv[1:]
                workdir = container.get("workingDir")
                cwd = self._rewrite(workdir, meta["namespace"], mounts, {}) if workdir else str(root)
                log_path = self.workdir / (f"{meta['name']}.log" if i == 0 else f"{meta['name']}.{cname}.log")
                envs[cname], argvs[cname] = env, argv
                containers.append(
                    _Container(
                        cname, None, termination_log, log_path, container.get("terminationMessagePolicy", "File"), cwd
                    )
                )
        except PodNotReady as exc:
            self._write_status(
                pod,
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": c["name"],
                            "image": c.get("image", ""),
                            "imageID": "",
                            "ready": False,
                            "started": False,
                            "restartCount": 0,
                            "lastState": {},
                            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}},
                        }
                        for c in spec.get("containers") or ()
                    ],
                },
            )
            return
        run = _PodRun(
            uid,
            meta["namespace"],
            meta["name"],
            _meta(node)["name"],
            ip,
            spec.get("hostname"),
            spec.get("subdomain"),
            root,
            containers,
            envs,
            argvs,
            sources,
        )
        self.runs[uid] = run
        for container in containers:
            argv = argvs[container.name]
            with open(container.log_path, "ab") as log:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                try:
                    container.process = subprocess.Popen(
                        argv,
                        env=envs[container.name],
                        cwd=container.cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except (OSError, IndexError) as exc:
                    log.write(f"cannot start the container: {exc}\n".encode())
                    container.result = (128, "StartError", f"cannot start the container: {exc}")
        self._write_status(pod, self._running_status(pod, node, ip))

    # watching the processes

    def _collect(self, run: _PodRun) -> bool:
        """Record exited containers; True when every container has exited."""
        for container in run.containers:
            if container.result is not None or container.process is None:
                continue
            code = container.process.poll()
            if code is None:
                continue
            code = code if code >= 0 else 128 - code
            message = (
                container.termination_log.read_text(errors="replace")[:MAX_MESSAGE]
                if container.termination_log.exists()
                else ""
            )
            if not message and code != 0 and container.policy == "FallbackToLogsOnError":
                lines = container.log_path.read_text(errors="replace").splitlines()[-80:]
                message = "\n".join(lines)[-2048:]
            container.result = (code, "Completed" if code == 0 else "Error", message or None)
        return all(c.result is not None for c in run.containers)

    def _report(self, run: _PodRun, pod: dict) -> None:
        results = {c.name: c.result for c in run.containers if c.result is not None}
        self._write_status(pod, self._terminated_status(pod, results))
        run.reported = True

    def _sync_running(self, pod: dict) -> None:
        run = self.runs.get(_meta(pod)["uid"])
        if run is None or run.reported or run.abandoned:
            return
        if self._collect(run):
            self._report(run, pod)
        elif self.refresh_volumes:
            self._refresh_volumes(run)

    def _terminate(self, pod: dict) -> None:
        meta = _meta(pod)
        run = self.runs.get(meta["uid"])
        if run is None:  # never started
            self._remove_pod(pod)
            return
        if run.abandoned:
            return
        now = time.monotonic()
        if run.term_at is None:
            run.term_at = now
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            run.kill_at = now + min(grace, self.max_grace)
            self._signal(run, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        elif run.kill_at is not None and now >= run.kill_at and run.alive():
            self._signal(run, signal.SIGKILL)
            run.kill_at = None
        if not self._collect(run):
            return
        if not run.reported and (pod.get("status") or {}).get("phase") not in TERMINAL:
            self._report(run, pod)
        self._remove_pod(pod)

    def _reap(self, present: set[str]) -> None:
        for uid in list(self.runs):
            if uid not in present:
                run = self.runs.pop(uid)
                self._signal(run, signal.SIGKILL)
                for container in run.containers:
                    if container.process is not None:
                        try:
                            container.process.wait(5)
                        except subprocess.TimeoutExpired:
                            pass

    def _on_node_lost(self, node: str) -> None:
        for run in self.runs.values():
            if run.node == node:
                self._signal(run, signal.SIGKILL)
                run.abandoned = True

    @staticmethod
    def _signal(run: _PodRun, sig: int, container: str | None = None) -> None:
        for c in run.containers:
            if c.process is not None and c.process.poll() is None and (container is None or c.name == container):
                try:
                    os.killpg(c.process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    # test controls

    def _run_of(self, pod: dict | str) -> _PodRun:
        if isinstance(pod, dict):
            uid = _meta(pod).get("uid")
            if uid in self.runs:
                return self.runs[uid]
            pod = _meta(pod)["name"]
        for run in self.runs.values():
            if run.name == pod:
                return run
        raise LookupError(f"pod {pod!r} has no processes")

    def kill_pod_process(self, pod: dict | str, sig: int = signal.SIGKILL, container: str | None = None) -> None:
        """Simulate a crash inside the pod: send ``sig`` to its containers' process groups."""
        with self._lock:
            self._signal(self._run_of(pod), sig, container)

    def pod_ip(self, pod: dict | str) -> str:
        return self._run_of(pod).ip

    def pod_dir(self, pod: dict | str) -> Path:
        """The pod's local directory (volumes, termination logs)."""
        return self._run_of(pod).root

    def pod_env(self, pod: dict | str, container: str | None = None) -> dict[str, str]:
        """The environment the container's process got."""
        run = self._run_of(pod)
        return dict(run.env[container or run.containers[0].name])

    def pod_argv(self, pod: dict | str, container: str | None = None) -> list[str]:
        run = self._run_of(pod)
        return list(run.argv[container or run.containers[0].name])

    def log_path(self, pod: dict | str) -> Path:
        name = pod if isinstance(pod, str) else _meta(pod)["name"]
        return self.workdir / f"{name}.log"

    def logs(self, pod: dict | str) -> str:
        """The output of the pod's (first) container ('' when it has none yet)."""
        path = self.log_path(pod)
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self, max_chars: int = 20_000) -> str:
        """Every pod's output, each under a header, the end of each kept: for assertion messages."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"----- {path.stem} -----\n{text[-max_chars:]}")
        return "\n".join(parts)

    def _log_text(self, namespace: str, name: str, container: str | None) -> str | None:
        path = self.workdir / (f"{name}.log" if not container else f"{name}.{container}.log")
        if container and not path.exists():
            path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else None
