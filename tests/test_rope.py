"""RoPE per phase (issue 16): the base and a scaling rule (linear, llama3, yarn) per phase, inheriting like other
phase fields; the frequency tables against transformers' own functions; the checks naming their fields; the plan;
and the real trainer changing the tables in-process at a phase boundary, killed and resumed bitwise in that phase,
its export stating the phase's RoPE."""

from __future__ import annotations

import hashlib
import json
import math
import os
import textwrap
from pathlib import Path

import faults
import pytest
import torch
from conftest import run_tiny, stagerun, tiny_run, write_manifest

from stagerun.core.plan_report import training_lines
from stagerun.core.spec import SpecError, resolve_run
from stagerun.core.spec.changes import immutable_changes
from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.core.spec.rope import ResolvedRope, RopeScaling, yarn_attention_factor
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.model.positions import rope_cos_sin, rope_frequencies
from stagerun.trainer.telemetry import read_metrics

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

LLAMA31 = {"type": "llama3", "factor": 8, "lowFreqFactor": 1, "highFreqFactor": 4, "originalMaxPosition": 8192}


def problems(doc: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        resolve_run(doc)
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------------------ tables against transformers


def hf_config(head_dim: int, rotary_fraction: float, parameters: dict):
    return transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=4096,
        rope_parameters={**parameters, "partial_rotary_factor": rotary_fraction},
    )


CASES = {
    "default": (500000.0, RopeScaling(), {"rope_type": "default"}),
    "linear": (10000.0, RopeScaling("linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}),
    # Llama 3.1's own numbers, and a tiny original window where every band (kept, blended, divided) is populated.
    "llama3.1": (
        500000.0,
        RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3-small": (
        10000.0,
        RopeScaling("llama3", 4.0, 2.0, 8.0, 32),
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "yarn": (
        10000.0,
        RopeScaling("yarn", 4.0, original_max_position=64, attention_factor=yarn_attention_factor(4.0)),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "yarn-untruncated-betas": (
        1e6,
        RopeScaling(
            "yarn", 16.0, original_max_position=512, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3, truncate=False
        ),
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.3,
            "truncate": False,
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_dim, fraction", [(64, 1.0), (128, 1.0), (64, 0.25)])
def test_inverse_frequencies_are_transformers_exactly(case, head_dim, fraction):
    theta, scaling, parameters = CASES[case]
    config = hf_config(head_dim, fraction, {**parameters, "rope_theta": theta})
    rope_type = parameters["rope_type"]
    if rope_type == "default":  # StableLM's: Llama's default RoPE ignores partial_rotary_factor
        from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

        stablelm = transformers.StableLmConfig(
            hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=dict(config.rope_parameters)
        )
        theirs, attention = StableLmRotaryEmbedding.compute_default_rope_parameters(stablelm)
    else:
        theirs, attention = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    ours, scale = rope_frequencies(int(head_dim * fraction), ResolvedRope(theta, scaling))
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs.float())
    assert scale == pytest.approx(attention, rel=1e-12)
    if rope_type != "default":  # scaling changes some frequencies (never all of them for llama3 / yarn)
        plain, _ = rope_frequencies(int(head_dim * fraction), theta)
        assert not torch.equal(ours, plain)


def test_cos_sin_tables_match_transformers_rotary_embedding_with_yarns_attention_factor():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta, scaling, parameters = CASES["yarn"]
    config = hf_config(64, 1.0, {**parameters, "rope_theta": theta})
    x = torch.zeros(1, 200, 64)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(x, torch.arange(200)[None])
    cos, sin = rope_cos_sin(200, 64, ResolvedRope(theta, scaling), torch.device("cpu"), torch.float32)
    assert torch.allclose(cos, cos_hf[0], atol=1e-6, rtol=0) and torch.allclose(sin, sin_hf[0], atol=1e-6, rtol=0)
    assert cos.abs().max().item() == pytest.approx(yarn_attention_factor(4.0), rel=1e-6)  # cos(0) x the factor


# ---------------------------------------------------------------------------------------- spec: inheritance


def test_phase_rope_inherits_field_by_field_and_scaling_replaces_whole():
    doc = tiny_run(model={"preset": "tiny", "ropeTheta": 500000})
    doc["spec"]["phases"][1]["rope"] = {"theta": 6315089, "scaling": dict(LLAMA31)}
    doc["spec"]["phases"][2]["rope"] = {"scaling": {"type": "none"}}
    core, long, anneal = (p.rope for p in resolve_run(doc).phases)
    assert core == ResolvedRope(500000.0)
    assert long == ResolvedRope(6315089.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    assert anneal == ResolvedRope(6315089.0)  # the base inherited, the scaling removed

    doc["spec"]["phases"][2]["rope"] = {"theta": 1e6}  # scaling inherited
    assert resolve_run(doc).phases[2].rope == ResolvedRope(1e6, long.scaling)

    # The model-level scaling is the first phase's (a Llama 3.1 import), and later phases inherit it.
    doc = tiny_run(model={"preset": "tiny", "ropeScaling": {"type": "yarn", "factor": 4, "originalMaxPosition": 64}})
    ropes = [p.rope for p in resolve_run(doc).phases]
    assert (
        ropes[0]
        == ropes[2]
        == ResolvedRope(
            10000.0, RopeScaling("yarn", 4.0, original_max_position=64, attention_factor=yarn_attention_factor(4.0))
        )
    )


@pytest.mark.parametrize(
    "where, rope, expected",
    [
        (
            1,
            {"scaling": {"type": "llama3", "originalMaxPosition": 64}},
            "spec.phases[1].rope.scaling.factor: required with type llama3",
        ),
        (
            1,
            {"scaling": {"type": "llama3", "factor": 8}},
            "spec.phases[1].rope.scaling.originalMaxPosition: required with type llama3",
        ),
        (
            1,
            {"scaling": {"type": "linear", "factor": 2, "betaFast": 8}},
            "spec.phases[1].rope.scaling.betaFast: only applies to type yarn",
        ),
        (2, {"scaling": {"type": "none", "factor": 2}}, "spec.phases[2].rope.scaling.factor: has no meaning with"),
        (1, {"scaling": {**LLAMA31, "lowFreqFactor": 4}}, "spec.phases[1].rope.scaling.highFreqFactor: 4 is not above"),
        (
            1,
            {"scaling": {"type": "yarn", "factor": 4, "originalMaxPosition": 64, "betaFast": 1}},
            "spec.phases[1].rope.scaling.betaFast: 1 is not above betaSlow 1",
        ),
        (1, {"scaling": {"type": "linear", "factor": 0.5}}, "spec.phases[1].rope.scaling.factor"),
        (1, {"theta": 0}, "spec.phases[1].rope.theta"),
        (1, {"scaling": {"type": "ntk", "factor": 2}}, "spec.phases[1].rope.scaling.type"),
    ],
)
def test_rope_problems_name_the_field(where, rope, expected):
    doc = tiny_run()
    doc["spec"]["phases"][where]["rope"] = rope
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_model_level_scaling_is_checked_and_alibi_refuses_rope():
    doc = tiny_run(model={"preset": "tiny", "ropeScaling": {"type": "linear"}})
    assert problems(doc)[0].startswith("spec.model.ropeScaling.factor: required with type linear")
    doc = tiny_run(model={"preset": "tiny", "position": "alibi", "ropeScaling": {"type": "linear", "factor": 2}})
    assert problems(doc)[0].startswith("spec.model.ropeScaling: scales RoPE, but the model uses ALiBi")
    doc = tiny_run(model={"preset": "tiny", "position": "alibi"})
    doc["spec"]["phases"][1]["rope"] = {"theta": 1e6}
    assert problems(doc) == [
        "spec.phases[1].rope: sets RoPE, but the model uses ALiBi (spec.model.position: alibi), which has no rotary "
        "base (fix: drop rope, or use position: rope)"
    ]
    doc["spec"]["phases"][1].pop("rope")
    assert all(p.rope is None for p in resolve_run(doc).phases)  # ALiBi: no tables at all


def test_a_future_phases_rope_is_an_allowed_edit_but_not_the_current_ones():
    doc = tiny_run()
    accepted = resolve_run(doc)
    edited = tiny_run()
    edited["spec"]["phases"][2]["rope"] = {"theta": 40000}
    assert immutable_changes(accepted, resolve_run(edited), current_phase=1) == []
    assert immutable_changes(accepted, resolve_run(edited), current_phase=2) == ["spec.phases[2] (anneal)"]


def test_plan_states_the_rope_of_each_phase_that_changes_it(tmp_path):
    doc = tiny_run(model={"preset": "tiny", "ropeTheta": 500000})
    doc["spec"]["phases"][1]["rope"] = {"theta": 6315089, "scaling": dict(LLAMA31)}
    lines = training_lines(resolve_run(doc))
    assert "RoPE from core: base 500000" in lines
    assert "RoPE from long: base 6315089, llama3 x8 (low 1, high 4, original 8192)" in lines
    assert not any("anneal" in line for line in lines if line.startswith("RoPE"))  # inherits: no new line
    assert not any(line.startswith("RoPE") for line in training_lines(resolve_run(tiny_run())))  # one RoPE: quiet
    out = stagerun("plan", str(write_manifest(tmp_path / "rope.yaml", doc)))
    assert out.returncode == 0 and "RoPE from long: base 6315089, llama3 x8" in out.stdout, out.stdout


# ----------------------------------------------------------------------------------------- the model's tables


def test_set_rope_changes_the_tables_forward_uses():
    spec = resolve_model(ModelSpec(preset="tiny"))
    model = Transformer(spec)
    init_weights(model, 0)
    x = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    model.layers[0].attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["rotary"][0]), with_kwargs=True
    )
    with torch.no_grad():
        before = model(x)
        scaled = ResolvedRope(10000.0, RopeScaling("llama3", 4.0, 1.0, 4.0, 32))
        assert model.set_rope(scaled) and not model.set_rope(scaled)  # a second call changes nothing
        after = model(x)
        assert model.set_rope(ResolvedRope(10000.0))
        again = model(x)
    assert not torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    assert torch.equal(seen[1], rope_cos_sin(96, spec.rotary_dims, scaled, x.device, torch.float32)[0])
    assert not torch.allclose(before, after) and torch.equal(before, again)


# ------------------------------------------------------------------------------------------ the real trainer

RECORDER = """
import hashlib, json, os
from stagerun.trainer.trainer import Callback

class Tables(Callback):
    '''Each step's cos table as the first attention layer received it, and the model's RoPE.'''

    def __init__(self, trainer):
        self.trainer, self.cos = trainer, None
        attention = trainer.model.layers[0].attention
        attention.register_forward_pre_hook(self.capture, with_kwargs=True)

    def capture(self, module, args, kwargs):
        self.cos = kwargs["rotary"][0]

    def on_step(self, record):
        if self.trainer.topo.is_main:
            digest = hashlib.sha256(self.cos.detach().float().contiguous().numpy().tobytes()).hexdigest()
            line = {"step": record.step, "phase": record.phase, "cos": digest, "theta": self.trainer.model.rope.theta,
                    "pid": os.getpid()}
            with open(os.environ["TABLES_FILE"], "a") as out:
                out.write(json.dumps(line) + "\\n")

def install(trainer):
    return [Tables(trainer)]
"""


def test_rope_changes_in_process_at_the_boundary_resumes_bitwise_and_exports(run_dir, tmp_path):
    from test_optimizer import final_tensors

    from stagerun.trainer.hf.export import export_checkpoint

    (tmp_path / "tables_recorder.py").write_text(textwrap.dedent(RECORDER))
    doc = tiny_run()
    doc["spec"]["phases"][1]["rope"] = {
        "theta": 40000,
        "scaling": {"type": "llama3", "factor": 4, "lowFreqFactor": 1, "highFreqFactor": 4, "originalMaxPosition": 64},
    }
    manifest = write_manifest(tmp_path / "rope.yaml", doc)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)

    def env(name: str, **fault) -> dict:
        out = faults.env({"PYTHONPATH": path, "TABLES_FILE": str(tmp_path / f"{name}.jsonl")}, **fault)
        out["STAGERUN_CALLBACKS"] += ",tables_recorder:install"
        return out

    def seen(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    for link in ("tokenizer.json", "data"):
        (straight_dir / link).symlink_to(os.readlink(run_dir / link))
    straight = run_tiny(manifest, straight_dir, env=env("straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    records = seen("straight")
    # Steps 1-16 core (seqLen 64), 17-20 long, 21-22 anneal (seqLen 128): one process throughout, no relaunch.
    assert [r["step"] for r in records] == list(range(1, 23)) and len({r["pid"] for r in records}) == 1
    assert "relaunch" not in straight.stdout.lower()
    by_phase: dict[str, set] = {}
    for r in records:
        by_phase.setdefault(r["phase"], set()).add((r["theta"], r["cos"]))
    assert by_phase["core"] == {(10000.0, records[0]["cos"])}
    assert len(by_phase["long"]) == 1 and by_phase["long"] == by_phase["anneal"]  # anneal inherits long's RoPE
    ((long_theta, long_cos),) = by_phase["long"]
    assert long_theta == 40000.0 and long_cos != records[0]["cos"]

    # The 128-long table is the scaled one: not the unscaled 40000 (nor 10000) table of that length.
    def digest(rope: ResolvedRope) -> str:
        cos = rope_cos_sin(128, 16, rope, torch.device("cpu"), torch.float32)[0]
        return hashlib.sha256(cos.numpy().tobytes()).hexdigest()

    assert long_cos == digest(ResolvedRope(40000.0, RopeScaling("llama3", 4.0, 1.0, 4.0, 64)))
    assert long_cos not in (digest(ResolvedRope(40000.0)), digest(ResolvedRope(10000.0)))
    metrics = read_metrics(straight_dir / "metrics.jsonl")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5

    # Killed after step 19 (inside long), resumed from step 18's checkpoint: the new process rebuilds long's tables.
    killed = run_tiny(manifest, run_dir, env=env("killed", kill_after_step=19))
    assert killed.returncode != 0 and "resume from step 18" in killed.stdout, killed.stdout[-4000:]
    resumed = run_tiny(manifest, run_dir, env=env("resumed"))
    assert resumed.returncode == 0 and "step 18" in resumed.stdout, resumed.stdout[-4000:]
    after = seen("resumed")
    assert [r["step"] for r in after] == [19, 20, 21, 22] and {r["cos"] for r in after} == {long_cos}
    again = read_metrics(run_dir / "metrics.jsonl")
    for key in ("loss", "gradNorm", "lr", "batchChecksum"):
        assert [m[key] for m in again] == [m[key] for m in metrics], key
    ours, theirs = (
        final_tensors(run_dir / "checkpoints", tmp_path),
        final_tensors(straight_dir / "checkpoints", tmp_path),
    )
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # The export states the RoPE of the checkpoint's phase (anneal inherits long's), not the model's first one.
    export_checkpoint(str(run_dir), tmp_path / "hf", require_tokenizer=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 40000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 40000.0
    assert math.isclose(config["rope_scaling"]["factor"], 4.0)


def test_docs_describe_rope_per_phase():
    root = Path(__file__).resolve().parents[1]
    manifest = (root / "docs" / "manifest.md").read_text()
    assert "RoPE per phase" in manifest and "rope:" in manifest
    assert "llama3" in (root / "docs" / "huggingface.md").read_text()
