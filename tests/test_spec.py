"""Spec: manifests are read exactly, and every malformed one is rejected with the right field path."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from stagerun.core.spec import (
    SpecError,
    format_count,
    load_run,
    parse_count,
    parse_float,
    read_manifest,
    resolve_run,
    to_manifest,
    validate_manifest,
)
from stagerun.core.spec.quantities import QuantityError

ROOT = Path(__file__).resolve().parents[1]


def base_manifest() -> dict:
    return {
        "apiVersion": "stagerun.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "unit"},
        "spec": {
            "model": {"preset": "tiny"},
            "tokenizer": {"train": {"vocabSize": 512}},
            "data": {
                "sources": {
                    "web": {"path": "builtin:python-docs", "weight": 0.75},
                    "code": {"path": "builtin:python-code", "weight": 0.25},
                }
            },
            "phases": [
                {
                    "name": "core",
                    "tokens": "1M",
                    "seqLen": 128,
                    "microBatchSize": 4,
                    "batch": {"ramp": [{"tokens": 0, "size": "8Ki"}, {"tokens": "500K", "size": "16Ki"}]},
                    "lr": {"schedule": "cosine", "peak": "3e-4", "to": "3e-5", "warmupTokens": "100K"},
                },
                {"name": "long", "tokens": "200K", "seqLen": 256},
                {
                    "name": "anneal",
                    "tokens": "100K",
                    "data": {"weights": {"web": 0.5, "code": 0.5}},
                    "lr": {"schedule": "linear", "to": 0},
                },
            ],
            "resources": {"processesPerNode": 2},
        },
    }


def mutate(path: str, value):
    """A mutation that sets (or with value=DELETE removes) the dotted/indexed path in the manifest."""

    def apply(manifest: dict) -> dict:
        keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return manifest

    return apply


DELETE = object()

# (mutation, expected field path, fragment of the message)
MALFORMED = [
    (mutate("apiVersion", "stagerun.io/v1"), "apiVersion", "must be stagerun.io/v1alpha1"),
    (mutate("kind", "TrainRun"), "kind", "must be TrainingRun"),
    (mutate("metadata.name", "My_Run"), "metadata.name", "DNS-1123"),
    (mutate("metadata", DELETE), "metadata", "required"),
    (mutate("spec.phases", []), "spec.phases", "is empty"),
    (mutate("spec.phases[1].seqLen", 1001), "spec.phases[1].seqLen", "must be a positive multiple of 8, got 1001"),
    (mutate("spec.phases[1].seqLen", 384), "spec.phases[1].batch", "inherited from the previous phase"),
    (mutate("spec.phases[1].seqLen", 2048), "spec.phases[1].seqLen", "longer than the model's maxSeqLen"),
    (mutate("spec.phases[0].seqLen", DELETE), "spec.phases[0].seqLen", "first phase must set seqLen"),
    (mutate("spec.phases[0].tokens", "2X"), "spec.phases[0].tokens", "cannot read '2X'"),
    (mutate("spec.phases[0].tokens", "1.5"), "spec.phases[0].tokens", "not a whole number"),
    (mutate("spec.phases[0].tokens", 0), "spec.phases[0].tokens", "at least 1"),
    (mutate("spec.phases[0].tokens", True), "spec.phases[0].tokens", "boolean"),
    (mutate("spec.phases[0].name", DELETE), "spec.phases[0].name", "required"),
    (mutate("spec.phases[1].name", "core"), "spec.phases[1].name", "duplicate name 'core': spec.phases[0] has"),
    (mutate("spec.phases[0].batch.ramp[1].size", "4Ki"), "spec.phases[0].batch.ramp[1].size", "must increase"),
    (mutate("spec.phases[0].batch.ramp[1].tokens", 0), "spec.phases[0].batch.ramp[1].tokens", "increasing token order"),
    (mutate("spec.phases[0].batch.ramp[0].tokens", 10), "spec.phases[0].batch.ramp[0].tokens", "must be at tokens 0"),
    (
        mutate("spec.phases[0].batch.ramp[1].tokens", "2M"),
        "spec.phases[0].batch.ramp[1].tokens",
        "not inside the phase",
    ),
    (
        mutate("spec.phases[0].batch.ramp[1].size", "15K"),
        "spec.phases[0].batch.ramp[1].size",
        "not a whole number of sequences",
    ),
    (
        mutate("spec.phases[0].batch", {"size": "8Ki", "ramp": [{"tokens": 0, "size": "8Ki"}]}),
        "spec.phases[0].batch",
        "not both",
    ),
    (mutate("spec.phases[0].batch", DELETE), "spec.phases[0].batch", "first phase must set batch"),
    (
        mutate("spec.phases[0].microBatchSize", 3),
        "spec.phases[0].batch.ramp[0].size",
        "do not split into data-parallel",
    ),
    (mutate("spec.phases[0].lr.peak", "fast"), "spec.phases[0].lr.peak", "cannot read 'fast'"),
    (mutate("spec.phases[0].lr.peak", DELETE), "spec.phases[0].lr.peak", "first phase must set lr.peak"),
    (mutate("spec.phases[0].lr.schedule", "cosin"), "spec.phases[0].lr.schedule", "did you mean 'cosine'"),
    (mutate("spec.phases[0].lr.to", 1.0), "spec.phases[0].lr.to", "above the peak"),
    (mutate("spec.phases[0].lr.warmupTokens", "2M"), "spec.phases[0].lr.warmupTokens", "does not end inside the phase"),
    (mutate("spec.phases[0].lr.decayFraction", 0.1), "spec.phases[0].lr.decayFraction", "only applies to schedule wsd"),
    (
        mutate("spec.phases[0].lr", {"schedule": "wsd", "peak": 1e-3}),
        "spec.phases[0].lr.decayFraction",
        "required with schedule wsd",
    ),
    (
        mutate("spec.phases[0].lr", {"schedule": "wsd", "peak": 1e-3, "decayFraction": 1.5}),
        "spec.phases[0].lr.decayFraction",
        "at most 1",
    ),
    (
        mutate("spec.phases[2].data.weights", {"web": 0.5, "math": 0.5}),
        "spec.phases[2].data.weights.math",
        "names no source",
    ),
    (
        mutate("spec.phases[2].data.weights", {"web": 0.5, "code": 0.6}),
        "spec.phases[2].data.weights",
        "sum to 1.1, not 1",
    ),
    (
        mutate("spec.phases[2].data.weights", {"web": -0.5, "code": 1.5}),
        "spec.phases[2].data.weights.web",
        "at least 0",
    ),
    (mutate("spec.data.sources.web.weight", 0.5), "spec.data.sources[*].weight", "sum to 0.75, not 1"),
    (mutate("spec.data.sources", {}), "spec.data.sources", "is empty"),
    (
        mutate("spec.data.sources.web.path", "builtin:wikipedia"),
        "spec.data.sources.web.path",
        "unknown generated corpus",
    ),
    (mutate("spec.data.sources.web.format", "csv"), "spec.data.sources.web.format", "must be one of"),
    (mutate("spec.tokenizer", {}), "spec.tokenizer", "exactly one of path and train"),
    (
        mutate("spec.tokenizer.train.vocabSize", 100000),
        "spec.tokenizer.train.vocabSize",
        "exceeds the model's vocabSize",
    ),
    (mutate("spec.model.preset", "gpt5"), "spec.model.preset", "unknown preset"),
    (mutate("spec.model", {"dim": 64}), "spec.model.layers", "required when no preset"),
    (mutate("spec.model.kvHeads", 3), "spec.model.kvHeads", "not a multiple of kvHeads"),
    (mutate("spec.model.dim", 66), "spec.model.dim", "not divisible by heads"),
    (mutate("spec.model.rotaryFraction", 0.3), "spec.model.rotaryFraction", "whole number"),
    (mutate("spec.model.position", "alibi"), None, None),  # valid on its own: ALiBi needs no rotary fields
    (
        lambda m: (m["spec"]["model"].update(position="alibi", rotaryFraction=0.5), m)[1],
        "spec.model.rotaryFraction",
        "no meaning with position: alibi",
    ),
    (mutate("spec.model.normBias", True), "spec.model.normBias", "rmsnorm has no bias"),
    (mutate("spec.model.dims", 64), "spec.model.dims", "did you mean 'dim'"),
    (mutate("spec.phases[0].seqlen", 128), "spec.phases[0].seqlen", "did you mean 'seqLen'"),
    (mutate("spec.parallelism", {"tensorParallel": 3}), "spec.parallelism.tensorParallel", "not divisible"),
    (mutate("spec.parallelism", {"contextParallel": 3}), "spec.parallelism.contextParallel", "not divisible"),
    (mutate("spec.parallelism", {"fsdp": 4}), "spec.parallelism.fsdp", "!= world size 2"),
    (
        mutate("spec.resources", {"gpusPerNode": 8, "processesPerNode": 4}),
        "spec.resources.processesPerNode",
        "each GPU needs one process",
    ),
    (mutate("spec.resources.nodes", 0), "spec.resources.nodes", "at least 1"),
    (mutate("spec.checkpoint", {"keep": 0}), "spec.checkpoint.keep", "at least 1"),
    (mutate("spec.checkpoint", {"path": "s4://bucket/run"}), "spec.checkpoint.path", "unknown storage scheme 's4'"),
    (mutate("spec.checkpoint", {"everyTokens": "5Q"}), "spec.checkpoint.everyTokens", "cannot read '5Q'"),
    (mutate("spec.training", {"zLoss": -1}), "spec.training.zLoss", "at least 0"),
    (mutate("spec.training", {"precision": "fp8"}), "spec.training.precision", "must be one of"),
    (mutate("spec.training", {"float8": True}), "spec.training.float8", "needs GPUs"),
    (
        lambda m: (m["spec"].update(parallelism={"tensorParallel": 2}, training={"float8": True}), m)[-1],
        "spec.training.float8",
        "not supported with tensor parallelism",
    ),
    (
        lambda m: (
            m["spec"].update(parallelism={"tensorParallel": 2}),
            m["spec"]["model"].update(padVocabMultiple=1, vocabSize=4097),
            m,
        )[-1],
        "spec.parallelism.tensorParallel",
        "does not divide the padded vocabulary (4097)",
    ),
    (
        lambda m: (
            m["spec"].update(parallelism={"tensorParallel": 16}, resources={"processesPerNode": 16}),
            m["spec"]["phases"][0].update(seqLen=8),
            m,
        )[-1],
        "spec.phases[0].seqLen",
        "not divisible by tensorParallel (16)",
    ),
    (
        mutate("spec.training", {"optimizer": {"implementation": "fused"}}),
        "spec.training.optimizer.implementation",
        "fused AdamW needs GPUs",
    ),
    (
        mutate("spec.training", {"activationCheckpointing": True}),
        "spec.training.activationCheckpointing",
        "must be one of",
    ),
    (mutate("spec.phases", {"name": "core"}), "spec.phases", "expected a list"),
    (mutate("spec.phases[0].lr", "3e-4"), "spec.phases[0].lr", "expected a mapping"),
]


@pytest.mark.parametrize("mutation,path,fragment", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_manifest_is_rejected_with_field_path(mutation, path, fragment):
    manifest = mutation(copy.deepcopy(base_manifest()))
    problems = validate_manifest(manifest)
    if path is None:
        assert problems == []
        return
    assert problems, f"expected a problem at {path}"
    matching = [p for p in problems if p.path == path]
    assert matching, f"no problem at {path}; got {[str(p) for p in problems]}"
    assert any(fragment in str(p) for p in matching), [str(p) for p in matching]


def test_at_least_thirty_malformed_cases():
    assert sum(1 for _, path, _ in MALFORMED if path) >= 30


def test_base_manifest_is_valid_and_resolves_inheritance():
    run = resolve_run(base_manifest())
    core, long, anneal = run.phases
    assert (core.start_tokens, long.start_tokens, anneal.start_tokens, run.total_tokens) == (
        0,
        10**6,
        1_200_000,
        1_300_000,
    )
    assert core.ramp == ((0, 8192), (500_000, 16384))
    assert long.ramp == ((0, 16384),) and long.seq_len == 256 and long.micro_batch_size == 4
    assert long.lr.schedule == "constant" and long.lr.peak == pytest.approx(3e-5)
    assert anneal.lr.peak == pytest.approx(3e-5) and anneal.lr.end == 0.0 and anneal.seq_len == 256
    assert core.weights == {"web": 0.75, "code": 0.25} and long.weights == core.weights
    assert anneal.weights == {"web": 0.5, "code": 0.5}
    assert run.model.dim == 64 and run.model.kv_heads == 2


def test_every_problem_is_reported_not_just_the_first():
    manifest = base_manifest()
    manifest["spec"]["phases"][1]["seqLen"] = 1001
    manifest["spec"]["phases"][2]["data"]["weights"] = {"web": 0.2}
    manifest["spec"]["model"]["kvHeads"] = 3
    manifest["spec"]["bogus"] = 1
    paths = {p.path for p in validate_manifest(manifest)}
    assert {"spec.phases[1].seqLen", "spec.phases[2].data.weights", "spec.model.kvHeads", "spec.bogus"} <= paths


def test_a_duplicate_phase_name_is_reported_with_the_other_problems():
    """Phases are a list keyed by name (the CRD's list-map): a repeated name is reported, and the phases are still
    resolved, so their own problems are reported too (not only the first problem the reader found)."""
    manifest = base_manifest()
    manifest["spec"]["phases"][2]["name"] = "core"
    manifest["spec"]["phases"][1]["seqLen"] = 1001
    paths = [p.path for p in validate_manifest(manifest)]
    assert paths[:2] == ["spec.phases[2].name", "spec.phases[1].seqLen"]


def test_problem_messages_carry_a_fix():
    manifest = base_manifest()
    manifest["spec"]["phases"][0]["batch"]["ramp"][0]["size"] = "8K"
    (problem,) = [p for p in validate_manifest(manifest) if p.path.endswith("ramp[0].size")]
    assert "powers of 1000" in problem.message and "did you mean 8Ki (8192 tokens)?" in problem.fix


def test_world_size_override_revalidates_divisibility():
    assert validate_manifest(base_manifest(), world_size=4) == []
    problems = validate_manifest(base_manifest(), world_size=3)
    assert any("data-parallel ranks (3)" in p.message for p in problems)


def test_phase_level_parallelism_overrides_only_what_it_sets():
    manifest = base_manifest()
    manifest["spec"]["parallelism"] = {"dataParallelReplicate": 2}
    manifest["spec"]["resources"] = {"processesPerNode": 4}
    manifest["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}
    run = resolve_run(manifest)
    assert run.phases[0].parallelism.tensor_parallel == 1
    assert run.phases[1].parallelism.tensor_parallel == 2 and run.phases[1].parallelism.data_parallel_replicate == 2
    assert run.phases[2].parallelism.tensor_parallel == 2  # inherited from the previous phase


def test_status_and_server_metadata_are_accepted():
    manifest = base_manifest()
    manifest["metadata"].update(uid="1234", resourceVersion="7", generation=2, creationTimestamp="2026-01-01T00:00:00Z")
    manifest["status"] = {"phase": "core", "step": 10}
    assert validate_manifest(manifest) == []


def test_manifest_round_trips_through_to_manifest():
    run = resolve_run(base_manifest())
    again = to_manifest(run.manifest, only_explicit=True)
    assert resolve_run(again).phases == run.phases


@pytest.mark.parametrize(
    "text,count",
    [
        ("2T", 2 * 10**12),
        ("252M", 252 * 10**6),
        ("4M", 4 * 10**6),
        ("8B", 8 * 10**9),
        ("8G", 8 * 10**9),
        ("2.87T", 2_870_000_000_000),
        ("4Mi", 4 * 2**20),
        ("16Ki", 16384),
        ("1e9", 10**9),
        ("1_000", 1000),
        (4096, 4096),
        ("40M", 40_000_000),
        ("0", 0),
        (" 3K ", 3000),
        (2.0, 2),
    ],
)
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["2X", "", "M", "1.5", "-3", "1e-3", "2TB", [1], None, True, "3.3333K"])
def test_parse_count_rejects(text):
    with pytest.raises(QuantityError):
        parse_count(text)


def test_parse_float_reads_yaml_strings():
    assert parse_float("3e-4") == pytest.approx(3e-4)
    assert parse_float(1) == 1.0
    for bad in ("nan", "inf", "fast", True, None):
        with pytest.raises(QuantityError):
            parse_float(bad)


def test_format_count_is_short_and_exact_where_possible():
    assert [format_count(c) for c in (2 * 10**12, 1_600_000, 8192, 2**22, 2_870_000_000_000, 999)] == [
        "2T",
        "1.6M",
        "8Ki",
        "4Mi",
        "2.87T",
        "999",
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path):
    run = load_run(path)
    assert run.phases


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read the file"):
        load_run(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_run(bad)
    two = tmp_path / "two.yaml"
    two.write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(SpecError, match="2 YAML documents"):
        load_run(two)


def test_a_key_given_twice_is_refused_with_its_line_not_silently_replaced(tmp_path):
    """PyYAML keeps the last of two equal keys: a second seqLen, or a source declared twice under one name, would
    replace the first without a word (issue 19 item 5)."""
    twice = tmp_path / "twice.yaml"
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    assert "\n  data:\n" in text
    twice.write_text(text + "  data:\n    sources: {}\n")  # spec.data a second time, at the end of spec
    with pytest.raises(SpecError) as caught:
        load_run(twice)
    message = str(caught.value)
    last_line = len(twice.read_text().splitlines()) - 1
    assert f"line {last_line}, column 3: the key 'data' is given a second time" in message, message
    merged = tmp_path / "merged.yaml"  # a merge key may be overridden: that is what it is for
    merged.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_manifest(merged) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}


def test_a_phase_shorter_than_one_batch_is_refused_not_skipped():
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    last = manifest["spec"]["phases"][-1]
    last["tokens"] = 1000  # less than the batch it inherits: it would take zero steps
    problems = validate_manifest(manifest)
    index = len(manifest["spec"]["phases"]) - 1
    assert any(p.path == f"spec.phases[{index}].tokens" and "would take no step" in p.message for p in problems), (
        problems
    )


def test_a_checkpoint_path_in_process_memory_is_refused():
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"]["checkpoint"] = {"path": "memory://runs/quickstart"}
    problems = validate_manifest(manifest)
    assert any(p.path == "spec.checkpoint.path" and "memory://" in p.message for p in problems), problems


def test_non_utf8_and_absurdly_nested_files_give_clear_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"apiVersion: \xff\xfe\n")
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        load_run(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError, match="nests too deeply"):
        load_run(deep)


def test_spec_and_plan_import_no_torch():
    import subprocess

    code = (
        "import sys, stagerun.core.spec, stagerun.core.plan, stagerun.core.plan_report; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_operator_folder_never_shadows_the_standard_library():
    import subprocess

    code = (
        "import operator, stagerun.operator; assert operator.__file__ != stagerun.operator.__file__; "
        "assert hasattr(operator, 'itemgetter')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- issue 19 item 5: absurd sizes, non-ASCII digits, Kubernetes values (the corpus: tests/test_hostile_manifests.py)


@pytest.mark.parametrize("text", ["١٠٠", "١e-3", "１e3", "０.5", "𝟏", "1_0e-4", "3e-4\n", "٣"])
def test_parse_float_reads_only_ascii_digits(text):
    """Python's float() reads Arabic-Indic, full-width and mathematical digits (and '1_0'): a manifest must not."""
    assert float(text) is not None  # the trap: Python itself accepts every one of these
    with pytest.raises(QuantityError, match="ASCII digits"):
        parse_float(text)


@pytest.mark.parametrize("text", ["١٠٠", "１２８", "64K\u3000", "1e999999999", "1e-999999999"])
def test_parse_count_refuses_non_ascii_and_absurd_exponents_at_once(text):
    with pytest.raises(QuantityError):
        parse_count(text)


def test_parse_duration_refuses_non_ascii_digits():
    from stagerun.core.spec.quantities import parse_duration

    assert parse_duration("1h30m") == 5400
    for bad in ("٣٠m", "１h", "9" * 30 + "s"):
        with pytest.raises(QuantityError):
            parse_duration(bad)


@pytest.mark.parametrize(
    "mutation, path",
    [
        (lambda m: m["spec"]["model"].update(layers=10**9), "spec.model.layers"),
        (lambda m: m["spec"]["model"].update(vocabSize=10**10), "spec.model.vocabSize"),
        (lambda m: m["spec"]["phases"][0]["lr"].update(peak="1e300"), "spec.phases[0].lr.peak"),
        (lambda m: m["spec"]["phases"][0].update(tokens="1e18"), "spec.phases[0].tokens"),
        (lambda m: m["spec"]["resources"].update(nodes=10**6), "spec.resources.nodes"),
    ],
)
def test_absurd_sizes_are_refused_with_the_field_and_the_bound(mutation, path):
    manifest = base_manifest()
    mutation(manifest)
    problems = validate_manifest(manifest)
    assert [p.path for p in problems] == [path]
    assert "beyond any real run: at most" in problems[0].message


def test_every_size_bound_names_a_real_field_and_admits_the_presets():
    import dataclasses

    from stagerun.core.spec import model, presets, run
    from stagerun.core.spec.limits import BOUNDS

    classes = {c.__name__: c for module in (model, run) for c in vars(module).values() if dataclasses.is_dataclass(c)}
    for class_name, attribute in BOUNDS:
        assert attribute in {f.name for f in dataclasses.fields(classes[class_name])}, (class_name, attribute)
    for name, preset in presets.PRESETS.items():
        for attribute, value in {**presets.MODEL_DEFAULTS, **preset}.items():
            bound = BOUNDS.get(("ModelSpec", attribute))
            if bound is not None and isinstance(value, (int, float)):
                assert value <= bound.maximum, (name, attribute)


def test_kubernetes_value_rules():
    from stagerun.core.spec import k8s_values as k8s

    assert k8s.dns1123_label("run-1") is None and k8s.dns1123_label("run\n") and k8s.dns1123_label("a" * 64)
    assert k8s.object_name("ServiceAccount", "stagerun-trainer") is None and k8s.object_name("Secret", "My_Secret")
    assert k8s.qualified_name("kueue.x-k8s.io/queue-name") is None and k8s.qualified_name("/x")
    assert k8s.label_value("") is None and k8s.label_value("-x") and k8s.label_value("x" * 64)
    assert k8s.env_var_name("NCCL_DEBUG") is None and k8s.env_var_name("1X") and k8s.env_var_name("A B")
    assert k8s.resource_name("nvidia.com/gpu") is None and k8s.resource_name("gpu")
    assert [k8s.quantity(q, positive=True) is None for q in ("500m", "64Gi", "1e3", "lots", "-1", "0", "1\n")] == [
        True, True, True, False, False, False, False,
    ]  # fmt: skip
    good = ("ghcr.io/example/stagerun:0.1", "localhost:5000/a/b", "busybox", "x@sha256:" + "a" * 64)
    assert all(k8s.image_reference(i) is None for i in good)
    assert all(k8s.image_reference(i) for i in ("Ghcr.io/x/Y", "a b", "x:", ""))


@pytest.mark.parametrize(
    "path, refused",
    [
        ("/", True),
        ("/proc/sys", True),
        ("/etc", True),
        ("/usr/", True),
        ("/opt", True),
        ("/dev/shm", True),
        ("/var/lib/stagerun/x", True),
        ("/data/../sys", True),
        ("relative", True),
        ("/etc/ssl/certs/ca.pem", False),  # a single file inside /etc: common for CA bundles
        ("/tmp", False),
        ("/mnt/datasets", False),
        ("/var/lib/data", False),
    ],
)
def test_mount_paths_over_system_or_operator_paths_are_refused(path, refused):
    from stagerun.core.spec.pod_template import OPERATOR_MOUNT_PATHS, mount_path_problem

    assert (mount_path_problem(path, OPERATOR_MOUNT_PATHS) is not None) is refused
