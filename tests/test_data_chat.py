"""Chat and preference JSONL -> shard sets (issue 18): the rendered ids, the loss mask in bit 31, preference pairs,
malformed records named by file and line, the manifest's new keys, and the run-start path (prepare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stagerun.core.chat_template import CHATML, ChatFormat, RoleFormat
from stagerun.core.spec import resolve_run
from stagerun.trainer.cli import main
from stagerun.trainer.data import DataError, TokenShards, load_tokenizer, train_tokenizer
from stagerun.trainer.data import tokenize as tokenize_module
from stagerun.trainer.data.chat_corpora import (
    BUILTIN_CHAT,
    BUILTIN_PREFERENCE,
    chat_records,
    preference_records,
    write_chat_jsonl,
    write_preference_jsonl,
)
from stagerun.trainer.data.prepare import prepare_data
from stagerun.trainer.data.readers import ChatRecord
from stagerun.trainer.data.shard_format import parse_manifest, split_loss_mask
from stagerun.trainer.data.tokenize import tokenize
from stagerun.trainer.data.tokenize_worker import render_record
from stagerun.trainer.data.tokenizer import add_chat_tokens

ARGS = dict(fmt="chat", chat_template=CHATML, progress=False, unit_bytes=8192, shard_tokens=4000)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [" ".join(m["content"] for m in r["messages"]) for r in chat_records(400, seed=7)]
    train_tokenizer(texts, 400, path)
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_path):
    tokenizer = add_chat_tokens(load_tokenizer(tokenizer_path), CHATML)
    tokenizer.encode_special_tokens = False  # as apply_chat_template: the markup is special tokens
    return tokenizer


def documents(shards: TokenShards) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of every document, its EOS checked (last, never a target) and dropped."""
    out = []
    ends = shards.doc_ends
    for start, stop in zip(np.concatenate([[0], ends[:-1]]), ends):
        ids, mask = split_loss_mask(shards.read(int(start), int(stop)))
        assert ids[-1] == shards.eos_id and not mask[-1]
        out.append((ids[:-1], mask[:-1]))
    return out


def masked_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The ids of each maximal run of targets."""
    runs, current = [], []
    for token, target in zip(ids.tolist(), mask.tolist()):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def assistant_bodies(messages) -> list[str]:
    return [m["content"] + CHATML.roles["assistant"].suffix for m in messages if m["role"] == "assistant"]


def check_document(tokenizer, ids, mask, messages, response_from: int = 0) -> None:
    """ids are the whole rendered text's encoding; the targets decode to the assistant turns (content + suffix)
    from message ``response_from`` on, and to nothing else."""
    rendered = CHATML.render(messages)
    assert ids.tolist() == tokenizer.encode(rendered.text, add_special_tokens=False).ids
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in masked_runs(ids, mask)]
    assert "".join(decoded) == "".join(assistant_bodies(messages[response_from:]))


# --- chat ---------------------------------------------------------------------------------------------------------


def test_chat_ids_are_the_rendered_text_and_the_mask_is_the_assistant_turns(tokenizer_path, chat_tokenizer, tmp_path):
    source = write_chat_jsonl(tmp_path / "chat.jsonl", 300, seed=1)
    result = tokenize([str(source)], tokenizer_path, tmp_path / "out", processes=2, **ARGS)
    assert result.units > 2 and result.processes == 2
    shards = TokenShards.open(tmp_path / "out", verify="all")
    manifest = shards.manifest
    assert manifest["dtype"] == "uint32" and manifest["content"] == "chat" and manifest["lossMask"] == "bit31"
    assert manifest["chatTemplate"]["format"] == "chatml" and len(manifest["chatTemplate"]["jinjaSha256"]) == 64
    assert "numPairs" not in manifest and shards.num_pairs == 0
    assert shards.content == "chat" and shards.loss_mask_bit == 31
    records = list(chat_records(300, seed=1))
    docs = documents(shards)
    assert len(docs) == len(records) == shards.num_documents
    for (ids, mask), record in zip(docs, records):
        check_document(chat_tokenizer, ids, mask, record["messages"])
    stored = np.concatenate([np.fromfile(tmp_path / "out" / s["tokens"], dtype="<u4") for s in manifest["shards"]])
    assert int((stored >> 31).sum()) == shards.num_loss_tokens == sum(int(m.sum()) for _, m in docs)
    assert [s["numLossTokens"] for s in manifest["shards"]] == [
        int((np.fromfile(tmp_path / "out" / s["tokens"], dtype="<u4") >> 31).sum()) for s in manifest["shards"]
    ]
    assert 0 < shards.num_loss_tokens < shards.num_tokens
    assert "loss tokens (responses, trained on)" in result.report()


def test_an_interrupted_chat_run_resumes_and_another_template_redoes_every_unit(tokenizer_path, tmp_path, monkeypatch):
    source = str(write_chat_jsonl(tmp_path / "chat.jsonl", 200, seed=2))
    reference = tokenize([source], tokenizer_path, tmp_path / "reference", processes=1, **ARGS)
    real, calls = tokenize_module.run_unit, []

    def interrupted(unit, *args, **kwargs):
        calls.append(unit.key)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "run_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize([source], tokenizer_path, tmp_path / "out", processes=1, **ARGS)
    monkeypatch.undo()
    resumed = tokenize([source], tokenizer_path, tmp_path / "out", processes=1, **ARGS)
    assert resumed.reused_units == 2 and resumed.units == reference.units
    a, b = TokenShards.open(tmp_path / "out"), TokenShards.open(tmp_path / "reference")
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    assert resumed.manifest["numLossTokens"] == reference.manifest["numLossTokens"]

    # Same inputs, another template: no unit is reused (the template is part of every unit's key).
    other = ChatFormat(
        name="custom",
        roles={r: RoleFormat(f"<|im_start|>{r}:\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
        special_tokens=("<|im_start|>", "<|im_end|>"),
    )
    redone = tokenize([source], tokenizer_path, tmp_path / "other", processes=1, **{**ARGS, "chat_template": other})
    keys = {p.name for p in (tmp_path / "other").glob("shard-*.bin")}
    assert redone.reused_units == 0 and not keys & {p.name for p in (tmp_path / "out").glob("shard-*.bin")}
    assert redone.manifest["chatTemplate"]["jinjaSha256"] != reference.manifest["chatTemplate"]["jinjaSha256"]


# --- preference ---------------------------------------------------------------------------------------------------


def test_preference_pairs_share_the_prompt_and_only_the_responses_are_targets(tokenizer_path, chat_tokenizer, tmp_path):
    source = write_preference_jsonl(tmp_path / "pref.jsonl", 240, seed=3)
    tokenize([str(source)], tokenizer_path, tmp_path / "out", processes=1, **{**ARGS, "fmt": "preference"})
    shards = TokenShards.open(tmp_path / "out")
    manifest = shards.manifest
    assert manifest["content"] == "preference" and shards.num_pairs == 240 and shards.num_documents == 480
    assert len(manifest["shards"]) > 1
    assert all(s["numDocuments"] == 2 * s["numPairs"] for s in manifest["shards"])  # no pair straddles shards
    docs = documents(shards)
    for k, raw in enumerate(preference_records(240, seed=3)):
        prompt = [{"role": "user", "content": raw["prompt"]}] if isinstance(raw["prompt"], str) else raw["prompt"]
        responses = [
            [{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in (raw["chosen"], raw["rejected"])
        ]
        prompt_ids = chat_tokenizer.encode(CHATML.render(prompt).text, add_special_tokens=False).ids
        for (ids, mask), response in zip(docs[2 * k : 2 * k + 2], responses):
            check_document(chat_tokenizer, ids, mask, [*prompt, *response], response_from=len(prompt))
            assert ids[: len(prompt_ids) - 1].tolist() == prompt_ids[:-1]  # the same prompt tokens
            assert not mask[: len(prompt_ids) - 1].any()  # an assistant turn inside the prompt is context
        assert not np.array_equal(docs[2 * k][0], docs[2 * k + 1][0])


def test_a_prompt_less_pair_takes_the_shared_messages_as_its_prompt():
    record = ChatRecord(
        messages=({"role": "user", "content": "1 + 1?"},),
        chosen=({"role": "assistant", "content": "2"},),
        rejected=({"role": "assistant", "content": "3"},),
    )
    chosen, rejected = render_record(CHATML, record, "preference")
    prompt_chars = len(CHATML.render(record.messages).text)
    assert chosen.text[prompt_chars:] == "<|im_start|>assistant\n2<|im_end|>\n"
    assert [chosen.text[a:b] for a, b in chosen.loss_spans] == ["2<|im_end|>\n"]
    assert [rejected.text[a:b] for a, b in rejected.loss_spans] == ["3<|im_end|>\n"]


def test_trl_style_records_without_a_prompt(tokenizer_path, tmp_path):
    user = {"role": "user", "content": "What is 2 + 2?"}
    lines = [
        {
            "chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}],
        }
    ]
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tokenize([str(path)], tokenizer_path, tmp_path / "out", processes=1, **{**ARGS, "fmt": "preference"})
    shards = TokenShards.open(tmp_path / "out")
    tokenizer = load_tokenizer(tokenizer_path)
    (chosen, chosen_mask), (rejected, rejected_mask) = documents(shards)
    # Only the answers and their end of turn are targets; the shared user turn is the prompt.
    assert tokenizer.decode(chosen[chosen_mask].tolist(), skip_special_tokens=False).startswith("4")
    assert tokenizer.decode(rejected[rejected_mask].tolist(), skip_special_tokens=False).startswith("5")


# --- malformed records ----------------------------------------------------------------------------------------------

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PAIR = {"prompt": "1 + 1?", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize(
    "fmt, record, problem",
    [
        ("chat", {"conversation": []}, "no field 'messages' in this record"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\].role is 'bot'"),
        ("chat", {"messages": [{"role": "user", "content": ["a"]}]}, r"messages\[0\].content is list, not a string"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "messages has no assistant turn"),
        ("chat", {"messages": "hi"}, "messages must be a list of messages"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}]},
            r"messages\[0\].content holds '<\|im_end\|>', a special token",
        ),
        ("preference", {"prompt": "p", "chosen": "c"}, "no field 'rejected' in this record"),
        ("preference", {"prompt": "p", "chosen": "c", "rejected": 3}, "rejected must be a list of messages"),
        (
            "preference",
            {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "chosen has no assistant turn",
        ),
        ("preference", {"chosen": "c", "rejected": "r"}, "no field 'prompt' in this record"),
    ],
)
def test_malformed_records_name_file_and_line(tokenizer_path, tmp_path, fmt, record, problem):
    good = GOOD_CHAT if fmt == "chat" else GOOD_PAIR
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in (good, good, record, good)))
    args = {**ARGS, "fmt": fmt, "processes": 1}
    with pytest.raises(DataError, match=rf"{path}:3: {problem}.*--skip-bad-records"):
        tokenize([str(path)], tokenizer_path, tmp_path / "out", **args)
    result = tokenize([str(path)], tokenizer_path, tmp_path / "out", skip_bad_records=True, **args)
    info = result.manifest["tokenize"]
    assert info["skippedRecords"] == 1 and info["skipped"][0]["where"] == f"{path}:3"
    assert result.manifest["numDocuments"] == (3 if fmt == "chat" else 6)


# --- the manifest and the reader ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_set(tokenizer_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chatset")
    source = write_chat_jsonl(folder / "chat.jsonl", 60, seed=4)
    tokenize([str(source)], tokenizer_path, folder / "set", processes=1, **ARGS)
    return folder / "set"


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"dtype": "uint16"}, "a set with lossMask bit31 must have dtype uint32"),
        ({"lossMask": "bit15"}, "lossMask 'bit15' is not one of bit31"),
        ({"lossMask": None}, "a chat set needs lossMask"),
        ({"content": "dialogue"}, "content 'dialogue' is not one of"),
        ({"chatTemplate": {"format": "chatml"}}, "chatTemplate must be"),
        ({"numLossTokens": 10**9}, "numLossTokens is 1000000000, more than"),
        ({"numPairs": 3}, "numPairs is only for preference sets"),
        ({"content": "preference", "numPairs": 1}, r"shards\[0\].numPairs must be a non-negative integer"),
    ],
)
def test_the_manifest_keys_are_checked(chat_set, change, problem):
    manifest = json.loads((chat_set / "manifest.json").read_text())
    for key, value in change.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    with pytest.raises(DataError, match=problem):
        parse_manifest(json.dumps(manifest).encode(), "set/manifest.json")


def test_a_pair_count_that_is_not_half_the_documents_is_refused(tokenizer_path, tmp_path):
    source = write_preference_jsonl(tmp_path / "p.jsonl", 10, seed=5)
    tokenize([str(source)], tokenizer_path, tmp_path / "set", processes=1, **{**ARGS, "fmt": "preference"})
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    manifest["shards"][0]["numPairs"] += 1
    manifest["numPairs"] += 1
    with pytest.raises(DataError, match=r"shards\[0\] holds \d+ documents but \d+ pairs"):
        parse_manifest(json.dumps(manifest).encode(), "set/manifest.json")


def test_the_vocab_check_ignores_the_mask_bit_but_not_a_bad_id(chat_set, tmp_path):
    shards = TokenShards.open(chat_set)
    values = shards.read(0, shards.num_tokens)
    assert (values >> 31).any() and int(values.max()) >= 2**31  # targets carry the bit, and read fine
    ids, _ = split_loss_mask(values)
    assert int(ids.max()) < shards.vocab_size
    assert [len(r) for r in shards.read_ranges(np.array([0]), np.array([shards.num_tokens]))] == [shards.num_tokens]

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(chat_set, broken)
    name = shards.manifest["shards"][0]["tokens"]
    data = np.fromfile(broken / name, dtype="<u4")
    data[5] = (1 << 31) | shards.vocab_size  # a target whose id is out of the vocabulary
    data.tofile(broken / name)
    damaged = TokenShards.open(broken, verify="off")
    with pytest.raises(DataError, match=rf"token id {shards.vocab_size} at token 5 is not below"):
        damaged.read(0, 10)
    with pytest.raises(DataError, match="token id"):
        damaged.read_ranges(np.array([0]), np.array([10]))
    with pytest.raises(DataError, match=r"sha256"):
        TokenShards.open(broken, verify="all")  # the hashes cover the stored values, mask bits included


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli_custom_template_file_and_its_errors(tokenizer_path, tmp_path, capsys):
    source = write_chat_jsonl(tmp_path / "chat.jsonl", 30, seed=6)
    template = tmp_path / "template.yaml"
    template.write_text(
        "chatTemplate:\n  format: custom\n  specialTokens: ['<u>', '<a>', '</t>']\n"
        "  system: {prefix: '<u>sys ', suffix: '</t>'}\n  user: {prefix: '<u>', suffix: '</t>'}\n"
        "  assistant: {prefix: '<a>', suffix: '</t>'}\n"
    )
    common = ["tokenize", "--input", str(source), "--tokenizer", str(tokenizer_path), "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "--format", "chat", "--chat-template", str(template)]) == 0
    out = capsys.readouterr().out
    assert "loss tokens (responses, trained on)" in out and "chat template custom" in out
    assert TokenShards.open(tmp_path / "a").chat_template["format"] == "custom"

    assert main([*common, "--out", str(tmp_path / "b"), "--format", "chat"]) == 1
    assert "--format chat needs --chat-template" in capsys.readouterr().err
    template.write_text("chatTemplate: {format: custom, user: {prefix: '<u>', suffix: ''}}\n")
    assert main([*common, "--out", str(tmp_path / "c"), "--format", "chat", "--chat-template", str(template)]) == 1
    assert "template.yaml: chatTemplate.system: is required with format custom" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "d"), "--format", "chat", "--chat-template", "nope"]) == 1
    assert "neither a chat format (chatml, zephyr, llama3) nor a file" in capsys.readouterr().err


# --- the run-start path ---------------------------------------------------------------------------------------------


def run_manifest(sources: dict, tokenizer: dict) -> dict:
    return {
        "apiVersion": "stagerun.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "chat-test"},
        "spec": {
            "model": {"preset": "tiny", "vocabSize": 512},
            "tokenizer": tokenizer,
            "data": {"sources": sources},
            "phases": [
                {
                    "name": "sft",
                    "kind": "sft",
                    "tokens": "64K",
                    "seqLen": 64,
                    "batch": {"size": 512},
                    "lr": {"peak": 1e-3},
                }
            ],
        },
    }


def test_prepare_tokenizes_builtin_chat_sources_and_checks_templates(tokenizer_path, tmp_path):
    template = {"chatTemplate": {"format": "chatml"}}
    run = resolve_run(
        run_manifest(
            {"chat": {"path": BUILTIN_CHAT, "weight": 1.0, "format": "chat"}}, {"path": str(tokenizer_path), **template}
        )
    )
    prepared = prepare_data(run, tmp_path / "run", progress=False)
    shards = TokenShards.open(prepared.shard_dirs["chat"])
    assert shards.content == "chat" and shards.num_documents > 1000
    assert prepared.tokenizer_path == str(tmp_path / "run" / "tokenizer-chat.json")
    chat_tokenizer = load_tokenizer(prepared.tokenizer_path)
    assert chat_tokenizer.token_to_id("<|im_start|>") is not None
    assert shards.tokenizer_sha256 == tokenize_module.manifest_head(chat_tokenizer)["tokenizerSha256"]
    mtime = (Path(prepared.shard_dirs["chat"]) / "manifest.json").stat().st_mtime_ns
    again = prepare_data(run, tmp_path / "run", progress=False)  # nothing changed: the set is reused
    assert again.shard_dirs == prepared.shard_dirs
    assert (Path(prepared.shard_dirs["chat"]) / "manifest.json").stat().st_mtime_ns == mtime

    # The set as a shard-set source (format auto) of a run with the same template, and one with another.
    as_set = {"chat": {"path": prepared.shard_dirs["chat"], "weight": 1.0}}
    reused = prepare_data(
        resolve_run(run_manifest(as_set, {"path": str(tokenizer_path), **template})), tmp_path / "r2", progress=False
    )
    assert reused.shard_dirs["chat"] == prepared.shard_dirs["chat"]
    custom = {
        "chatTemplate": {
            "format": "custom",
            "specialTokens": ["<|im_start|>", "<|im_end|>"],
            **{r: {"prefix": f"<|im_start|>{r}:", "suffix": "<|im_end|>"} for r in ("system", "user", "assistant")},
        }
    }
    with pytest.raises(
        DataError, match=r"spec.tokenizer.chatTemplate: the run renders chats as custom, but source chat"
    ):
        prepare_data(
            resolve_run(run_manifest(as_set, {"path": str(tokenizer_path), **custom})), tmp_path / "r3", progress=False
        )


def test_prepare_trains_a_tokenizer_on_chat_and_tokenizes_preference_pairs(tmp_path):
    sources = {
        "chat": {"path": BUILTIN_CHAT, "weight": 0.5, "format": "chat"},
        "pairs": {"path": BUILTIN_PREFERENCE, "weight": 0.5, "format": "preference"},
    }
    raw = run_manifest(sources, {"train": {"vocabSize": 400, "maxBytes": 50_000}, "chatTemplate": {"format": "chatml"}})
    raw["spec"]["phases"][0]["data"] = {"weights": {"chat": 1.0, "pairs": 0.0}}
    prepared = prepare_data(resolve_run(raw), tmp_path / "run", progress=False)
    pairs = TokenShards.open(prepared.shard_dirs["pairs"])
    assert pairs.content == "preference" and pairs.num_pairs * 2 == pairs.num_documents
    assert prepared.vocab_size == load_tokenizer(prepared.tokenizer_path).get_vocab_size()
