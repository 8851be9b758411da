"""Per-phase evaluation (trainer/evaluation.py): held-out loss and needle in a haystack, checked against direct
computations and constructed models, then in a real two-process run that logs them at phase ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_tiny, tiny_run, write_manifest
from prometheus_client import generate_latest

from stagerun.core.spec import SpecError, resolve_run
from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.run import NeedleEvalSpec
from stagerun.trainer.evaluation import (
    MARKER_TOKENS,
    EvalResult,
    held_out_loss,
    model_predictor,
    needle_accuracy,
    needle_set,
)
from stagerun.trainer.losses import IGNORE_INDEX
from stagerun.trainer.metrics import TrainerMetrics
from stagerun.trainer.model import Transformer, init_weights

VOCAB = 512


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(resolve_model(ModelSpec(preset="tiny")))
    init_weights(model, 0)
    return model


def induction_oracle(inputs: torch.Tensor, k: int) -> torch.Tensor:
    """A model that copies: at each of the last k positions, the token that followed the earliest earlier
    occurrence of the current token (what an induction head does); exact when marker, key and filler are disjoint."""
    out = torch.full((inputs.shape[0], k), -1, dtype=torch.long)
    for b, row in enumerate(inputs.tolist()):
        for j, t in enumerate(range(len(row) - k, len(row))):
            earlier = [i for i in range(t) if row[i] == row[t]]
            out[b, j] = row[earlier[0] + 1] if earlier else -1
    return out


def test_haystacks_hide_the_passkey_at_spread_depths_and_ask_for_it_at_the_end():
    spec = NeedleEvalSpec(samples=5, key_tokens=4, seed=3)
    needles = needle_set(VOCAB, 128, spec)
    assert needles.inputs.shape == needles.targets.shape == (5, 128)
    assert needles.depths.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    again = needle_set(VOCAB, 128, spec)
    assert np.array_equal(needles.inputs, again.inputs)  # deterministic: every rank builds the same haystacks
    for inputs, targets in zip(needles.inputs, needles.targets):
        answer = targets[-4:]
        assert (targets[:-4] == IGNORE_INDEX).all() and len(set(answer.tolist())) == 4
        marker = inputs[-(MARKER_TOKENS + 3) : -3]  # inputs end with the marker and the key's first 3 tokens
        starts = [i for i in range(len(inputs) - 2 * MARKER_TOKENS) if (inputs[i : i + MARKER_TOKENS] == marker).all()]
        assert len(starts) == 1  # the marker occurs once in the haystack, then at the end
        needle_at = starts[0] + MARKER_TOKENS
        assert inputs[needle_at : needle_at + 4].tolist() == answer.tolist()
    early, late = (int(np.nonzero(needles.inputs[i] == needles.targets[i, -4])[0][0]) for i in (0, 4))
    assert early < 10 < 100 < late  # depth 0 near the start, depth 1 next to the query


def test_needle_accuracy_is_one_for_an_oracle_and_chance_for_a_random_model(tiny_model):
    needles = needle_set(VOCAB, 96, NeedleEvalSpec(samples=12))
    assert needle_accuracy(induction_oracle, needles, micro_batch=4) == 1.0
    # Chance: a passkey of 5 ids out of 128 candidates, all right by luck with probability ~ 128^-5.
    assert needle_accuracy(model_predictor(tiny_model), needles, micro_batch=4) == 0.0
    wrong_by_one = lambda inputs, k: induction_oracle(inputs, k).roll(1, dims=1)  # noqa: E731
    assert needle_accuracy(wrong_by_one, needles) == 0.0


def test_the_predictor_is_the_argmax_of_the_full_logits(tiny_model):
    needles = needle_set(VOCAB, 64, NeedleEvalSpec(samples=3, key_tokens=6))
    inputs = torch.from_numpy(needles.inputs)
    with torch.no_grad():
        logits = tiny_model(inputs)  # [B, T, V]: the unfused path
        predicted = model_predictor(tiny_model)(inputs, 6)
    assert torch.equal(predicted, logits[:, -6:].argmax(dim=-1))


def test_held_out_loss_equals_cross_entropy_on_the_same_windows(tiny_model):
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=1000)
    with torch.no_grad():
        loss, count = held_out_loss(tiny_model, tokens, 64, micro_batch=4, chunk=100)
        windows = (len(tokens) - 1) // 64  # 15 windows; the last micro-batch is padded with ignored rows
        used = torch.from_numpy(tokens[: windows * 64 + 1])
        logits = tiny_model(used[:-1].reshape(windows, 64))
        direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), used[1:])
    assert count == windows * 64
    assert loss == pytest.approx(direct.item(), rel=1e-5)


def test_eval_gauges_carry_the_phase_they_ran_in():
    metrics = TrainerMetrics("r", "ns", 0, peak_flops_per_device=None, world_size=1)
    assert b"stagerun_eval" not in generate_latest(metrics.registry)  # absent until an evaluation ran
    metrics.evaluation(EvalResult(5, 640, "long", 1, 128, True, 0.1, "code", 4.25, 512, 0.5, 4))
    text = generate_latest(metrics.registry).decode()
    assert 'stagerun_eval_held_out_loss{namespace="ns",phase="long",rank="0",run="r"} 4.25' in text
    assert 'stagerun_eval_needle_accuracy{namespace="ns",phase="long",rank="0",run="r"} 0.5' in text


WORKER = Path(__file__).with_name("_eval_worker.py")


@pytest.mark.parametrize("cp,dp,tp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["cp2", "fsdp2", "tp2"])
def test_sharded_evaluation_equals_the_single_process_one(tmp_path, cp, dp, tp):
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp * dp * tp}",
        "--monitor-interval=0.1", str(WORKER), str(out), "--cp", str(cp), "--dp", str(dp), "--tp", str(tp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    (loss, want_loss), (count, want_count) = results["loss"], results["count"]
    assert count == want_count == 7 * 64
    assert loss == pytest.approx(want_loss, rel=1e-5)  # float32; only the order of the reductions differs
    assert results["reference_accuracy"] == 1.0  # by construction: the answers are its own greedy predictions
    assert results["accuracy"] == 1.0 and results["spoiled_accuracy"] == 0.0


def eval_manifest(**eval_block) -> dict:
    manifest = tiny_run(
        data={"sources": {"docs": {"path": "builtin:python-docs", "weight": 1.0},
                          "code": {"path": "builtin:python-code", "weight": 0.0}}},
        phases=[
            {"name": "core", "tokens": "4Ki", "seqLen": 64, "microBatchSize": 4, "batch": {"size": "1Ki"},
             "lr": {"schedule": "constant", "peak": 3e-3}, "eval": eval_block},
            {"name": "long", "tokens": "2Ki", "seqLen": 128, "microBatchSize": 2},
        ],
    )  # fmt: skip
    return manifest


def test_a_held_out_source_that_is_trained_on_is_refused():
    manifest = eval_manifest(heldOut={"source": "docs"})
    with pytest.raises(SpecError) as error:
        resolve_run(manifest)
    assert "spec.phases[0].eval.heldOut.source" in str(error.value) and "weight: 0" in str(error.value)
    manifest = eval_manifest(heldOut={"source": "nope"})
    with pytest.raises(SpecError, match="names no source"):
        resolve_run(manifest)
    with pytest.raises(SpecError, match="leaves no haystack in seqLen 64"):
        resolve_run(eval_manifest(needle={"keyTokens": 30}))
    run = resolve_run(eval_manifest(heldOut={"source": "code"}, needle={"samples": 2}))
    assert run.phases[1].eval == run.phases[0].eval  # inherited like the other phase fields


def test_two_processes_log_evaluations_at_phase_ends_and_every_tokens(run_dir, tmp_path):
    manifest = eval_manifest(heldOut={"source": "code", "tokens": "2Ki"}, needle={"samples": 4}, everyTokens="2Ki")
    result = run_tiny(write_manifest(tmp_path / "eval.yaml", manifest), run_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["tokens"], e["atPhaseEnd"]) for e in lines] == [
        ("core", 2048, False),
        ("core", 4096, True),
        ("long", 6144, True),
    ]
    for entry in lines:
        assert entry["heldOutSource"] == "code" and entry["needleSamples"] == 4
        assert 0.0 <= entry["needleAccuracy"] <= 1.0
        assert 0.0 < entry["heldOutLoss"] < 2 * np.log(VOCAB)
    assert lines[0]["heldOutTokens"] == 2048 and lines[2]["seqLen"] == 128
    assert lines[1]["heldOutLoss"] < np.log(VOCAB)  # trained on docs, the held-out code already beats uniform


def test_an_evaluation_reaches_progress_and_metrics_of_the_exporter():
    import urllib.request

    from stagerun.core.protocol import Progress
    from stagerun.trainer.evaluation import Evaluation
    from stagerun.trainer.exporter import Exporter

    run = resolve_run(eval_manifest(needle={"samples": 2}))
    exporter = Exporter(run, 0, 0, 1, "cpu", 0, training=True, progress=True)
    try:
        Evaluation("unused", exporter)._publish(EvalResult(4, 4096, "core", 0, 64, True, 0.2, needle_accuracy=1.0))
        base = f"http://127.0.0.1:{exporter.server.port}"
        progress = Progress.from_json(urllib.request.urlopen(base + Progress.PATH, timeout=10).read())
        assert progress.evaluation == {
            "step": 4, "tokens": 4096, "phase": "core", "phaseIndex": 0, "seqLen": 64, "atPhaseEnd": True,
            "seconds": 0.2, "needleAccuracy": 1.0,
        }  # fmt: skip
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'stagerun_eval_needle_accuracy{namespace="",phase="core",rank="0",run="tiny"} 1.0' in metrics
    finally:
        exporter.close()
