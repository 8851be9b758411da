"""The Kubernetes test harness (tests/kube): the emulated API through the official client and through kopf, the
simulated job controller + kubelet (FakeCluster) and the process-running kubelet (ProcessCluster)."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time

import pytest
from kube.emulator import ApiError, running_api
from kube.kubelet import FakeCluster, pod_index
from kube.processes import ProcessCluster
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "stagerun.io", "v1alpha1", "trainingruns"


@pytest.fixture
def api():
    with running_api() as api:
        yield api


def trainingrun(name: str = "tr", **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec or {"model": {"preset": "tiny"}},
    }


def create_tr(api, name: str = "tr", namespace: str = "default", **spec) -> dict:
    return api.custom().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, trainingrun(name, **spec))


def owner_ref(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def indexed_job(
    name: str,
    *,
    completions: int = 2,
    command=None,
    env=None,
    owner: dict | None = None,
    grace: int = 30,
    volumes=None,
    mounts=None,
    env_from=None,
) -> dict:
    container = {
        "name": "trainer",
        "image": "stagerun:test",
        "command": command or ["stagerun", "launch"],
        "env": env or [],
        "volumeMounts": mounts or [],
    }
    if env_from:
        container["envFrom"] = env_from
    meta = {"name": name, "labels": {"stagerun.io/run": name.rsplit("-a", 1)[0]}}
    if owner:
        meta["ownerReferences"] = [owner_ref(owner)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": dict(meta["labels"])},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": name,
                    "terminationGracePeriodSeconds": grace,
                    "containers": [container],
                    "volumes": volumes or [],
                },
            },
        },
    }


def headless_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": {"job-name": name}, "ports": [{"name": "rdzv", "port": 29400}]},
    }


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or () if c["type"] == kind), None)


# -- the API through the official client -------------------------------------------------------------------------------


def test_discovery_serves_builtin_and_custom_resources(api):
    raw = api.client()
    versions = client.CoreApi(raw).get_api_versions()
    assert "v1" in versions.versions
    groups = {g.name: g for g in client.ApisApi(raw).get_api_versions().groups}
    assert {"batch", "coordination.k8s.io", "apiextensions.k8s.io", GROUP} <= set(groups)
    resources = {r.name: r for r in client.CustomObjectsApi(raw).get_api_resources(GROUP, VERSION).resources}
    assert resources["trainingruns"].namespaced and resources["trainingruns"].kind == "TrainingRun"
    assert "trainingruns/status" in resources
    assert {"watch", "patch", "list"} <= set(resources["trainingruns"].verbs)
    core_names = {r.name for r in client.CoreV1Api(raw).get_api_resources().resources}
    assert {"pods", "pods/status", "services", "configmaps", "events", "nodes", "namespaces", "secrets"} <= core_names
    assert "jobs" in {r.name for r in client.BatchV1Api(raw).get_api_resources().resources}


def test_crud_conflicts_and_errors(api):
    core = api.core()
    created = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "cm", "labels": {"a": "1"}}, "data": {"k": "v"}}
    )
    assert created.metadata.uid and created.metadata.creation_timestamp and created.metadata.resource_version
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    assert exists.value.status == 409 and json.loads(exists.value.body)["reason"] == "AlreadyExists"

    patched = core.patch_namespaced_config_map("cm", "default", {"data": {"j": "w"}})  # strategic merge
    assert patched.data == {"k": "v", "j": "w"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    again = core.patch_namespaced_config_map("cm", "default", {"data": {"j": "w"}})  # a no-op write
    assert again.metadata.resource_version == patched.metadata.resource_version

    with pytest.raises(ApiException) as stale:  # optimistic concurrency: a stale resourceVersion
        core.patch_namespaced_config_map(
            "cm", "default", {"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"x": "y"}}
        )
    assert stale.value.status == 409
    body = api.get("configmaps", "default", "cm")
    body["data"] = {"only": "this"}
    replaced = core.replace_namespaced_config_map("cm", "default", body)
    assert replaced.data == {"only": "this"}
    with pytest.raises(ApiException) as stale_put:
        core.replace_namespaced_config_map("cm", "default", body)  # the same (now stale) resourceVersion
    assert stale_put.value.status == 409

    # JSON patch, including the failed `test` kopf relies on (422)
    api.patch("configmaps", "default", "cm", [{"op": "add", "path": "/data/n", "value": "1"}], patch_type="json")
    with pytest.raises(ApiError) as failed_test:
        api.patch(
            "configmaps",
            "default",
            "cm",
            [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}, {"op": "remove", "path": "/data/n"}],
            patch_type="json",
        )
    assert failed_test.value.code == 422
    assert api.get("configmaps", "default", "cm")["data"] == {"only": "this", "n": "1"}

    deleted = core.delete_namespaced_config_map("cm", "default")  # a Status: it is gone
    assert (deleted["status"] if isinstance(deleted, dict) else deleted.status) == "Success"  # dict in client 37
    with pytest.raises(ApiException) as missing:
        core.delete_namespaced_config_map("cm", "default")
    assert missing.value.status == 404
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("cm", "default")
    assert api.get("configmaps", "default", "cm") is None


def test_resource_version_is_cluster_wide_and_generation_follows_spec(api):
    a = api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})
    b = api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "b"}, "stringData": {"k": "v"}})
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert b["data"] == {"k": "dg=="} and "stringData" not in b
    tr = create_tr(api)
    assert tr["metadata"]["generation"] == 1
    custom = api.custom()
    labelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "tr", {"metadata": {"labels": {"x": "y"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    respecced = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr", {"spec": {"a": 1}})
    assert respecced["metadata"]["generation"] == 2


def test_selectors_and_paging(api):
    core = api.core()
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y", "tier": "2"}), ("c", {"app": "z"})]:
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})
    core.create_namespaced_config_map("other", {"metadata": {"name": "d", "labels": {"app": "x"}}})

    def names(**kwargs):
        return [cm.metadata.name for cm in core.list_config_map_for_all_namespaces(**kwargs).items]

    assert names(label_selector="app=x") == ["a", "d"]
    assert names(label_selector="app in (x,y),tier") == ["a", "b"]
    assert names(label_selector="app notin (x),!tier") == ["c"]
    assert names(label_selector="app!=x") == ["b", "c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace=other") == ["d"]
    assert [cm.metadata.name for cm in core.list_namespaced_config_map("default").items] == ["a", "b", "c"]
    first = core.list_namespaced_config_map("default", limit=2)
    assert [cm.metadata.name for cm in first.items] == ["a", "b"] and first.metadata._continue
    rest = core.list_namespaced_config_map("default", limit=2, _continue=first.metadata._continue)
    assert [cm.metadata.name for cm in rest.items] == ["c"]
    assert [ns.metadata.name for ns in core.list_namespace().items] == ["default", "other"]  # created on first use
    with pytest.raises(ApiException) as bad:
        core.list_namespaced_config_map("default", label_selector="a in b")
    assert bad.value.status == 400


def test_watch_from_a_resource_version_with_selectors(api):
    core = api.core()
    core.create_namespaced_config_map("default", {"metadata": {"name": "before", "labels": {"w": "1"}}})
    since = core.list_namespaced_config_map("default").metadata.resource_version
    events = []

    def consume():
        stream = watch.Watch()
        for event in stream.stream(
            core.list_namespaced_config_map, "default", label_selector="w=1", resource_version=since, timeout_seconds=5
        ):
            events.append((event["type"], event["object"].metadata.name))
            if len(events) == 4:
                stream.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    core.create_namespaced_config_map("default", {"metadata": {"name": "new", "labels": {"w": "1"}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "ignored", "labels": {"w": "2"}}})
    core.patch_namespaced_config_map("new", "default", {"data": {"k": "v"}})
    core.patch_namespaced_config_map("before", "default", {"metadata": {"labels": {"w": "2"}}})  # leaves the selector
    core.delete_namespaced_config_map("new", "default")
    thread.join(10)
    assert events == [("ADDED", "new"), ("MODIFIED", "new"), ("DELETED", "before"), ("DELETED", "new")]

    # A watch without a resourceVersion starts with the current objects.
    initial = []
    for event in watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=1):
        initial.append((event["type"], event["object"].metadata.name))
    assert initial == [("ADDED", "before"), ("ADDED", "ignored")]


def _http(api, method: str, path: str, body=None, content_type: str = "application/json") -> tuple[int, bytes]:
    """A raw request (the kubernetes client's low-level call_api changed its signature between versions)."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{api.url}{path}", data=data, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_watch_from_a_compacted_resource_version_is_gone():
    with running_api(log_size=5) as small:
        for i in range(10):
            small.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm{i}"}})
        raw = _http(small, "GET", "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1&timeoutSeconds=1")
        line = json.loads(raw[1].decode().splitlines()[0])
        assert line["type"] == "ERROR" and line["object"]["code"] == 410


def test_status_subresource_splits_status_from_the_rest(api):
    custom = api.custom()
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, {**trainingrun(), "status": {"state": "Hacked"}}
    )
    assert "status" not in created  # dropped on create
    updated = custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "tr",
        {"status": {"state": "Running"}, "spec": {"ignored": True}, "metadata": {"labels": {"ignored": "yes"}}},
    )
    assert updated["status"] == {"state": "Running"}
    assert "ignored" not in updated["spec"] and "labels" not in updated["metadata"]
    main = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "tr", {"status": {"state": "Nope"}, "spec": {"x": 1}}
    )
    assert main["status"] == {"state": "Running"} and main["spec"]["x"] == 1
    status, _ = _http(
        api,
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/tr",  # custom resources
        {"spec": {"y": 1}},
        content_type="application/strategic-merge-patch+json",
    )  # take no SMP
    assert status == 415

    pod = api.core().create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "p"},
            "status": {"phase": "Running"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )
    assert pod.status.phase == "Pending" and pod.spec.restart_policy == "Always"
    assert pod.spec.termination_grace_period_seconds == 30
    assert pod.spec.containers[0].termination_message_path == "/dev/termination-log"


def test_finalizers_hold_deletion(api):
    custom = api.custom()
    tr = trainingrun()
    tr["metadata"]["finalizers"] = ["stagerun.io/cleanup"]
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, tr)
    deleting = custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr")
    assert deleting["metadata"]["deletionTimestamp"] and deleting["metadata"]["generation"] == 2
    assert api.get(PLURAL, "default", "tr") is not None
    with pytest.raises(ApiException) as forbidden:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "tr", {"metadata": {"finalizers": ["stagerun.io/cleanup", "other"]}}
        )
    assert forbidden.value.status == 422
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr", {"metadata": {"finalizers": None}})
    assert api.get(PLURAL, "default", "tr") is None


def test_graceful_and_forced_pod_deletion(api):
    core = api.core()
    spec = {"nodeName": "node-1", "terminationGracePeriodSeconds": 45, "containers": [{"name": "c", "image": "i"}]}
    core.create_namespaced_pod("default", {"metadata": {"name": "p"}, "spec": spec})
    deleting = core.delete_namespaced_pod("p", "default")
    assert deleting.metadata.deletion_grace_period_seconds == 45 and deleting.metadata.deletion_timestamp
    assert api.get("pods", "default", "p")["metadata"]["deletionTimestamp"]  # until the kubelet confirms
    shorter = core.delete_namespaced_pod("p", "default", body=client.V1DeleteOptions(grace_period_seconds=5))
    assert shorter.metadata.deletion_grace_period_seconds == 5
    core.delete_namespaced_pod("p", "default", grace_period_seconds=0)
    assert api.get("pods", "default", "p") is None

    core.create_namespaced_pod(
        "default", {"metadata": {"name": "unscheduled"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    )
    core.delete_namespaced_pod("unscheduled", "default")
    assert api.get("pods", "default", "unscheduled") is None  # never bound to a node: deleted at once


def test_garbage_collection_by_owner_references(api):
    owner = create_tr(api)
    ref = [owner_ref(owner)]
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tr-a1", "ownerReferences": ref}})
    api.create({**headless_service("tr-a1"), "metadata": {"name": "tr-a1", "ownerReferences": ref}})
    job = api.create(indexed_job("tr-a1", owner=owner))
    pod = api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "tr-a1-0-abcde", "ownerReferences": [owner_ref(job)]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        }
    )
    api.custom().delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr")
    api.wait_for(
        lambda: not any(api.get(kind, "default", "tr-a1") for kind in ("configmaps", "services", "jobs")), timeout=5
    )
    terminating = api.wait_for(
        lambda: (
            (api.get("pods", "default", pod["metadata"]["name"]) or {}).get("metadata", {}).get("deletionTimestamp")
        ),
        timeout=5,
    )
    assert terminating  # graceful: the pod waits for its kubelet

    # batch/v1 Jobs deleted without a propagationPolicy orphan their pods, as on a real API server.
    job = api.create(indexed_job("orphans"))
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "orphan", "ownerReferences": [owner_ref(job)]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        }
    )
    api.batch().delete_namespaced_job("orphans", "default")
    left = api.wait_for(lambda: api.get("pods", "default", "orphan"), timeout=5)
    assert "ownerReferences" not in left["metadata"] and not left["metadata"].get("deletionTimestamp")

    # Foreground: the owner stays (with the foregroundDeletion finalizer) until its dependents are gone.
    job = api.create(indexed_job("fg"))
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "fg-pod", "ownerReferences": [owner_ref(job)]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        }
    )
    api.batch().delete_namespaced_job("fg", "default", propagation_policy="Foreground")
    assert api.get("jobs", "default", "fg")["metadata"]["finalizers"] == ["foregroundDeletion"]
    api.wait_for(lambda: api.get("pods", "default", "fg-pod")["metadata"].get("deletionTimestamp"), timeout=5)
    api.delete("pods", "default", "fg-pod", grace_period_seconds=0)
    api.wait_for(lambda: api.get("jobs", "default", "fg") is None, timeout=5)


def test_validation_of_names_and_jobs(api):
    batch, core = api.batch(), api.core()
    job = indexed_job("j")
    del job["spec"]["template"]["spec"]["restartPolicy"]
    with pytest.raises(ApiException) as no_policy:
        batch.create_namespaced_job("default", job)
    assert no_policy.value.status == 422 and "restartPolicy" in no_policy.value.body
    long_name = "x" * 64
    with pytest.raises(ApiException) as long_label:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm", "labels": {"run": long_name}}})
    assert long_label.value.status == 422
    with pytest.raises(ApiException) as long_host:
        core.create_namespaced_pod(
            "default",
            {"metadata": {"name": "p"}, "spec": {"hostname": long_name, "containers": [{"name": "c", "image": "i"}]}},
        )
    assert long_host.value.status == 422
    with pytest.raises(ApiException) as bad_service:
        core.create_namespaced_service("default", headless_service("1-starts-with-a-digit"))
    assert bad_service.value.status == 422
    created = batch.create_namespaced_job("default", indexed_job("ok"))
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": created.metadata.uid}
    assert created.spec.template.metadata.labels["job-name"] == "ok"
    with pytest.raises(ApiException) as immutable:
        batch.patch_namespaced_job("ok", "default", {"spec": {"template": {"spec": {"subdomain": "other"}}}})
    assert immutable.value.status == 422


def test_injected_errors_come_before_the_store(api):
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}})
    create_tr(api)
    api.inject_error("PATCH", PLURAL, subresource="status", code=503, times=1)
    custom = api.custom()
    with pytest.raises(ApiException) as injected:
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "tr", {"status": {"a": 1}})
    assert injected.value.status == 503
    assert "status" not in api.get(PLURAL, "default", "tr")
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "tr", {"status": {"a": 1}})
    assert api.get(PLURAL, "default", "tr")["status"] == {"a": 1}
    assert api.core().patch_namespaced_config_map("cm", "default", {"data": {"k": "v"}}).data == {"k": "v"}
    assert any(r.method.value == "PATCH" for r in api.requests)  # kmock's request log


def test_events(api):
    core = api.core()
    tr = create_tr(api)
    core.create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "tr."},
            "type": "Normal",
            "reason": "Launched",
            "message": "attempt 1",
            "involvedObject": {
                "apiVersion": tr["apiVersion"],
                "kind": "TrainingRun",
                "name": "tr",
                "namespace": "default",
                "uid": tr["metadata"]["uid"],
            },
        },
    )
    [event] = api.events("default", name="tr")
    assert event["reason"] == "Launched" and event["metadata"]["name"].startswith("tr.")
    assert api.events("default", reason="Nope") == []


# -- a real kopf operator against the emulated API ---------------------------------------------------------------------

OPERATOR = """
import logging
import kopf

@kopf.on.startup()
def configure(settings, **_):
    settings.persistence.finalizer = "stagerun.io/test"
    settings.posting.level = logging.INFO

@kopf.on.create("stagerun.io", "v1alpha1", "trainingruns")
def created(body, patch, **_):
    patch.status["state"] = "Pending"
    return {"seen": body["spec"]["model"]["preset"]}

@kopf.on.delete("stagerun.io", "v1alpha1", "trainingruns")
def deleted(body, **_):
    kopf.info(body, reason="Cleanup", message="deleted by the test")
"""


def test_kopf_operator_handles_a_trainingrun(api, tmp_path):
    from kopf.testing import KopfRunner

    module = tmp_path / "operator.py"
    module.write_text(OPERATOR)
    with api.use_kubeconfig(), KopfRunner(["run", "--standalone", "-A", "--verbose", str(module)]) as runner:
        create_tr(api)
        tr = api.wait_for(
            lambda: (o := api.get(PLURAL, "default", "tr")) and "created" in o.get("status", {}) and o, timeout=20
        )
        assert tr["status"]["state"] == "Pending" and tr["status"]["created"] == {"seen": "tiny"}
        assert tr["metadata"]["finalizers"] == ["stagerun.io/test"]
        api.custom().delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr")
        api.wait_for(lambda: api.get(PLURAL, "default", "tr") is None, timeout=20)
        api.wait_for(lambda: api.events("default", name="tr", reason="Cleanup"), timeout=10)
    assert runner.exception is None and runner.exit_code == 0, runner.output
    assert "Handler 'created' succeeded" in runner.output
    assert "Handler 'deleted' succeeded" in runner.output
    assert "Traceback" not in runner.output, runner.output


# -- FakeCluster: job controller + kubelet without processes -----------------------------------------------------------


def test_fake_cluster_runs_an_indexed_job_to_completion(api):
    owner = create_tr(api)
    with FakeCluster(api, nodes=("node-1", "node-2")) as cluster:
        assert [n["metadata"]["name"] for n in api.list("nodes")] == ["node-1", "node-2"]
        api.create(headless_service("tr-a1"))
        api.batch().create_namespaced_job("default", indexed_job("tr-a1", owner=owner))
        pods = cluster.wait_for_pods(2, run="tr")
        assert [pod_index(p) for p in pods] == [0, 1]
        for index, pod in enumerate(pods):
            meta, spec = pod["metadata"], pod["spec"]
            assert meta["name"].startswith(f"tr-a1-{index}-") and len(meta["name"]) == len("tr-a1-0-") + 5
            assert meta["labels"]["job-name"] == "tr-a1" and meta["labels"]["stagerun.io/run"] == "tr"
            assert meta["labels"]["batch.kubernetes.io/job-completion-index"] == str(index)
            assert meta["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
            assert meta["ownerReferences"][0]["kind"] == "Job" and meta["ownerReferences"][0]["controller"]
            assert spec["hostname"] == f"tr-a1-{index}" and spec["subdomain"] == "tr-a1"
            assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in spec["containers"][0]["env"])
            assert pod["status"]["containerStatuses"][0]["state"]["running"]
            assert pod["status"]["podIP"].startswith("10.")
        assert {p["spec"]["nodeName"] for p in pods} == {"node-1", "node-2"}  # one pod per node
        assert len({p["status"]["podIP"] for p in pods}) == 2
        job = api.wait_for(lambda: (j := api.get("jobs", "default", "tr-a1"))["status"].get("ready") == 2 and j)
        assert job["status"]["active"] == 2 and job["status"]["startTime"]

        cluster.succeed_job("tr-a1", message='{"tokens": 24576}')
        job = api.wait_for(
            lambda: condition(api.get("jobs", "default", "tr-a1"), "Complete") and api.get("jobs", "default", "tr-a1")
        )
        assert job["status"]["succeeded"] == 2 and job["status"]["active"] == 0
        assert job["status"]["completedIndexes"] == "0-1" and job["status"]["completionTime"]
        zero = cluster.pods(job="tr-a1")[0]
        assert zero["status"]["phase"] == "Succeeded"
        assert zero["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == '{"tokens": 24576}'
        assert api.events("default", name="tr-a1", reason="SuccessfulCreate")


def test_fake_cluster_fails_a_job_and_terminates_its_other_pods(api):
    with FakeCluster(api, nodes=("node-1", "node-2"), termination_delay=0.1) as cluster:
        api.create(indexed_job("tr-a1"))
        first, second = cluster.wait_for_pods(2, job="tr-a1")
        cluster.fail(second, exit_code=3, message="boom")
        job = api.wait_for(
            lambda: condition(api.get("jobs", "default", "tr-a1"), "Failed") and api.get("jobs", "default", "tr-a1")
        )
        assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
        assert condition(job, "FailureTarget")["status"] == "True"
        assert job["status"]["failed"] == 1
        failed = cluster.pod(second)["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (failed["exitCode"], failed["reason"], failed["message"]) == (3, "Error", "boom")
        # index 0 was deleted by the job controller and terminated gracefully by the kubelet
        api.wait_for(lambda: api.get("pods", "default", first["metadata"]["name"]) is None, timeout=5)

        # other failure modes
        api.create(indexed_job("other", completions=2))
        one, two = cluster.wait_for_pods(2, job="other")
        cluster.oom_kill(one)
        killed = cluster.pod(one)["status"]
        assert killed["phase"] == "Failed"
        assert killed["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
        assert killed["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137

        # a pod the API refuses (hostname over 63 characters): a FailedCreate event, as in a real cluster
        api.create(indexed_job("x" * 62, completions=1))
        [failed_create] = api.wait_for(lambda: api.events("default", name="x" * 62, reason="FailedCreate"))
        assert failed_create["type"] == "Warning" and "spec.hostname" in failed_create["message"]

    with FakeCluster(api, nodes=("node-1", "node-2"), auto_run=False) as cluster:
        api.create(indexed_job("held", completions=1))
        [held] = cluster.wait_for_pods(1, job="held", phase="Pending")
        cluster.image_pull_backoff(held)
        waiting = cluster.pod(held)["status"]
        assert waiting["phase"] == "Pending"
        assert waiting["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
        assert cluster.set_running(held)["status"]["phase"] == "Running"


def test_fake_cluster_suspends_and_resumes_a_job(api):
    with FakeCluster(api, nodes=("node-1", "node-2"), termination_delay=0.05) as cluster:
        job = indexed_job("tr-a1")
        job["spec"]["suspend"] = True  # as Kueue-managed Jobs start
        api.create(job)
        suspended = api.wait_for(lambda: condition(api.get("jobs", "default", "tr-a1"), "Suspended"))
        assert suspended["status"] == "True" and not cluster.pods(job="tr-a1")
        api.batch().patch_namespaced_job("tr-a1", "default", {"spec": {"suspend": False}})
        cluster.wait_for_pods(2, job="tr-a1")
        assert condition(api.get("jobs", "default", "tr-a1"), "Suspended")["status"] == "False"
        api.batch().patch_namespaced_job("tr-a1", "default", {"spec": {"suspend": True}})
        api.wait_for(lambda: not cluster.pods(job="tr-a1"), timeout=5)  # suspending deletes the pods...
        job = api.get("jobs", "default", "tr-a1")
        assert job["status"]["failed"] == 0 and job["status"]["active"] == 0  # ...which are no failures
        assert not condition(job, "Failed")


def test_fake_cluster_lost_node_and_lost_pod(api):
    with FakeCluster(api, nodes=("node-1", "node-2"), termination_delay=0.05) as cluster:
        api.create(indexed_job("tr-a1"))
        pods = cluster.wait_for_pods(2, job="tr-a1")
        on_lost = next(p for p in pods if p["spec"]["nodeName"] == "node-2")
        cluster.node_not_ready("node-2")
        assert api.get("nodes", "node-2")["status"]["conditions"][0]["status"] == "False"
        assert condition(cluster.pod(on_lost), "Ready")["status"] == "False"
        api.delete("pods", "default", on_lost["metadata"]["name"], grace_period_seconds=5)
        time.sleep(0.5)
        assert cluster.pod(on_lost)["metadata"]["deletionTimestamp"]  # Terminating: nobody finalises it
        cluster.lose_pod(on_lost)  # the operator's force delete
        assert api.get("pods", "default", on_lost["metadata"]["name"]) is None
        job = api.wait_for(
            lambda: condition(api.get("jobs", "default", "tr-a1"), "Failed") and api.get("jobs", "default", "tr-a1")
        )
        assert job["status"]["failed"] >= 1
        cluster.node_ready("node-2")


def test_fake_cluster_cascades_deletion_from_the_trainingrun(api):
    owner = create_tr(api)
    with FakeCluster(api, nodes=("node-1", "node-2"), termination_delay=0.05) as cluster:
        api.create(indexed_job("tr-a1", owner=owner))
        cluster.wait_for_pods(2, run="tr")
        api.custom().delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tr")
        api.wait_for(lambda: not cluster.pods(run="tr") and api.get("jobs", "default", "tr-a1") is None, timeout=5)


# -- ProcessCluster: pods as local processes ---------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json, os, pathlib, signal, sys, time
    keys = ["MANIFEST", "RUN_DIR", "RDZV", "RDZV_FQDN", "POD_IP", "POD_NAME", "NAMESPACE", "NODE", "INDEX",
            "JOB_COMPLETION_INDEX", "STAGERUN_NODE_ADDR", "STAGERUN_TERMINATION_LOG", "TOKEN", "GREETING"]
    env = {k: os.environ.get(k) for k in keys}
    env["manifest_text"] = pathlib.Path(os.environ["MANIFEST"]).read_text()
    pathlib.Path(os.environ["RUN_DIR"]).mkdir(parents=True, exist_ok=True)
    print("ENV " + json.dumps(env), flush=True)
    if os.environ.get("MODE") == "wait":
        def stop(signum, frame):
            print("got SIGTERM", flush=True)
            pathlib.Path(os.environ["STAGERUN_TERMINATION_LOG"]).write_text("stopped by SIGTERM")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        time.sleep(60)
    pathlib.Path(os.environ["STAGERUN_TERMINATION_LOG"]).write_text(json.dumps({"index": env["INDEX"]}))
""")


def process_job(name: str, mode: str = "exit", completions: int = 2) -> dict:
    env = [
        {"name": "MODE", "value": mode},
        {"name": "MANIFEST", "value": "/etc/stagerun/trainingrun.yaml"},
        {"name": "RUN_DIR", "value": "/var/lib/stagerun/run"},
        {"name": "RDZV", "value": f"{name}-0.{name}:29400"},
        {"name": "RDZV_FQDN", "value": f"{name}-1.{name}.default.svc.cluster.local"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": "INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "GREETING", "value": "hello from $(POD_NAME)"},
    ]
    return indexed_job(
        name,
        command=["python", "-c", SCRIPT],
        env=env,
        grace=20,
        completions=completions,
        env_from=[{"secretRef": {"name": "creds"}}],
        volumes=[{"name": "manifest", "configMap": {"name": name}}, {"name": "state", "emptyDir": {}}],
        mounts=[
            {"name": "manifest", "mountPath": "/etc/stagerun", "readOnly": True},
            {"name": "state", "mountPath": "/var/lib/stagerun"},
        ],
    )


def pod_env(cluster, pod) -> dict:
    line = next(line for line in cluster.logs(pod).splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


def test_process_cluster_runs_pods_with_node_rewrites(api, tmp_path):
    api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3"}})
    api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "tr-a1"},
            "data": {"trainingrun.yaml": "kind: TrainingRun\n"},
        }
    )
    api.create(headless_service("tr-a1"))
    with ProcessCluster(api, tmp_path / "pods") as cluster:
        api.create(process_job("tr-a1"))
        job = api.wait_for(
            lambda: condition(api.get("jobs", "default", "tr-a1"), "Complete") and api.get("jobs", "default", "tr-a1"),
            timeout=20,
            message=cluster.all_logs,
        )
        assert job["status"]["succeeded"] == 2, cluster.all_logs()
        pods = cluster.pods(job="tr-a1")
        envs = [pod_env(cluster, pod) for pod in pods]
        ips = [pod["status"]["podIP"] for pod in pods]
        assert ips[0].startswith("127.0.") and ips[0].endswith(".10") and ips[1].endswith(".11")
        assert sorted(ips)[0] == ips[0]
        for index, (pod, env) in enumerate(zip(pods, envs)):
            assert env["POD_IP"] == env["STAGERUN_NODE_ADDR"] == ips[index]
            assert env["RDZV"] == f"{ips[0]}:29400" and env["RDZV_FQDN"] == ips[1]
            assert env["POD_NAME"] == pod["metadata"]["name"] and env["NAMESPACE"] == "default"
            assert env["INDEX"] == env["JOB_COMPLETION_INDEX"] == str(index)
            assert env["GREETING"] == f"hello from {pod['metadata']['name']}"
            assert env["TOKEN"] == "s3"
            assert env["manifest_text"] == "kind: TrainingRun\n"
            assert env["MANIFEST"].startswith(str(tmp_path)) and env["RUN_DIR"].startswith(str(tmp_path))
            assert env["RUN_DIR"].endswith("/run") and env["STAGERUN_TERMINATION_LOG"].startswith(str(tmp_path))
            terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
            assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
            assert json.loads(terminated["message"]) == {"index": str(index)}
        assert envs[0]["RUN_DIR"] != envs[1]["RUN_DIR"]  # one emptyDir per pod
        assert "ENV " in api.core().read_namespaced_pod_log(pods[0]["metadata"]["name"], "default")


def test_process_cluster_sigterm_on_deletion_and_crash(api, tmp_path):
    api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3"}})
    for name in ("tr-a1", "tr-a2"):
        api.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name},
                "data": {"trainingrun.yaml": "x: 1\n"},
            }
        )
    with ProcessCluster(api, tmp_path / "pods") as cluster:
        api.create(process_job("tr-a1", mode="wait"))
        first, second = cluster.wait_for_pods(2, job="tr-a1", timeout=20)
        api.wait_for(
            lambda: all("ENV " in cluster.logs(p) for p in (first, second)), timeout=20, message=cluster.all_logs
        )
        # a ConfigMap edit reaches the running pods' mounted files, as the kubelet does it
        api.core().patch_namespaced_config_map("tr-a1", "default", {"data": {"trainingrun.yaml": "x: 2\n"}})
        mounted = cluster.pod_dir(first) / "volumes" / "manifest" / "trainingrun.yaml"
        api.wait_for(lambda: mounted.read_text() == "x: 2\n", timeout=5)

        started = time.monotonic()
        api.core().delete_namespaced_pod(first["metadata"]["name"], "default", grace_period_seconds=20)
        api.wait_for(
            lambda: api.get("pods", "default", first["metadata"]["name"]) is None, timeout=10, message=cluster.all_logs
        )
        assert time.monotonic() - started < 10  # it exited on SIGTERM, not at the end of the grace period
        assert "got SIGTERM" in cluster.logs(first)
        # backoffLimit 0: the Job failed, and the job controller's deletion stopped index 1 the same way
        job = api.wait_for(
            lambda: condition(api.get("jobs", "default", "tr-a1"), "Failed") and api.get("jobs", "default", "tr-a1"),
            message=cluster.all_logs,
        )
        assert job["status"]["failed"] == 1
        api.wait_for(
            lambda: api.get("pods", "default", second["metadata"]["name"]) is None, timeout=10, message=cluster.all_logs
        )
        assert "got SIGTERM" in cluster.logs(second)

        api.create(process_job("tr-a2", mode="wait", completions=1))
        [crashing] = cluster.wait_for_pods(1, job="tr-a2", timeout=20)
        api.wait_for(lambda: "ENV " in cluster.logs(crashing), timeout=20, message=cluster.all_logs)
        cluster.kill_pod_process(crashing, signal.SIGKILL)  # a crash inside the pod: exit code 137
        crashed = api.wait_for(
            lambda: (
                (p := api.get("pods", "default", crashing["metadata"]["name"]))
                and p["status"]["phase"] == "Failed"
                and p
            ),
            timeout=10,
            message=cluster.all_logs,
        )
        terminated = crashed["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"]) == (137, "Error")
        api.wait_for(lambda: condition(api.get("jobs", "default", "tr-a2"), "Failed"), message=cluster.all_logs)
    assert not [p for p in cluster.runs.values() if p.alive()]  # stop() killed whatever ran
