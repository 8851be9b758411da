"""spec.data.cache (issue 15 item 1): the node-local chunk cache on a volume the operator mounts, its size and
directory handed to the trainer's ChunkCache through the pod's environment."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN, tiny_run

from stagerun.core.spec import SpecError, resolve_run, validate_manifest
from stagerun.operator import builders
from stagerun.trainer.data import remote_io


def pod_of(manifest: dict) -> dict:
    job = builders.build_job(resolve_run(manifest), namespace="ns", uid="u", attempt=1, phase_index=0)
    return job["spec"]["template"]["spec"]


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}


IMAGE = "ghcr.io/example/stagerun:0.1"


def with_cache(**cache) -> dict:
    return tiny_run(image=IMAGE, data={**TINY_RUN["spec"]["data"], "cache": cache})


def test_no_cache_no_volume():
    pod = pod_of(tiny_run(image=IMAGE))
    assert "data-cache" not in {v["name"] for v in pod["volumes"]}
    assert "STAGERUN_DATA_CACHE_BYTES" not in env_of(pod) and "STAGERUN_DATA_CACHE_DIR" not in env_of(pod)


@pytest.mark.parametrize("medium", ["", "Memory"])
def test_an_empty_dir_of_the_size_limit(medium):
    pod = pod_of(with_cache(sizeLimit="64Gi", medium=medium))
    volume = next(v for v in pod["volumes"] if v["name"] == "data-cache")
    assert volume == {"name": "data-cache", "emptyDir": {"sizeLimit": "64Gi", **({"medium": medium} if medium else {})}}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data-cache")
    env = env_of(pod)
    assert env["STAGERUN_DATA_CACHE_DIR"] == mount["mountPath"] == builders.DATA_CACHE_DIR
    assert int(env["STAGERUN_DATA_CACHE_BYTES"]) == 64 * 2**30 * 7 // 8  # room for eviction lag under sizeLimit


def test_a_storage_class_gives_each_pod_its_own_ephemeral_volume():
    pod = pod_of(with_cache(sizeLimit="500Gi", storageClass="local-nvme"))
    volume = next(v for v in pod["volumes"] if v["name"] == "data-cache")
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "local-nvme",
        "resources": {"requests": {"storage": "500Gi"}},
    }


def test_bad_cache_settings_name_the_field():
    problems = validate_manifest(with_cache(sizeLimit="1Gi", medium="Memory", storageClass="fast"))
    assert [p.path for p in problems] == ["spec.data.cache.medium"]
    problems = validate_manifest(with_cache(sizeLimit="10Ki"))
    assert [p.path for p in problems] == ["spec.data.cache.sizeLimit"]
    with pytest.raises(SpecError, match=r"spec\.data\.cache\.sizeLimit"):
        resolve_run(with_cache(sizeLimit="lots"))
    with pytest.raises(SpecError, match=r"spec\.data\.cache\.medium"):
        resolve_run(with_cache(sizeLimit="1Gi", medium="tmpfs"))


def test_the_trainer_reads_the_pod_environment(tmp_path, monkeypatch):
    env = env_of(pod_of(with_cache(sizeLimit="1Gi")))
    monkeypatch.setenv("STAGERUN_DATA_CACHE_BYTES", env["STAGERUN_DATA_CACHE_BYTES"])
    monkeypatch.setenv("STAGERUN_DATA_CACHE_DIR", str(tmp_path / "data-cache"))  # the mount, here a folder
    cache = remote_io.cache_from_env()
    assert cache is not None and cache.limit == 2**30 * 7 // 8 and cache.folder == tmp_path / "data-cache"
