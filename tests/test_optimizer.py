"""Optimizers: RMSProp with momentum and decoupled weight decay (AFM), per-phase optimizer settings that inherit
like other phase fields and change in-process at the phase boundary, and their checks; then the real trainer
(torchrun, two ranks, FSDP2) through every phase of the tiny run, killed and resumed bitwise."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import run_tiny, tiny_run, write_manifest

from stagerun.core.spec import SpecError, resolve_run
from stagerun.core.spec.run import OptimizerSpec, TrainingSpec
from stagerun.trainer.checkpoint import CheckpointManager
from stagerun.trainer.step import RMSpropMomentum, apply_phase_optimizer, build_optimizer
from stagerun.trainer.telemetry import read_metrics

RMSPROP = {"type": "rmspropMomentum", "beta2": 0.99, "momentum": 0.9, "eps": 1e-8, "weightDecay": 0.1}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_rmsprop_momentum_decays_decoupled_not_through_the_gradient():
    net = model()
    training = TrainingSpec(optimizer=OptimizerSpec(type="rmspropMomentum", beta2=0.99, momentum=0.9, eps=1e-8))
    optimizer = build_optimizer(net, training, torch.device("cpu"))
    assert isinstance(optimizer, RMSpropMomentum)
    decayed, plain = optimizer.param_groups
    assert decayed["decoupled_weight_decay"] == 0.1 and plain["decoupled_weight_decay"] == 0.0
    assert decayed["weight_decay"] == plain["weight_decay"] == 0.0  # torch's own (L2) term stays off
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    net(torch.randn(8, 4)).square().sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
    lr = 0.01
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    for name, p in net.named_parameters():
        g, p0 = grads[name], before[name]
        v = 0.01 * g * g  # (1 - alpha) g^2 from a zero average
        update = g / (v.sqrt() + 1e-8)  # the first momentum buffer is the scaled gradient itself
        wd = 0.1 if p.ndim >= 2 else 0.0
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd) - lr * update, rtol=1e-6, atol=1e-7, msg=name)
    # torch's RMSprop weight_decay would be L2: added to the gradient, then divided by sqrt(v): another update.
    coupled = model()
    l2 = torch.optim.RMSprop(coupled[0].parameters(), lr=lr, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9)
    coupled(torch.randn(8, 4)).square().sum().backward()  # a different batch: only the decay's form matters here
    coupled[0].weight.grad = grads["0.weight"].clone()
    coupled[0].bias.grad = grads["0.bias"].clone()
    l2.step()
    assert not torch.allclose(coupled[0].weight, net[0].weight, rtol=1e-4)


def test_phase_settings_inherit_and_first_phase_takes_spec_training():
    doc = tiny_run(training={"optimizer": dict(RMSPROP), "gradClip": 0.8})
    doc["spec"]["phases"][1]["optimizer"] = {"weightDecay": 0.01, "gradClip": 0.5}
    run = resolve_run(doc)
    core, long, anneal = (p.optimizer for p in run.phases)
    assert (core.type, core.weight_decay, core.beta2, core.momentum, core.grad_clip) == (
        "rmspropMomentum",
        0.1,
        0.99,
        0.9,
        0.8,
    )
    assert (long.weight_decay, long.grad_clip, long.beta2, long.momentum) == (0.01, 0.5, 0.99, 0.9)
    assert anneal == long  # unset: the previous phase's
    from stagerun.core.plan_report import training_lines

    lines = training_lines(run)
    assert "foreach RMSProp with momentum and decoupled weight decay" in lines[0]
    assert lines[1:] == [
        "optimizer from core: weight decay 0.1, alpha 0.99, momentum 0.9, eps 1e-08, clip 0.8",
        "optimizer from long: weight decay 0.01, alpha 0.99, momentum 0.9, eps 1e-08, clip 0.5",
    ]


def problems(doc: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        resolve_run(doc)
    return [str(p) for p in caught.value.problems]


def test_settings_of_the_other_optimizer_type_are_refused_by_field():
    beta1 = problems(tiny_run(training={"optimizer": {"type": "rmspropMomentum", "beta1": 0.8}}))
    assert beta1[0].startswith("spec.training.optimizer.beta1: only applies to optimizer type adamw")
    assert "set momentum instead" in beta1[0]
    fused = problems(tiny_run(training={"optimizer": {"type": "rmspropMomentum", "implementation": "fused"}}))
    assert fused[0].startswith("spec.training.optimizer.implementation: fused applies to AdamW only")
    doc = tiny_run()
    doc["spec"]["phases"][2]["optimizer"] = {"momentum": 0.5}
    (message,) = problems(doc)
    assert message.startswith("spec.phases[2].optimizer.momentum: only applies to optimizer type rmspropMomentum")
    zero = tiny_run(training={"optimizer": {"type": "rmspropMomentum", "momentum": 0}})
    assert "spec.training.optimizer.momentum" in problems(zero)[0]


@pytest.mark.parametrize("kind", ["adamw", "rmspropMomentum"])
def test_apply_phase_optimizer_sets_every_group_but_keeps_norms_undecayed(kind):
    doc = tiny_run(training={"optimizer": {"type": kind}})
    doc["spec"]["phases"][1]["optimizer"] = {"weightDecay": 0.02, "beta2": 0.9, "eps": 1e-6}
    run = resolve_run(doc)
    optimizer = build_optimizer(model(), run.training, torch.device("cpu"))
    apply_phase_optimizer(optimizer, run.phases[1].optimizer)
    decayed, plain = optimizer.param_groups
    key = "weight_decay" if kind == "adamw" else "decoupled_weight_decay"
    assert (decayed[key], plain[key], decayed["eps"], plain["eps"]) == (0.02, 0.0, 1e-6, 1e-6)
    if kind == "adamw":
        assert decayed["betas"] == plain["betas"] == (0.9, 0.9)
    else:
        assert decayed["alpha"] == 0.9 and decayed["momentum"] == 0.9 and decayed["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- the real trainer


def final_tensors(checkpoint_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every full (unsharded) model and optimizer tensor of the newest committed checkpoint, by flat key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = CheckpointManager(str(checkpoint_dir), keep=100).latest()
    out = tmp_path / f"weights-{latest.step}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(latest.path, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(tree, prefix: str) -> None:
        if isinstance(tree, torch.Tensor):
            flat[prefix] = tree
        elif isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))

    walk(torch.load(out, weights_only=False), "")
    return flat


RECORDER = """
import json, os
from stagerun.trainer.trainer import Callback

KEYS = ("decoupled_weight_decay", "weight_decay", "alpha", "momentum", "eps")

class Groups(Callback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step(self, record):
        if self.trainer.topo.is_main:
            groups = [{k: g[k] for k in KEYS} for g in self.trainer.optimizer.param_groups]
            with open(os.environ["GROUPS_FILE"], "a") as out:
                out.write(json.dumps({"step": record.step, "phase": record.phase, "groups": groups}) + "\\n")

def install(trainer):
    return [Groups(trainer)]
"""


def test_rmsprop_run_changes_weight_decay_at_the_boundary_and_resumes_bitwise(run_dir, tmp_path):
    (tmp_path / "groups_recorder.py").write_text(textwrap.dedent(RECORDER))
    doc = tiny_run(training={"docMasking": True, "optimizer": dict(RMSPROP)})
    doc["spec"]["phases"][1]["optimizer"] = {"weightDecay": 0.01, "gradClip": 0.5}
    doc["spec"]["phases"][2]["optimizer"] = {"momentum": 0.5}
    manifest = write_manifest(tmp_path / "rmsprop.yaml", doc)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)

    def env(name: str, **fault) -> dict:
        out = faults.env({"PYTHONPATH": path, "GROUPS_FILE": str(tmp_path / f"{name}.jsonl")}, **fault)
        out["STAGERUN_CALLBACKS"] += ",groups_recorder:install"  # after the faults' own
        return out

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    for link in ("tokenizer.json", "data"):
        (straight_dir / link).symlink_to(os.readlink(run_dir / link))
    straight = run_tiny(manifest, straight_dir, env=env("straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    seen = [json.loads(line) for line in (tmp_path / "straight.jsonl").read_text().splitlines()]
    by_phase = {}
    for record in seen:
        decayed, plain = record["groups"]
        by_phase.setdefault(record["phase"], set()).add(
            (decayed["decoupled_weight_decay"], plain["decoupled_weight_decay"], decayed["momentum"])
        )
        assert decayed["weight_decay"] == plain["weight_decay"] == 0.0 and decayed["alpha"] == 0.99
    # Steps 1-16 core, 17-20 long, 21-22 anneal: the groups change at the first step of each phase, in-process.
    assert [r["step"] for r in seen] == list(range(1, 23))
    assert by_phase == {"core": {(0.1, 0.0, 0.9)}, "long": {(0.01, 0.0, 0.9)}, "anneal": {(0.01, 0.0, 0.5)}}
    metrics = read_metrics(straight_dir / "metrics.jsonl")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert all(m["gradNorm"] > 0 for m in metrics)

    killed = run_tiny(manifest, run_dir, env=env("killed", kill_after_step=13))
    assert killed.returncode != 0 and "resume from step 12" in killed.stdout, killed.stdout[-4000:]
    resumed = run_tiny(manifest, run_dir, env=env("resumed"))
    assert resumed.returncode == 0 and "step 12" in resumed.stdout, resumed.stdout[-4000:]
    again = read_metrics(run_dir / "metrics.jsonl")
    for key in ("loss", "gradNorm", "lr", "batchChecksum"):
        assert [m[key] for m in again] == [m[key] for m in metrics], key
    ours = final_tensors(run_dir / "checkpoints", tmp_path)
    theirs = final_tensors(straight_dir / "checkpoints", tmp_path)
    assert ours.keys() == theirs.keys() and any("momentum_buffer" in key for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
