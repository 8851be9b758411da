"""The TrainingRun CRD against the real kube-apiserver: every example and every malformed manifest of
tests/test_crd_manifests.py, sent as `kubectl apply --server-side --dry-run=server` sends them.

test_crd_manifests.py checks the same cases with a JSON-Schema validator standing in for the apiserver, and states
for each which layer refuses it (the CRD schema at apply time, or the operator's validation of the stored object).
Here the apiserver itself answers: a case the schema should refuse is refused, naming the field; a case only the
operator refuses is stored without complaint (the operator then reports it as an InvalidSpec condition:
tests/test_operator.py), except a field the schema does not declare, which server-side apply refuses; an example is
accepted and comes back exactly as sent (nothing pruned, nothing defaulted).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from cluster.control_plane import ApiError, ControlPlane
from crd_api import ROOT, KubectlLoader, base_manifest
from test_crd_manifests import CASES, Case

from stagerun.operator import crd, naming

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
REQUIRED = re.compile(r"'([^']+)' is a required property")


def _apply(plane: ControlPlane, namespace: str, manifest: dict):
    doc = copy.deepcopy(manifest)
    doc.setdefault("metadata", {})["namespace"] = namespace
    return plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(doc), check=False
    )


def _field(case: Case) -> str:
    """The field the apiserver names for a case the schema refuses: a missing property is named itself."""
    path, message = case.schema
    missing = REQUIRED.search(message)
    if missing:
        return f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path


_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def keyed(path: str, manifest: dict) -> str:
    """``path`` as server-side apply names it when it types a patch: an item of a list-map by its keys
    (``spec.phases[name="core"].seqLne``), other items by index. Its validation errors keep indexes."""
    schema, value, out = crd.openapi_schema(), manifest, ""
    for key, index in _STEP.findall(path):
        if index:
            item = value[int(index)] if isinstance(value, list) else None
            keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
            if keys and isinstance(item, dict) and all(k in item for k in keys):
                out += "[" + ",".join(f'{k}="{item[k]}"' for k in keys) + "]"
            else:
                out += f"[{index}]"
            schema, value = schema["items"], item
        else:
            out += f".{key}" if out else key
            schema = schema.get("properties", {}).get(key) or schema.get("additionalProperties") or {}
            value = value.get(key) if isinstance(value, dict) else None
    return out


_LIST_ITEM = re.compile(r"(.*)\[(\d+)\](?:\.[^.\[\]]+)?")


def names(stderr: str, path: str, manifest: dict) -> bool:
    """Whether an apiserver's refusal names the field at ``path``, in either of its forms. A list-map's own
    problems (an item repeating another's key, an item without its key) server-side apply reports for the list."""
    if path in stderr or keyed(path, manifest) in stderr:
        return True
    item = _LIST_ITEM.fullmatch(path)
    if item is None:
        return False
    parent, index = keyed(item.group(1), manifest), item.group(2)
    return f"{parent}: duplicate entries for key" in stderr or (
        f"{parent}: element {index}: associative list with keys has an element that omits" in stderr
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted_and_stored_as_written(control_plane, trainingrun_crd, namespace, path):
    runs = [d for d in yaml.load_all(path.read_text(), Loader=KubectlLoader) if d and d.get("kind") == naming.KIND]
    assert runs, f"{path.name} holds no TrainingRun"
    for run in runs:
        result = _apply(control_plane, namespace, run)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        assert json.loads(result.stdout)["spec"] == run["spec"], f"{path.name}: the apiserver changed the spec"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.id}[{c.layer}]" for c in CASES])
def test_each_malformed_manifest_is_refused_by_the_layer_it_names(control_plane, trainingrun_crd, namespace, case):
    manifest = case.manifest()
    result = _apply(control_plane, namespace, manifest)
    if case.pruned:
        # A field the schema does not declare: the stand-in prunes it (as a plain create would, with a warning);
        # server-side apply types the patch against the schema first and refuses it, naming the field.
        assert result.returncode != 0, f"the apiserver stored {case.id} with an undeclared field"
        for pruned in case.pruned:
            assert f"{keyed(pruned, manifest)}: field not declared in schema" in result.stderr, result.stderr
    elif case.schema is None:
        # Only the operator's validation can refuse it: the apiserver must store it (then a condition says why).
        assert result.returncode == 0, f"the apiserver refused {case.id}, which its stand-in accepts: {result.stderr}"
    else:
        assert result.returncode != 0, f"the apiserver stored {case.id}: the CRD schema should refuse it"
        field = _field(case)
        assert names(result.stderr, field, manifest), f"{case.id}: the refusal does not name {field}: {result.stderr}"


@pytest.mark.parametrize(
    "name, refused",
    [("8b-run", True), ("r" * 51, True), ("r" * 50, False), ("llama-8b", False)],
    ids=["starts-with-a-digit", "51-characters", "50-characters", "letters-and-digits"],
)
def test_run_names_that_cannot_name_the_children_are_refused_at_apply(
    control_plane, trainingrun_crd, namespace, name, refused
):
    """The CRD's CEL rule and `stagerun validate` (kubernetes_problems) say the same about metadata.name."""
    from stagerun.core.spec import kubernetes_problems, resolve_run

    manifest = base_manifest()
    manifest["metadata"]["name"] = name
    result = _apply(control_plane, namespace, manifest)
    said_by_validate = [p.path for p in kubernetes_problems(resolve_run(manifest).manifest)]
    if refused:
        assert result.returncode != 0 and "metadata.name must start with a letter" in result.stderr, result.stderr
        assert said_by_validate == ["metadata.name"]
    else:
        assert result.returncode == 0, result.stderr
        assert said_by_validate == []


# -- list-maps: phases (and the overlay's lists) keyed by name ----------------------------------------------------
def test_a_repeated_phase_name_is_refused_by_apply_create_and_validate(control_plane, trainingrun_crd, namespace):
    """Phases are a list-map keyed by name: server-side apply, a plain create and `stagerun validate` all refuse
    a second phase called 'core', and all name it."""
    from stagerun.core.spec import validate_manifest

    manifest = base_manifest()
    manifest["spec"]["phases"][2]["name"] = "core"
    applied = _apply(control_plane, namespace, manifest)
    assert applied.returncode != 0 and '.spec.phases: duplicate entries for key [name="core"]' in applied.stderr
    doc = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    created = control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
    assert created.returncode != 0 and "spec.phases[2]: Duplicate value" in created.stderr, created.stderr
    assert [p.path for p in validate_manifest(manifest)] == ["spec.phases[2].name"]


def test_a_pod_template_overlay_is_accepted_and_stored_as_written(control_plane, trainingrun_crd, namespace):
    from test_pod_overlay import NCCL_OVERLAY

    manifest = base_manifest()
    manifest["spec"]["podTemplate"] = copy.deepcopy(NCCL_OVERLAY)
    result = _apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == manifest["spec"]  # nothing pruned: free-form blocks are kept


# -- fields fixed once the run has started (CEL transition rules) ------------------------------------------------
FIXED_ONCE_STARTED = {  # an edit of each field of changes.IMMUTABLE_ONCE_STARTED
    "spec.model": {"model": {"dim": 512}},
    "spec.tokenizer": {"tokenizer": {"train": {"vocabSize": 2048}}},
    "spec.data.sources": {"data": {"sources": {"docs": {"weight": 0.6}, "code": {"weight": 0.4}}}},
    "spec.data.seed": {"data": {"seed": 7}},
    "spec.training": {"training": {"docMasking": False}},
    "spec.checkpoint.path": {"checkpoint": {"path": "s3://bucket/runs/elsewhere"}},
}


def test_fields_fixed_once_started_are_refused_by_the_apiserver_only_after_the_start(
    control_plane, trainingrun_crd, namespace
):
    """Before the operator launched the first attempt every edit is stored (fixing a manifest is how a refused
    run is started); once status.attempt > 0 the apiserver refuses an edit of each fixed field with its rule's
    message, and still takes edits of later phases, suspend, metadata, and the operator's status writes."""
    from stagerun.core.spec.changes import IMMUTABLE_ONCE_STARTED

    assert set(FIXED_ONCE_STARTED) == set(IMMUTABLE_ONCE_STARTED)
    path = f"/apis/stagerun.io/v1alpha1/namespaces/{namespace}/trainingruns/quickstart"
    merge = "application/merge-patch+json"
    control_plane.request("POST", path.rsplit("/", 1)[0], base_manifest())
    # Not started: the model may still change (and back).
    control_plane.request("PATCH", path, {"spec": {"model": {"dim": 512}}}, content_type=merge)
    control_plane.request("PATCH", path, {"spec": {"model": {"dim": 256}}}, content_type=merge)
    # The operator launches attempt 1 (a status write, through the status subresource).
    control_plane.request("PATCH", f"{path}/status", {"status": {"attempt": 1, "state": "Starting"}}, merge)
    for field, edit in FIXED_ONCE_STARTED.items():
        with pytest.raises(ApiError) as refused:
            control_plane.request("PATCH", path, {"spec": edit}, content_type=merge)
        assert refused.value.code == 422, refused.value
        assert f"{field} cannot change once the run has started" in refused.value.message, refused.value.message
    stored = control_plane.request("GET", path)
    assert stored["spec"] == base_manifest()["spec"]
    # What a started run still takes.
    later = copy.deepcopy(stored["spec"]["phases"])
    later[2]["tokens"] = "128K"
    for spec in ({"phases": later}, {"suspend": True}, {"data": {"seed": 0}}):  # seed 0: the default, no change
        control_plane.request("PATCH", path, {"spec": spec}, content_type=merge)
    control_plane.request("PATCH", path, {"metadata": {"labels": {"team": "llm"}}}, content_type=merge)
    control_plane.request("PATCH", f"{path}/status", {"status": {"attempt": 2, "state": "Running"}}, merge)
    # A status written through the main resource is dropped: a user cannot lift the rules by resetting it.
    control_plane.request("PATCH", path, {"status": {"attempt": 0}}, content_type=merge)
    assert control_plane.request("GET", path)["status"]["attempt"] == 2
    with pytest.raises(ApiError, match="spec.model cannot change"):
        control_plane.request("PATCH", path, {"spec": {"model": {"dim": 512}}}, content_type=merge)
