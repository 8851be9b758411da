"""Pod addresses and pod DNS names for the process kubelet: what a CNI plugin and the cluster DNS provide.

Addresses (the CNI plugin's part): every pod gets its own loopback address, `127.<P>.<B>.<10 + index>` for the pod
of an Indexed Job's completion index (`B` one block per Job, so a gang shares a prefix and pod 0's address sorts
first, which is how c10d hands out rank 0), `127.<P>.0.<n>` for any other pod. `P` is drawn at random per kubelet
from 50..249: kwok's pods use 127.1.0.0/16, and other test sessions on the same machine run kubelets of their own.
Before a block is handed out, every address of it is bind-tested on the pods' container ports, so an address a live
process already listens on is skipped. A listener on the wildcard address (torch's TCPStore binds `[::]`) holds the
port on every address: no choice of address helps then, the pods share one network namespace here.

Names (the DNS part): `<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]` is a pod's address when a
headless Service named `<subdomain>` in its namespace selects the pod, as CoreDNS answers for pods with a hostname
and subdomain. An Indexed Job's pods are named before they exist (`<job>-<index>`, their addresses are known in
advance), so a pod can name a peer that has not started yet; a real resolver would make it retry until it does.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Iterable, Mapping

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MAX_INDEX = 244  # 10 + index stays a valid octet
_DNS_NAME = re.compile(
    r"(?<![A-Za-z0-9.-])[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)+(?![A-Za-z0-9-])"
)
_BIND_TRIES = 20


def job_index(pod: Mapping) -> int | None:
    """The completion index of an Indexed Job's pod (None for any other pod)."""
    value = (pod["metadata"].get("annotations") or {}).get(INDEX_ANNOTATION)
    return int(value) if value is not None and value.isdigit() else None


def controller_uid(pod: Mapping) -> str | None:
    for owner in pod["metadata"].get("ownerReferences") or ():
        if owner.get("controller") and owner.get("kind") == "Job":
            return owner["uid"]
    return None


def container_ports(pod_spec: Mapping) -> list[int]:
    return sorted(
        {
            port["containerPort"]
            for container in pod_spec.get("containers") or ()
            for port in container.get("ports") or ()
            if port.get("protocol", "TCP") == "TCP"
        }
    )


def _free(address: str, ports: Iterable[int]) -> bool:
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an ended pod is no conflict
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


class PodAddresses:
    """Hands out the loopback addresses of one kubelet's pods (see the module docstring)."""

    def __init__(self, rng: random.Random | None = None):
        self.prefix = (rng or random.Random()).randint(50, 249)
        self._blocks: dict[str, int] = {}  # Job uid -> third octet
        self._next_block = 1
        self._next_other = 2
        self._others: dict[str, str] = {}  # pod uid -> address, for pods outside Indexed Jobs
        self.skipped: list[str] = []  # addresses a bind test found taken (for diagnostics)

    def _block(self, job: Mapping) -> int:
        uid = job["metadata"]["uid"]
        if uid not in self._blocks:
            completions = min(int(job["spec"].get("completions") or 1), MAX_INDEX + 1)
            ports = container_ports(job["spec"]["template"].get("spec") or {})
            for _ in range(_BIND_TRIES):
                block, self._next_block = self._next_block, self._next_block % 254 + 1
                addresses = [self._indexed(block, index) for index in range(completions)]
                taken = [a for a in addresses if not _free(a, ports)]
                if not taken:
                    break
                self.skipped.extend(taken)
            self._blocks[uid] = block  # after _BIND_TRIES taken blocks, a wildcard listener holds the port anyway
        return self._blocks[uid]

    def _indexed(self, block: int, index: int) -> str:
        return f"127.{self.prefix}.{block}.{10 + index}"

    def of_indexed_pod(self, job: Mapping, index: int) -> str:
        return self._indexed(self._block(job), index)

    def of_pod(self, pod: Mapping, job: Mapping | None) -> str:
        """The address of a pod about to start; `job` is its controlling Job, if any."""
        index = job_index(pod)
        if job is not None and index is not None and index <= MAX_INDEX:
            return self.of_indexed_pod(job, index)
        uid = pod["metadata"]["uid"]
        if uid not in self._others:  # one address per pod, however often its start is retried
            ports = container_ports(pod.get("spec") or {})
            for _ in range(_BIND_TRIES):
                address = f"127.{self.prefix}.0.{self._next_other}"
                self._next_other = (self._next_other - 1) % 253 + 2  # 2..254
                if _free(address, ports):
                    break
                self.skipped.append(address)
            self._others[uid] = address
        return self._others[uid]


def _selects(service: Mapping, labels: Mapping[str, str]) -> bool:
    selector = (service.get("spec") or {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _job_pod_labels(job: Mapping, index: int) -> dict[str, str]:
    """The labels the Job controller gives the pod of `index` (template labels plus its own)."""
    meta = job["metadata"]
    labels = dict(((job["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {})
    labels.update(
        {
            "job-name": meta["name"],
            "batch.kubernetes.io/job-name": meta["name"],
            "controller-uid": meta["uid"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
            INDEX_ANNOTATION: str(index),
        }
    )
    return labels


def dns_table(
    services: Iterable[Mapping],
    jobs: Iterable[Mapping],
    pods: Iterable[tuple[Mapping, str]],
    addresses: PodAddresses,
) -> dict[tuple[str, str], str]:
    """`(hostname, subdomain) -> address` in one namespace, from its Services, Indexed Jobs and `(pod, address)`s."""
    headless = {s["metadata"]["name"]: s for s in services if (s.get("spec") or {}).get("clusterIP") == "None"}
    table: dict[tuple[str, str], str] = {}
    for job in jobs:
        template = (job["spec"].get("template") or {}).get("spec") or {}
        service = headless.get(template.get("subdomain", ""))
        if job["spec"].get("completionMode") != "Indexed" or service is None:
            continue
        for index in range(min(int(job["spec"].get("completions") or 0), MAX_INDEX + 1)):
            if _selects(service, _job_pod_labels(job, index)):
                host = template.get("hostname") or f"{job['metadata']['name']}-{index}"
                table[(host, template["subdomain"])] = addresses.of_indexed_pod(job, index)
    for pod, address in pods:
        spec = pod.get("spec") or {}
        service = headless.get(spec.get("subdomain", ""))
        if spec.get("hostname") and service is not None and _selects(service, pod["metadata"].get("labels") or {}):
            table[(spec["hostname"], spec["subdomain"])] = address
    return table


def resolve_names(text: str, namespace: str, table: Mapping[tuple[str, str], str]) -> str:
    """Every pod DNS name in `text` that `table` knows, replaced by the pod's address."""
    if not table:
        return text
    suffixes = ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"])

    def resolve(match: re.Match) -> str:
        labels = match.group(0).split(".")
        if labels[2:] not in suffixes:
            return match.group(0)
        return table.get((labels[0], labels[1]), match.group(0))

    return _DNS_NAME.sub(resolve, text)
