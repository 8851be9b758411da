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
from cluster.control_plane import ControlPlane
from crd_api import ROOT, KubectlLoader, base_manifest
from test_crd_manifests import CASES, Case

from stagerun.operator import naming

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
    result = _apply(control_plane, namespace, case.manifest())
    if case.pruned:
        # A field the schema does not declare: the stand-in prunes it (as a plain create would, with a warning);
        # server-side apply types the patch against the schema first and refuses it, naming the field.
        assert result.returncode != 0, f"the apiserver stored {case.id} with an undeclared field"
        for pruned in case.pruned:
            assert f"{pruned}: field not declared in schema" in result.stderr, result.stderr
    elif case.schema is None:
        # Only the operator's validation can refuse it: the apiserver must store it (then a condition says why).
        assert result.returncode == 0, f"the apiserver refused {case.id}, which its stand-in accepts: {result.stderr}"
    else:
        assert result.returncode != 0, f"the apiserver stored {case.id}: the CRD schema should refuse it"
        assert _field(case) in result.stderr, f"{case.id}: the refusal does not name {_field(case)}: {result.stderr}"


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
