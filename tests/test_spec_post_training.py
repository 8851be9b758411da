"""The post-training fields of a TrainingRun (issue 18): phases[].kind and .dpo, optimizer.reset, chat and preference
sources, tokenizer.chatTemplate; how they resolve and inherit, and the problems validation names."""

from __future__ import annotations

import pytest
from conftest import tiny_run

from stagerun.core.spec import resolve_run
from stagerun.core.spec.fields import SpecError
from stagerun.core.spec.run import DpoSpec

CHAT_SOURCES = {
    "docs": {"path": "builtin:python-docs", "weight": 1.0},
    "chat": {"path": "builtin:chat-arithmetic", "weight": 0.0},
    "prefs": {"path": "builtin:preference-arithmetic", "weight": 0.0},
}
PRETRAIN = {"name": "pre", "tokens": "8Ki", "seqLen": 64, "batch": {"size": "1Ki"}, "lr": {"peak": 1e-3}}


def post_training_run(*phases: dict, **spec) -> dict:
    changes = {
        "tokenizer": {"train": {"vocabSize": 512, "maxBytes": "1M"}, "chatTemplate": {"format": "chatml"}},
        "data": {"sources": CHAT_SOURCES},
        "phases": [PRETRAIN, *phases],
    }
    changes.update(spec)
    return tiny_run(**changes)


SFT = {"name": "sft", "tokens": "8Ki", "kind": "sft", "data": {"weights": {"chat": 0.6, "docs": 0.4}}}
DPO = {"name": "dpo", "tokens": "4Ki", "kind": "dpo", "data": {"weights": {"prefs": 1.0}}}


def problems(manifest: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        resolve_run(manifest)
    return {p.path: f"{p.message} (fix: {p.fix})" for p in info.value.problems}


def test_kinds_inherit_and_dpo_settings_default_on_dpo_phases_only():
    run = resolve_run(
        post_training_run(SFT, {"name": "sft-2", "tokens": "4Ki"}, DPO, {"name": "dpo-2", "tokens": "4Ki"})
    )
    assert [p.kind for p in run.phases] == ["pretrain", "sft", "sft", "dpo", "dpo"]
    assert [p.dpo for p in run.phases] == [None, None, None, DpoSpec(), DpoSpec()]
    assert [p.masks_documents for p in run.phases] == [False, True, True, True, True]
    tuned = dict(DPO, dpo={"beta": 0.05, "nllWeight": 0.2})
    run = resolve_run(post_training_run(tuned, {"name": "dpo-2", "tokens": "4Ki"}))
    assert run.phases[1].dpo == run.phases[2].dpo == DpoSpec(beta=0.05, nll_weight=0.2)


def test_optimizer_reset_applies_to_its_own_phase_and_is_not_inherited():
    sft = dict(SFT, optimizer={"reset": True, "weightDecay": 0.0})
    run = resolve_run(post_training_run(sft, {"name": "sft-2", "tokens": "4Ki"}))
    assert [p.reset_optimizer for p in run.phases] == [False, True, False]
    assert run.phases[2].optimizer.weight_decay == 0.0  # the settings carry over; the reset does not


def test_post_training_problems_name_the_field_and_the_fix():
    found = problems(post_training_run(dict(SFT, dpo={"beta": 0.1})))
    assert "only applies to phases of kind dpo" in found["spec.phases[1].dpo"]
    found = problems(post_training_run(dict(DPO, data={"weights": {"docs": 0.5, "prefs": 0.5}})))
    assert "a dpo phase trains on preference pairs only" in found["spec.phases[1].data.weights"]
    assert "docs" in found["spec.phases[1].data.weights"]
    found = problems(post_training_run(dict(SFT, data={"weights": {"prefs": 1.0}})))
    assert "only dpo phases train on" in found["spec.phases[1].data.weights"]
    found = problems(post_training_run(dict(DPO, parallelism={"contextParallel": 2})))
    assert "do not split sequences" in found["spec.phases[1].parallelism.contextParallel"]


def test_dpo_first_needs_a_trained_starting_model():
    first = dict(DPO, seqLen=64, batch={"size": "1Ki"}, lr={"peak": 1e-6})
    manifest = post_training_run()
    manifest["spec"]["phases"] = [first]
    assert "starts from random weights" in problems(manifest)["spec.phases[0].kind"]
    manifest["spec"]["model"] = {"preset": "tiny", "init": {"from": "checkpoint", "path": "/runs/pretrained"}}
    assert resolve_run(manifest).phases[0].kind == "dpo"


def test_chat_sources_need_a_chat_template_and_a_custom_template_its_roles():
    manifest = post_training_run(SFT)
    del manifest["spec"]["tokenizer"]["chatTemplate"]
    assert "chat or preference" in problems(manifest)["spec.tokenizer.chatTemplate"]
    manifest["spec"]["tokenizer"]["chatTemplate"] = {"format": "custom", "user": {"prefix": "<u>", "suffix": "</u>"}}
    assert "required with format custom" in problems(manifest)["spec.tokenizer.chatTemplate.system"]
    manifest["spec"]["tokenizer"]["chatTemplate"] = {"format": "chatml", "specialTokens": ["<x>"]}
    assert "only applies to format custom" in problems(manifest)["spec.tokenizer.chatTemplate.specialTokens"]
    manifest["spec"]["tokenizer"] = {"train": {"vocabSize": 260}, "chatTemplate": {"format": "llama3"}}
    assert "use at least 262" in problems(manifest)["spec.tokenizer.train.vocabSize"]


def test_a_declared_chat_jsonl_source_counts_as_chat():
    sources = dict(CHAT_SOURCES, chat={"path": "/data/chat/*.jsonl", "format": "chat", "weight": 0.0})
    manifest = post_training_run(SFT, data={"sources": sources})
    del manifest["spec"]["tokenizer"]["chatTemplate"]
    assert "chat" in problems(manifest)["spec.tokenizer.chatTemplate"]
