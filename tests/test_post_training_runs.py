"""Post-training end to end through `stagerun run` (issue 18): pretrain -> sft -> dpo in one manifest, the same as
runs chained by spec.model.init, exact resume inside the sft and dpo phases (also on another world size), and the
export of the result with the chat template it trained on.

Everything is real: torchrun worker processes over gloo, DCP checkpoints, the built-in chat and preference corpora
tokenized with the chatml template by the run's own data preparation (once per module, shared by symlinks).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import faults
import pytest
import torch
from conftest import SAMPLE_BYTES, run_tiny, stagerun, tiny_run, write_manifest
from test_training import completed, final_weights, flat_tensors, uninterrupted_run

from stagerun.trainer.checkpoint import CheckpointManager
from stagerun.trainer.telemetry import read_metrics, read_status

SOURCES = {
    "docs": {"path": "builtin:python-docs", "weight": 1.0},
    "chat": {"path": "builtin:chat-arithmetic", "weight": 0.0},
    "prefs": {"path": "builtin:preference-arithmetic", "weight": 0.0},
}
PRETRAIN = {
    "name": "pretrain",
    "tokens": "8Ki",
    "seqLen": 64,
    "microBatchSize": 4,
    "batch": {"size": "1Ki"},
    "lr": {"schedule": "cosine", "peak": 3e-3, "to": 1e-3, "warmupTokens": "1Ki"},
}
SFT = {
    "name": "sft",
    "kind": "sft",
    "tokens": "7Ki",  # 4 whole steps run 1Ki past it: the dpo phase's first step starts at 16Ki, not at 15Ki
    "seqLen": 256,  # the longest built-in conversations and pairs fit
    "microBatchSize": 4,
    "batch": {"size": "2Ki"},
    "data": {"weights": {"chat": 0.75, "docs": 0.25}},
    "lr": {"schedule": "cosine", "peak": 4e-3, "to": 1e-3, "warmupTokens": 0},
}
DPO = {
    "name": "dpo",
    "kind": "dpo",
    "tokens": "16Ki",
    "microBatchSize": 4,
    "batch": {"size": "4Ki"},
    "data": {"weights": {"prefs": 1.0}},
    "dpo": {"beta": 0.1},
    "lr": {"schedule": "constant", "peak": 3e-3, "warmupTokens": 0},  # a tiny model, a few steps: a large LR
    "optimizer": {"reset": True},
}
# 8 pretrain steps of 1Ki, 4 sft steps of 2Ki, 4 dpo steps of 4Ki; checkpoints every 4Ki tokens: after steps 4, 8
# (the end of pretrain), 10, 12 (sft's end, 16Ki tokens), 13, 14, 15 and 16.
STEPS = {"pretrain": 8, "sft": 4, "dpo": 4}
TOTAL_STEPS = sum(STEPS.values())


def post_training_run(*phases: dict, **spec) -> dict:
    changes = {
        "tokenizer": {"train": {"vocabSize": 512, "maxBytes": "1M"}, "chatTemplate": {"format": "chatml"}},
        "data": {"sources": SOURCES},
        "phases": [copy.deepcopy(p) for p in (phases or (PRETRAIN, SFT, DPO))],
        "checkpoint": {"everyTokens": "4Ki", "keep": 2},
    }
    changes.update(spec)
    return tiny_run(**changes)


@pytest.fixture(scope="module")
def post_data(tmp_path_factory) -> Path:
    """The runs' tokenizer (trained once, with the chatml tokens) and shard sets of every source."""
    from stagerun.core.spec import resolve_run
    from stagerun.trainer.runner import prepare

    folder = tmp_path_factory.mktemp("post-training-data")
    prepare(resolve_run(post_training_run()), folder, max_source_bytes=SAMPLE_BYTES)
    return folder


def new_run_dir(post_data: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer-chat.json", "data"):
        (folder / name).symlink_to(post_data / name)
    return folder


@pytest.fixture(scope="module")
def straight(post_data, tmp_path_factory):
    """pretrain -> sft -> dpo in one manifest, two processes, uninterrupted: what the other tests compare with."""
    folder = tmp_path_factory.mktemp("post-straight")
    run_dir = new_run_dir(post_data, folder / "run")
    return uninterrupted_run(write_manifest(folder / "post.yaml", post_training_run()), run_dir, folder)


def by_phase(metrics: list[dict], phase: str) -> list[dict]:
    return [m for m in metrics if m["phase"] == phase]


def test_one_manifest_pretrains_then_fine_tunes_then_aligns(straight):
    metrics = straight["metrics"]
    assert [m["phase"] for m in metrics] == [p for p, n in STEPS.items() for _ in range(n)]
    assert read_status(straight["dir"]).state == "complete"
    pretrain, sft, dpo = (by_phase(metrics, p) for p in STEPS)
    # sft: trains on the chat set's responses plus docs replay (3:1 by loss tokens), and its loss falls.
    chat, docs = (sft[-1]["tokensPerSource"][s] - pretrain[-1]["tokensPerSource"][s] for s in ("chat", "docs"))
    assert chat > 0 and docs > 0, sft[-1]
    assert all("splitConversations" in m and "dpoLoss" not in m for m in sft)
    assert sft[-1]["loss"] < sft[0]["loss"] - 0.2, [m["loss"] for m in sft]
    # dpo: the reference is the weights the phase starts with, so the first step's rewards are all 0 and its loss
    # is log 2 (a reference that were anything else, e.g. the weights of another step, would show here); then the
    # policy moves away from it, on the chosen side. (How fast DPO raises the margin on fixed pairs, and its loss
    # and gradients against TRL's, is tests/test_dpo.py's; four steps of a 2-layer model show only the direction.)
    first, later = dpo[0], dpo[1:]
    assert first["rewardsChosen"] == first["rewardsRejected"] == first["rewardsMargin"] == 0.0, first
    assert first["dpoLoss"] == pytest.approx(math.log(2), abs=1e-7) and first["loss"] == first["dpoLoss"]
    assert all(m["pairs"] > 0 for m in dpo) and sum(m["pairs"] for m in dpo) > 100
    assert all(m["rewardsChosen"] != 0 and m["rewardsRejected"] != 0 for m in later), later
    assert sum(m["rewardsMargin"] for m in later) > 0 and min(m["dpoLoss"] for m in later) < math.log(2), later
    # The sft phase's last step ran past its budget (to 16Ki, not 15Ki), so the dpo phase's first step is past its
    # start_tokens: it still counts as the phase's fresh start, and optimizer.reset clears the state there.
    assert sum(STEPS[p] for p in ("pretrain", "sft")) == 12 and metrics[11]["tokens"] == 16 * 1024, metrics[11]
    assert "phase dpo: optimizer state reset (phases[2].optimizer.reset)" in straight["output"]
    assert "phase sft finished" in straight["output"] and "phase dpo finished" in straight["output"]


def test_resume_inside_sft_and_inside_dpo_is_bitwise_identical(straight, post_data, tmp_path):
    run_dir = new_run_dir(post_data, tmp_path / "run")
    manifest = straight["manifest"]
    # Killed after step 11 (sft: resumes at its checkpoint of step 10, mid-phase), then after step 14 and its
    # checkpoint (dpo: resumes there, reloading the reference from the checkpoint the phase started from, step 12).
    for kill_after, resumes_at in ((11, 10), (14, 14)):
        killed = run_tiny(manifest, run_dir, env=faults.env(kill_after_step=kill_after))
        assert killed.returncode != 0 and f"resume from step {resumes_at}" in killed.stdout, killed.stdout[-3000:]
    resumed = run_tiny(manifest, run_dir)
    completed(resumed)
    assert "step 14" in resumed.stdout and "reference" in resumed.stdout, resumed.stdout[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    for key in ("loss", "gradNorm", "lr", "batchChecksum", "tokensPerSource", "rewardsMargin", "splitConversations"):
        assert [m.get(key) for m in metrics] == [m.get(key) for m in straight["metrics"]], key
    ours, theirs = flat_tensors(final_weights(run_dir / "checkpoints", tmp_path)), flat_tensors(straight["weights"])
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_a_dpo_phase_resumed_on_one_process_continues_on_the_same_pairs(straight, post_data, tmp_path):
    run_dir = new_run_dir(post_data, tmp_path / "run")
    killed = run_tiny(straight["manifest"], run_dir, env=faults.env(kill_after_step=14))
    assert killed.returncode != 0
    completed(run_tiny(straight["manifest"], run_dir, "--nproc", "1"))  # 2 -> 1 ranks: DCP reshards policy and ref
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["batchChecksum"] for m in metrics] == [m["batchChecksum"] for m in straight["metrics"]]
    assert [m["pairs"] for m in by_phase(metrics, "dpo")] == [m["pairs"] for m in by_phase(straight["metrics"], "dpo")]
    for one, two in zip(metrics[-2:], straight["metrics"][-2:]):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-4, abs=1e-5), one["step"]
        assert one["rewardsMargin"] == pytest.approx(two["rewardsMargin"], rel=1e-3, abs=1e-5), one["step"]


def test_chained_runs_start_sft_and_dpo_from_the_previous_runs_checkpoint(straight, post_data, tmp_path):
    """The same three phases as three runs: each later one starts from the one before by spec.model.init, with the
    base run's tokenizer (a separate run's optimizer always starts fresh)."""
    base = straight["dir"]
    pretrain_end = CheckpointManager(str(base / "checkpoints"), keep=100).committed()
    boundary = next(c for c in pretrain_end if c.step == STEPS["pretrain"])
    tokenizer = {"path": str(base / "tokenizer.json"), "chatTemplate": {"format": "chatml"}}

    sft_run = post_training_run(SFT, tokenizer=tokenizer)
    sft_run["metadata"]["name"] = "sft"
    sft_run["spec"]["model"]["init"] = {"from": "checkpoint", "path": boundary.path}
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "data").symlink_to(post_data / "data")
    result = run_tiny(write_manifest(tmp_path / "sft.yaml", sft_run), sft_dir)
    completed(result)
    assert "step-00000008" in result.stdout  # the weights it began with
    sft = read_metrics(sft_dir / "metrics.jsonl")
    assert [m["phase"] for m in sft] == ["sft"] * STEPS["sft"]
    # Started from the pretrained weights: its first loss is the one-manifest run's at the same point (within what
    # another draw of conversations changes), well below a random init's (about log 512 = 6.24).
    straight_sft = by_phase(straight["metrics"], "sft")
    assert sft[0]["loss"] == pytest.approx(straight_sft[0]["loss"], abs=0.15) and sft[0]["loss"] < math.log(512) - 0.25
    assert sft[-1]["loss"] < sft[0]["loss"] - 0.2

    dpo_run = post_training_run(DPO, tokenizer=tokenizer)
    dpo_run["metadata"]["name"] = "dpo"
    dpo_run["spec"]["model"]["init"] = {"from": "checkpoint", "path": str(sft_dir / "checkpoints")}
    dpo_run["spec"]["phases"][0].update(seqLen=256)
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    (dpo_dir / "data").symlink_to(post_data / "data")
    completed(run_tiny(write_manifest(tmp_path / "dpo.yaml", dpo_run), dpo_dir))
    dpo = read_metrics(dpo_dir / "metrics.jsonl")
    assert [m["phase"] for m in dpo] == ["dpo"] * STEPS["dpo"]
    # The reference of a run's first phase is spec.model.init's weights: rewards start at 0.
    assert dpo[0]["dpoLoss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(m["rewardsChosen"] != 0 for m in dpo[1:]) and sum(m["rewardsMargin"] for m in dpo[1:]) > 0, dpo


def test_export_of_the_run_writes_the_chat_template_it_trained_on(straight, tmp_path):
    transformers = pytest.importorskip("transformers")
    from stagerun.core.chat_template import CHATML
    from stagerun.trainer.data.tokenizer import load_tokenizer

    latest = CheckpointManager(str(straight["dir"] / "checkpoints"), keep=100).latest()
    meta = json.loads((Path(latest.path) / "meta.json").read_text())
    assert meta["chatTemplate"] == CHATML.to_json()
    out = tmp_path / "hf"
    # No --manifest: the checkpoint's meta.json says which template, the run dir holds the tokenizer.
    result = stagerun("export", str(straight["dir"]), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "chat template chatml" in result.stdout
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML.jinja() and config["eos_token"] == "<|im_end|>"
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]
    encoded = hf.apply_chat_template(messages, tokenize=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    ours = load_tokenizer(straight["dir"] / "tokenizer-chat.json")
    assert ids == ours.encode(CHATML.render(messages).text).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
