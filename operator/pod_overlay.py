"""Merges ``spec.podTemplate`` onto the pod template the operator generates (``builders.build_job``).

The merge rules (the overlay itself is checked by ``stagerun.core.spec.pod_template``, so a manifest that reaches
here breaks none of them; the merge still keeps the operator's values where both set one, and refuses a clash of
names, in case a caller skipped the checks):

- labels and annotations are added; the operator's labels win.
- env vars and envFrom sources are appended after the operator's (an env var may refer to them: ``$(POD_IP)``);
  volumes and volume mounts are appended; init containers are the overlay's.
- resources are merged key by key into the operator's limits and requests (cpu, memory and GPUs stay
  ``spec.resources``'s).
- ``securityContext`` (pod and trainer container) is merged onto the operator's restricted default: mappings key by
  key, every other value replaced. The default therefore holds unless the overlay names a field of it.
- ``schedulerName`` and ``runtimeClassName`` are set.
"""

from __future__ import annotations

import copy
from typing import Any

from stagerun.core.spec import to_manifest
from stagerun.core.spec.pod_template import TRAINER_CONTAINER, PodTemplateSpec


def apply_pod_template(template: dict, overlay: PodTemplateSpec | None) -> dict:
    """``template`` (a Job's ``spec.template``: metadata and spec) with the overlay merged in; a new dict."""
    merged = copy.deepcopy(template)
    if overlay is None:
        return merged
    extra = to_manifest(overlay)
    metadata, pod = merged.setdefault("metadata", {}), merged["spec"]
    for key in ("labels", "annotations"):
        added = (extra.get("metadata") or {}).get(key)
        if added:
            metadata[key] = dict(sorted({**added, **(metadata.get(key) or {})}.items()))
    spec = extra.get("spec") or {}
    for key in ("schedulerName", "runtimeClassName"):
        if key in spec:
            pod[key] = spec[key]
    if "securityContext" in spec:
        pod["securityContext"] = merge_mappings(pod.get("securityContext") or {}, spec["securityContext"])
    if spec.get("volumes"):
        pod["volumes"] = _appended(pod.get("volumes") or [], spec["volumes"], "name", "volume")
    if spec.get("initContainers"):
        pod["initContainers"] = _appended(
            pod.get("initContainers") or [], spec["initContainers"], "name", "init container"
        )
    trainer = next(c for c in pod["containers"] if c["name"] == TRAINER_CONTAINER)
    for change in spec.get("containers") or ():
        if change["name"] != TRAINER_CONTAINER:
            raise ValueError(f"spec.podTemplate.spec.containers: only {TRAINER_CONTAINER!r} can be changed")
        _merge_container(trainer, change)
    return merged


def _merge_container(container: dict, change: dict) -> None:
    if change.get("env"):
        container["env"] = _appended(container.get("env") or [], change["env"], "name", "environment variable")
    if change.get("envFrom"):
        container["envFrom"] = [*(container.get("envFrom") or []), *change["envFrom"]]
    if change.get("volumeMounts"):
        mounts = _appended(container.get("volumeMounts") or [], change["volumeMounts"], "mountPath", "mount path")
        container["volumeMounts"] = mounts
    resources = change.get("resources") or {}
    if resources:
        ours = container.setdefault("resources", {})
        for kind in ("limits", "requests"):
            if resources.get(kind):
                ours[kind] = dict(sorted({**resources[kind], **(ours.get(kind) or {})}.items()))
    if "securityContext" in change:
        container["securityContext"] = merge_mappings(container.get("securityContext") or {}, change["securityContext"])


def merge_mappings(base: dict, overlay: dict) -> dict:
    """``overlay`` merged onto ``base``: a mapping in both merges key by key, any other value of the overlay wins."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _appended(ours: list[dict], theirs: list[dict], key: str, what: str) -> list[dict[str, Any]]:
    """The operator's items, then the overlay's; an overlay item with the key of one of ours is refused."""
    taken = {item[key] for item in ours}
    clash = [item[key] for item in theirs if item[key] in taken]
    if clash:
        raise ValueError(f"spec.podTemplate: {what} {clash[0]!r} is the operator's")
    return [*ours, *copy.deepcopy(theirs)]
