"""The TrainingRun CRD against manifests, with a JSON-Schema validator standing in for the API server
(tests/crd_api.py): it accepts the examples and rejects malformed manifests - each case states which layer rejects
it: the CRD schema at `kubectl apply` time, or the operator's own validation of the stored object - and accepts the
status the operator writes. The schema's own structure is tests/test_crd.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from crd_api import ROOT, KubectlLoader, base_manifest, load_kubectl, make_api_server, operator_problems

from stagerun.core.spec import resolve_run, to_manifest, validate_manifest
from stagerun.operator import naming


def test_kubectl_loader_reads_exponents_as_numbers():
    doc = load_kubectl("a: 3e-4\nb: 1e9\nc: 1.5e3\nd: 0.7\ne: 8Ki\nf: 512K\ng: '3e-4'\nh: 4096\n")
    assert doc == {"a": 3e-4, "b": 1e9, "c": 1500.0, "d": 0.7, "e": "8Ki", "f": "512K", "g": "3e-4", "h": 4096}
    assert isinstance(doc["h"], int)
    assert yaml.safe_load("a: 3e-4") == {"a": "3e-4"}  # plain PyYAML (YAML 1.1), and SafeLoader is left untouched


@pytest.fixture(scope="module")
def api_server():
    return make_api_server()


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_the_schema(path, api_server):
    documents = [d for d in yaml.load_all(path.read_text(), Loader=KubectlLoader) if d]
    runs = [d for d in documents if d.get("kind") == naming.KIND]
    assert runs, f"{path.name} holds no TrainingRun"
    for run in runs:
        assert api_server(run) == []
        assert api_server.pruned(run) == [], "a field of the example is not in the CRD and would be dropped"
        assert validate_manifest(run) == []


def test_base_manifest_passes_both_layers(api_server):
    manifest = base_manifest()
    assert api_server(manifest) == [] and api_server.pruned(manifest) == []
    assert operator_problems(manifest) == []


def test_fully_defaulted_manifest_passes_the_schema(api_server):
    """Every field, defaults included, written back (as the operator does for its ConfigMap) still validates."""
    full = to_manifest(resolve_run(base_manifest()).manifest)
    assert "hangTimeout" in full["spec"] and "optimizer" in full["spec"]["training"]
    assert api_server(full) == [] and api_server.pruned(full) == []


# -- malformed manifests and the layer that rejects each ------------------------------------------------------------
DELETE = object()
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _edit(manifest: dict, path: str, value: Any) -> None:
    keys = [int(i) if i else k for k, i in _PART.findall(path)]
    target = manifest
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


@dataclass
class Case:
    id: str
    edits: dict[str, Any]
    schema: tuple[str, str] | None = None  # (path, message part) the CRD schema reports; None: the schema accepts
    operator: tuple[str, str] | None = None  # (path, message part) the operator reports
    pruned: list[str] = field(default_factory=list)  # fields the API server would prune (strict: reject as unknown)

    @property
    def layer(self) -> str:
        return " + ".join(name for name, hit in (("schema", self.schema), ("operator", self.operator)) if hit)

    def manifest(self) -> dict:
        manifest = base_manifest()
        for path, value in self.edits.items():
            _edit(manifest, path, value)
        return manifest


P0, P1, P2 = "spec.phases[0]", "spec.phases[1]", "spec.phases[2]"
POD = "spec.podTemplate.spec"
TRAINER = f"{POD}.containers[0]"


def trainer_overlay(**container: Any) -> dict:
    """A spec.podTemplate that changes only the trainer container."""
    return {"spec": {"containers": [{"name": "trainer", **container}]}}


CASES = [
    # Rejected by the CRD schema at `kubectl apply` time (and again by the operator, which reads with the same rules).
    Case(
        "missing-spec",
        {"spec": DELETE},
        schema=("", "'spec' is a required property"),
        operator=("spec", "required field is missing"),
    ),
    Case(
        "missing-phases",
        {"spec.phases": DELETE},
        schema=("spec", "'phases' is a required property"),
        operator=("spec.phases", "required field is missing"),
    ),
    Case(
        "phase-without-tokens",
        {f"{P0}.tokens": DELETE},
        schema=(P0, "'tokens' is a required property"),
        operator=(f"{P0}.tokens", "required field is missing"),
    ),
    Case(
        "ramp-point-without-size",
        {f"{P0}.batch.ramp[1]": {"tokens": "160K"}},
        schema=(f"{P0}.batch.ramp[1]", "'size' is a required property"),
        operator=(f"{P0}.batch.ramp[1].size", "required field is missing"),
    ),
    Case(
        "source-without-weight",
        {"spec.data.sources.code": {"path": "builtin:python-code"}},
        schema=("spec.data.sources.code", "'weight' is a required property"),
        operator=("spec.data.sources.code.weight", "required field is missing"),
    ),
    Case(
        "dim-as-string",
        {"spec.model.dim": "256"},
        schema=("spec.model.dim", "'256' is not of type 'integer'"),
        operator=("spec.model.dim", "expected an integer"),
    ),
    Case(
        "phases-as-mapping",
        {"spec.phases": {"core": {"tokens": "1M"}}},
        schema=("spec.phases", "is not of type 'array'"),
        operator=("spec.phases", "expected a list"),
    ),
    Case(
        "ramp-point-as-string",
        {f"{P0}.batch.ramp[0]": "8Ki"},
        schema=(f"{P0}.batch.ramp[0]", "'8Ki' is not of type 'object'"),
        operator=(f"{P0}.batch.ramp[0]", "expected a mapping"),
    ),
    Case(
        "weight-not-a-number",
        {"spec.data.sources.docs.weight": "lots"},
        schema=("spec.data.sources.docs.weight", "'lots' is not of type 'number'"),
        operator=("spec.data.sources.docs.weight", "cannot read 'lots' as a number"),
    ),
    Case(
        "suspend-as-string",
        {"spec.suspend": "true"},
        schema=("spec.suspend", "'true' is not of type 'boolean'"),
        operator=("spec.suspend", "expected true or false"),
    ),
    Case(
        "tokens-as-boolean",
        {f"{P0}.tokens": True},
        schema=(f"{P0}.tokens", "is not valid under any of the given schemas"),  # neither integer nor string
        operator=(f"{P0}.tokens", "got the boolean"),
    ),
    Case(
        "lr-schedule-typo",
        {f"{P0}.lr.schedule": "cosin"},
        schema=(
            f"{P0}.lr.schedule",
            "'cosin' is not one of ['constant', 'linear', 'cosine', 'wsd', 'invSqrt', 'continue']",
        ),
        operator=(f"{P0}.lr.schedule", "did you mean 'cosine'?"),
    ),
    Case(
        "precision-fp16",
        {"spec.training.precision": "fp16"},
        schema=("spec.training.precision", "'fp16' is not one of"),
        operator=("spec.training.precision", "must be one of"),
    ),
    Case(
        "source-format-parquet",
        {"spec.data.sources.docs.format": "parquet"},
        schema=("spec.data.sources.docs.format", "'parquet' is not one of"),
        operator=("spec.data.sources.docs.format", "must be one of auto, tokens, text, jsonl"),
    ),
    Case(
        "norm-batchnorm",
        {"spec.model.norm": "batchnorm"},
        schema=("spec.model.norm", "'batchnorm' is not one of ['rmsnorm', 'layernorm']"),
        operator=("spec.model.norm", "must be one of"),
    ),
    Case(
        "zero-nodes",
        {"spec.resources.nodes": 0},
        schema=("spec.resources.nodes", "0 is less than the minimum of 1"),
        operator=("spec.resources.nodes", "must be at least 1"),
    ),
    Case(
        "zero-token-phase",
        {f"{P1}.tokens": 0},  # minimum on an int-or-string field applies to its integer form
        schema=(f"{P1}.tokens", "0 is less than the minimum of 1"),
        operator=(f"{P1}.tokens", "must be at least 1"),
    ),
    Case(
        "hang-timeout-too-short",
        {"spec.hangTimeout": 30},
        schema=("spec.hangTimeout", "30 is less than the minimum of 60"),
        operator=("spec.hangTimeout", "must be at least 60"),
    ),
    Case(
        "zero-peak-lr",
        {f"{P0}.lr.peak": 0},
        schema=(f"{P0}.lr.peak", "0 is less than or equal to the minimum of 0"),
        operator=(f"{P0}.lr.peak", "must be greater than 0"),
    ),
    Case(
        "decay-fraction-above-1",
        {f"{P0}.lr.schedule": "wsd", f"{P0}.lr.decayFraction": 1.5},
        schema=(f"{P0}.lr.decayFraction", "1.5 is greater than the maximum of 1"),
        operator=(f"{P0}.lr.decayFraction", "must be at most 1"),
    ),
    Case(
        "beta2-of-1",
        {"spec.training.optimizer": {"beta2": 1.0}},
        schema=("spec.training.optimizer.beta2", "1.0 is greater than the maximum of 0.999999"),
        operator=("spec.training.optimizer.beta2", "must be at most 0.999999"),
    ),
    Case(
        "keep-zero-checkpoints",
        {"spec.checkpoint.keep": 0},
        schema=("spec.checkpoint.keep", "0 is less than the minimum of 1"),
        operator=("spec.checkpoint.keep", "must be at least 1"),
    ),
    Case(
        "node-selector-value-not-a-string",
        {"spec.scheduling": {"nodeSelector": {"pool": 8}}},
        schema=("spec.scheduling.nodeSelector.pool", "8 is not of type 'string'"),
        operator=("spec.scheduling.nodeSelector.pool", "expected a string"),
    ),
    Case(
        "tolerations-as-mapping",
        {"spec.scheduling": {"tolerations": {"key": "gpu", "operator": "Exists"}}},
        schema=("spec.scheduling.tolerations", "is not of type 'array'"),
        operator=("spec.scheduling.tolerations", "expected a list"),
    ),
    Case(
        "image-pull-secrets-as-objects",
        {"spec.scheduling": {"imagePullSecrets": [{"name": "regcred"}]}},
        schema=("spec.scheduling.imagePullSecrets[0]", "is not of type 'string'"),  # names, not Pod-style objects
        operator=("spec.scheduling.imagePullSecrets[0]", "expected a string"),
    ),
    # List-maps (phases by name, the overlay's env vars and volumes by name): the apiserver refuses duplicate keys.
    Case(
        "duplicate-phase-name",
        {f"{P1}.name": "core"},
        schema=(P1, "Duplicate value"),
        operator=(f"{P1}.name", "duplicate name 'core': spec.phases[0] has it too"),
    ),
    Case(
        "env-var-without-name",
        {"spec.podTemplate": trainer_overlay(env=[{"value": "INFO"}])},
        schema=(f"{TRAINER}.env[0]", "'name' is a required property"),
        operator=(f"{TRAINER}.env[0].name", "required field is missing"),
    ),
    Case(
        "duplicate-env-var",
        {"spec.podTemplate": trainer_overlay(env=[{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG"}])},
        schema=(f"{TRAINER}.env[1]", "Duplicate value"),
        operator=(f"{TRAINER}.env[1].name", "duplicate name 'NCCL_DEBUG'"),
    ),
    Case(
        "volume-without-name",
        {"spec.podTemplate": {"spec": {"volumes": [{"emptyDir": {}}]}}},
        schema=(f"{POD}.volumes[0]", "'name' is a required property"),
        operator=(f"{POD}.volumes[0].name", "required field is missing"),
    ),
    Case(
        "duplicate-volume",
        {
            "spec.podTemplate": {
                "spec": {"volumes": [{"name": "data", "emptyDir": {}}, {"name": "data", "emptyDir": {}}]}
            }
        },
        schema=(f"{POD}.volumes[1]", "Duplicate value"),
        operator=(f"{POD}.volumes[1].name", "duplicate name 'data'"),
    ),
    Case(
        "resource-quantity-in-words",
        {"spec.podTemplate": trainer_overlay(resources={"limits": {"rdma/hca": "one"}})},
        schema=(f"{TRAINER}.resources.limits.rdma/hca", "'one' does not match"),
        operator=(f"{TRAINER}.resources.limits.rdma/hca", "cannot read 'one' as a Kubernetes quantity"),
    ),
    Case(
        "negative-resource-quantity",
        {"spec.podTemplate": trainer_overlay(resources={"limits": {"rdma/hca": -1}})},
        schema=(f"{TRAINER}.resources.limits.rdma/hca", "-1 is less than the minimum of 0"),
        operator=(f"{TRAINER}.resources.limits.rdma/hca", "cannot read -1 as a Kubernetes quantity"),
    ),
    # Accepted by the schema, rejected by the operator: rules that span fields, parse quantities, or are
    # Kubernetes-only, and unknown fields, which the API server prunes instead of rejecting.
    Case(
        "unknown-field-seqLne",
        {f"{P1}.seqLne": 512},
        pruned=[f"{P1}.seqLne"],
        operator=(f"{P1}.seqLne", "unknown field (fix: did you mean 'seqLen'?)"),
    ),
    Case(
        "unknown-block-checkpoints",
        {"spec.checkpoints": {"keep": 5}},
        pruned=["spec.checkpoints"],
        operator=("spec.checkpoints", "unknown field (fix: did you mean 'checkpoint'?)"),
    ),
    Case(
        "source-weights-sum-1.1",
        {"spec.data.sources.code.weight": 0.4},
        operator=("spec.data.sources[*].weight", "weights sum to 1.1, not 1"),
    ),
    Case(
        "phase-weights-sum-1.1",
        {f"{P2}.data.weights": {"docs": 0.5, "code": 0.6}},
        operator=(f"{P2}.data.weights", "weights sum to 1.1, not 1"),
    ),
    Case(
        "seq-len-not-multiple-of-8",
        {f"{P0}.seqLen": 100},
        operator=(f"{P0}.seqLen", "must be a positive multiple of 8, got 100"),
    ),
    Case(
        "tokens-bad-suffix",
        {f"{P0}.tokens": "2X"},
        schema=(f"{P0}.tokens", "'2X' does not match"),  # the parser's own pattern, stated in the CRD
        operator=(f"{P0}.tokens", "cannot read '2X' as a count"),
    ),
    Case(
        "hang-timeout-in-words",
        {"spec.hangTimeout": "15 minutes"},
        schema=("spec.hangTimeout", "'15 minutes' does not match"),
        operator=("spec.hangTimeout", "cannot read '15 minutes' as a duration"),
    ),
    Case(
        "tokenizer-path-and-train",
        {"spec.tokenizer.path": "s3://bucket/tok.json"},
        operator=("spec.tokenizer", "set exactly one of path and train"),
    ),
    Case("unknown-preset", {"spec.model.preset": "gpt-5"}, operator=("spec.model.preset", "unknown preset 'gpt-5'")),
    Case("phase-name-not-a-label", {f"{P0}.name": "Core_Phase"}, operator=(f"{P0}.name", "is not a DNS-1123 label")),
    Case("missing-image", {"spec.image": DELETE}, operator=("spec.image", "is required on Kubernetes")),
    Case(
        "missing-checkpoint-path",
        {"spec.checkpoint.path": DELETE},
        operator=("spec.checkpoint.path", "is required on Kubernetes"),
    ),
    Case(
        "local-checkpoint-without-volume",
        {"spec.checkpoint.path": "/checkpoints"},
        operator=("spec.checkpoint.path", "is a local path but no volumeClaim is mounted there"),
    ),
    Case(
        "overlay-sets-an-operator-env-var",
        {"spec.podTemplate": trainer_overlay(env=[{"name": "STAGERUN_RDZV_ENDPOINT", "value": "elsewhere:1"}])},
        operator=(f"{TRAINER}.env[0].name", "STAGERUN_RDZV_ENDPOINT is set by the operator"),
    ),
    Case(
        "overlay-asks-for-gpus",
        {"spec.podTemplate": trainer_overlay(resources={"limits": {"nvidia.com/gpu": 2}})},
        operator=(f"{TRAINER}.resources.limits.nvidia.com/gpu", "set spec.resources.gpusPerNode instead"),
    ),
    Case(
        "overlay-label-the-operator-selects-by",
        {"spec.podTemplate": {"metadata": {"labels": {"stagerun.io/run": "other"}}}},
        operator=("spec.podTemplate.metadata.labels.stagerun.io/run", "is reserved"),
    ),
    Case(
        "overlay-second-container",
        {"spec.podTemplate": {"spec": {"containers": [{"name": "sidecar"}]}}},
        operator=(f"{TRAINER}.name", "only the 'trainer' container can be changed"),
    ),
    Case(
        "overlay-node-selector",
        {"spec.podTemplate": {"spec": {"nodeSelector": {"pool": "a100"}}}},
        pruned=[f"{POD}.nodeSelector"],
        operator=(f"{POD}.nodeSelector", "set it as spec.scheduling.nodeSelector"),
    ),
    Case(
        "volume-claim-with-relative-path",
        {"spec.checkpoint.path": "ckpt", "spec.checkpoint.volumeClaim": "runs"},
        operator=("spec.checkpoint.path", "must be an absolute path"),
    ),
]


def test_enough_malformed_cases_on_both_layers():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(1 for c in CASES if c.schema) >= 20
    assert sum(1 for c in CASES if not c.schema) >= 10
    assert all(c.operator for c in CASES), "every manifest the schema rejects is also rejected by `stagerun run`"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.id}[{c.layer}]" for c in CASES])
def test_malformed_manifest_is_rejected(case, api_server):
    manifest = case.manifest()

    errors = api_server(manifest)
    if case.schema is None:
        assert errors == [], f"the schema should accept {case.id}"
    else:
        path, part = case.schema
        assert any(p == path and part in message for p, message in errors), errors
    assert api_server.pruned(manifest) == case.pruned

    problems = operator_problems(manifest)
    if case.operator is None:
        assert problems == []
    else:
        path, part = case.operator
        assert any(p.path == path and part in str(p) for p in problems), [str(p) for p in problems]


def test_quoted_numbers_are_stricter_in_the_schema(api_server):
    """`peak: "3e-4"` (quoted) runs with `stagerun run`, but the API server wants a JSON number; unquoted, kubectl's
    YAML reads 3e-4 as a number and both layers accept it."""
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    assert "peak: 3e-3" in text
    unquoted = load_kubectl(text)
    assert unquoted["spec"]["phases"][0]["lr"]["peak"] == 3e-3 and api_server(unquoted) == []
    quoted = base_manifest()
    quoted["spec"]["phases"][0]["lr"]["peak"] = "3e-3"
    assert api_server(quoted) == [(f"{P0}.lr.peak", "'3e-3' is not of type 'number'")]
    assert validate_manifest(quoted) == []


def test_nulls_are_dropped_like_unset_fields(api_server):
    manifest = base_manifest()
    manifest["spec"]["phases"][1]["lr"] = None
    manifest["spec"]["queueName"] = None
    assert api_server(manifest) == [] and operator_problems(manifest) == []


def test_status_subresource_accepts_what_the_operator_writes(api_server):
    manifest = base_manifest()
    manifest["status"] = {
        "state": "Running",
        "phase": "core",
        "phaseIndex": 0,
        "step": 12,
        "tokensSeen": 2_000_000_000_000,
        "loss": 2.3456,
        "tokensPerSecond": 51234.5,
        "restarts": 1,
        "attempt": 2,
        "lastCheckpoint": {
            "path": "s3://bucket/runs/quickstart/step-10",
            "step": 10,
            "tokens": 81920,
            "time": "2025-01-01T00:00:00Z",
        },
        "startTime": "2025-01-01T00:00:00Z",
        "eta": "2h30m",
        "acceptedSpec": {"anything": ["the operator keeps"]},
        "conditions": [
            {
                "type": "Progressing",
                "status": "True",
                "reason": "Running",
                "message": "attempt 2, phase core",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            }
        ],
        "someFutureField": {"kept": True},  # preserve-unknown-fields: the operator may add fields
    }
    assert api_server(manifest) == [] and api_server.pruned(manifest) == []
    manifest["status"]["step"] = "twelve"
    assert api_server(manifest) == [("status.step", "'twelve' is not of type 'integer'")]


def test_status_the_state_machine_writes_fits_the_schema(api_server):
    """The API server validates status writes too: what `stagerun.operator.state` produces must pass, or its
    status patches would be refused (a pending run, one folding progress and a checkpoint, one that succeeded)."""
    from stagerun.operator.observe import JobView, Observation, PodView
    from stagerun.operator.state import reconcile

    manifest = base_manifest()
    run, now = resolve_run(manifest), 1_800_000_000.0
    pending = reconcile(run, {}, Observation(now=now)).status
    progress = {
        "step": 40,
        "tokens": 491_520,
        "loss": 6.2,
        "tokensPerSecond": 5000.0,
        "phaseIndex": 1,
        "lastStepAt": now + 99,
        "lastCheckpoint": {"path": "s3://b/step-40", "step": 40, "tokens": 491_520, "time": now + 98},
    }
    job = JobView(name="quickstart-a1", attempt=1, completions=1)
    running = reconcile(
        run,
        pending,
        Observation(
            now=now + 100,
            job=job,
            pods=(PodView(name="quickstart-a1-0-abcde", index=0, phase="Running"),),
            progress=progress,
        ),
    ).status
    done = PodView(
        name="quickstart-a1-0-abcde",
        index=0,
        phase="Succeeded",
        exit_code=0,
        message={"state": "complete", "step": 59, "tokens": 802_816, "checkpoint": "s3://b/step-59"},
    )
    finished = reconcile(
        run,
        running,
        Observation(
            now=now + 200,
            job=JobView(name="quickstart-a1", attempt=1, completions=1, complete=True, succeeded=1),
            pods=(done,),
        ),
    ).status
    assert (pending["state"], running["state"], finished["state"]) == ("Starting", "Running", "Succeeded")
    assert running["eta"] and running["lastCheckpoint"]["step"] == 40 and finished["completionTime"]
    for status in (pending, running, finished):
        assert api_server({**manifest, "status": status}) == [], status
