"""The memory estimate of each phase (core/memory_estimate.py): its arithmetic, `stagerun plan` and `validate`,
and the estimate against the measured peak of real CPU steps (benchmarks/memory_estimate.py's counter)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, stagerun, write_manifest

from stagerun.core.memory_estimate import activation_values_per_token, estimate_phase_memory, memory_warnings
from stagerun.core.spec import resolve_run
from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model

sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_estimate import MODES, Measurement  # noqa: E402

# The estimate models the peak; what it may not model (allocator rounding, small temporaries, RoPE tables) moves
# the measured peak within this factor of it. Measured on CPU (benchmarks/RESULTS.md): 0.95 to 1.04.
LOW, HIGH = 0.8, 1.25

GPU_RUN = {
    "apiVersion": "stagerun.io/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "mem"},
    "spec": {
        "model": {"preset": "llama3-8b"},
        "tokenizer": {"path": "tok.json"},
        "data": {"sources": {"web": {"path": "/data/web", "weight": 1}}},
        "phases": [
            {"name": "core", "tokens": "1B", "seqLen": 8192, "batch": {"size": "4Mi"}, "lr": {"peak": 3e-4}},
            {"name": "long", "tokens": "1B", "seqLen": 131072},
        ],
        "resources": {"nodes": 2, "gpusPerNode": 8},
    },
}


def gpu_run(**changes):
    manifest = copy.deepcopy(GPU_RUN)
    for key, value in changes.items():
        manifest["spec"][key] = value
    return resolve_run(manifest)


def measured_in_a_fresh_process(mode: str) -> Measurement:
    """measure() runs the product's step path on a one-rank gloo group: in its own interpreter, because a process
    group (and its threads) left in the pytest process is inherited by the forked workers of later tests, which then
    fail ("trying to initialize the default process group twice") or hang."""
    code = (
        "import dataclasses, json, sys; sys.path.insert(0, sys.argv[1]); "
        "from memory_estimate import TINY, measure; "
        "print(json.dumps(dataclasses.asdict(measure(TINY, sys.argv[2]))))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks"), mode], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("mode", MODES)
def test_the_estimate_is_within_a_stated_factor_of_the_measured_peak(mode):
    measured = measured_in_a_fresh_process(mode)
    assert LOW <= measured.ratio <= HIGH, measured


def test_activations_per_token_are_what_autograd_saves_in_an_eager_block():
    spec = resolve_model(ModelSpec(preset="tiny", dim=96, heads=4, kv_heads=2, ffn_hidden=160))
    from stagerun.trainer.model import Transformer

    block = Transformer(spec).layers[0]
    tokens = 32
    x = torch.randn(1, tokens, 96, requires_grad=True)
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):  # activations: what descends from x (not the weights or their views, not the RoPE tables)
        if t.requires_grad and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    per_token = sum(saved.values()) / 4 / tokens
    expected = activation_values_per_token(spec, "none", compiled=False)
    assert expected <= per_token <= expected * 1.01  # + RMSNorm's rstd per token


def test_sharding_checkpointing_precision_and_context_parallel_move_the_parts():
    run = gpu_run()
    core, long = (estimate_phase_memory(run, p) for p in run.phases)
    assert long.activations == 16 * core.activations  # 16x the tokens per micro-batch, same everything else
    one = gpu_run(resources={"gpusPerNode": 1})  # no FSDP: every part whole on the one GPU
    alone = estimate_phase_memory(one, one.phases[0])
    params = one.model.parameter_count()
    assert (alone.parameters, alone.gradients, alone.optimizer) == (4 * params, 4 * params, 8 * params)
    wider = gpu_run(resources={"nodes": 4, "gpusPerNode": 8})
    assert estimate_phase_memory(wider, wider.phases[0]).optimizer * 2 == core.optimizer  # FSDP over 2x the ranks
    cp = gpu_run(parallelism={"contextParallel": 4})
    assert estimate_phase_memory(cp, cp.phases[1]).activations * 4 == long.activations
    fp32 = gpu_run(training={"precision": "fp32"})
    assert estimate_phase_memory(fp32, fp32.phases[0]).activations == 2 * core.activations
    totals = {
        mode: estimate_phase_memory(r, r.phases[1]).total
        for mode, r in ((m, gpu_run(training={"activationCheckpointing": m})) for m in MODES)
    }
    assert totals["full"] < totals["selective"] < totals["none"]
    # The chunked loss: its memory does not grow with the sequence past one chunk (bar per-token statistics).
    assert long.loss - core.loss < 0.2 * core.loss


def test_validate_warns_but_accepts_a_phase_over_the_gpu_memory_and_plan_prints_the_estimate(tmp_path):
    assert memory_warnings(gpu_run()) == []  # GPU memory unknown: nothing to compare with
    warned = gpu_run(resources={"nodes": 2, "gpusPerNode": 8, "gpuMemory": "80Gi"})
    warnings = memory_warnings(warned)
    assert len(warnings) == 1 and warnings[0].startswith("phase long:")
    assert "spec.resources.gpuMemory 80Gi" in warnings[0] and "activationCheckpointing" in warnings[0]
    manifest = copy.deepcopy(GPU_RUN)
    manifest["spec"]["resources"]["gpuMemory"] = "80Gi"
    path = write_manifest(tmp_path / "mem.yaml", manifest)
    result = stagerun("validate", str(path))
    assert result.returncode == 0 and "valid TrainingRun" in result.stdout
    assert "warning: phase long: estimated" in result.stdout
    plan = stagerun("plan", str(path))
    assert plan.returncode == 0, plan.stdout
    assert "peak per rank" in plan.stdout and "of gpuMemory" in plan.stdout
