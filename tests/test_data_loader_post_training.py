"""PackedMixLoader in sft and dpo phases: whole conversations and pairs per row, loss masks, padding, truncation,
amount-weighted replay shares, and the pretraining loader's guarantees kept (world-size independence, exact resume).

The sets are written by hand with the conventions of shard_format.py (stagerun-tokens/v2, uint32, bit 31 set on the
tokens that are training targets). Every non-EOS token id is unique within a set (a preference pair's two prompts
excepted), so a token names its place, and whether it is trained is a look-up.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stagerun.trainer.batch import IGNORE_INDEX, StepBatch
from stagerun.trainer.data import PackedMixLoader, TokenShards
from stagerun.trainer.data.corpora import DataError
from stagerun.trainer.data.loader import _SourceStream
from stagerun.trainer.data.shard_format import LOSS_MASK_BIT, split_loss_mask
from stagerun.trainer.prefetch import DrawKey

EOS = 0
BIT = 1 << LOSS_MASK_BIT
RESPONSE = 1 << 24  # response tokens' ids start here (chosen), REJECTED above: prompts lie below
REJECTED = 1 << 25


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Blocks of a few documents and windows of two: the epoch order really shuffles blocks and windows here.
    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", "96")
    monkeypatch.setenv("STAGERUN_DATA_WINDOW_BLOCKS", "2")


def write_set(folder, docs: list[tuple[list[int], list[int]]], content: str, docs_per_shard: int = 10**9):
    """A v2 set of documents given as (untrained tokens, trained tokens): each stored as prompt + response + EOS,
    with the mask bit on the response. ``content``: text | chat | preference (documents 2i, 2i + 1: a pair)."""
    folder.mkdir(parents=True)
    entries = []
    for i, first in enumerate(range(0, len(docs), docs_per_shard)):
        part = docs[first : first + docs_per_shard]
        values = []
        for prompt, response in part:
            values.append(np.array(prompt, np.uint32))
            values.append(np.array(response, np.uint32) | np.uint32(BIT if content != "text" else 0))
            values.append(np.array([EOS], np.uint32))
        tokens = np.concatenate(values).astype("<u4")
        ends = np.cumsum([len(p) + len(r) + 1 for p, r in part]).astype("<i8")
        names = {"tokens": f"shard-{i:05d}.bin", "index": f"shard-{i:05d}.idx"}
        (folder / names["tokens"]).write_bytes(tokens.tobytes())
        (folder / names["index"]).write_bytes(ends.tobytes())
        entry = {
            **names,
            "numTokens": len(tokens),
            "numDocuments": len(part),
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
            "indexSha256": hashlib.sha256(ends.tobytes()).hexdigest(),
        }
        if content != "text":
            entry["numLossTokens"] = sum(len(r) for _, r in part)
        if content == "preference":
            entry["numPairs"] = len(part) // 2
        entries.append(entry)
    manifest = {
        "format": "stagerun-tokens/v2",
        "dtype": "uint32",
        "eosId": EOS,
        "vocabSize": 1 << 27,
        "tokenizerSha256": "test",
        "numTokens": sum(e["numTokens"] for e in entries),
        "numDocuments": len(docs),
        "shards": entries,
    }
    if content != "text":
        manifest.update(
            content=content,
            lossMask="bit31",
            numLossTokens=sum(e["numLossTokens"] for e in entries),
            chatTemplate={"format": "chatml", "jinjaSha256": "0" * 64},
        )
    if content == "preference":
        manifest["numPairs"] = len(docs) // 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return TokenShards.open(folder)


def chats(seed: int, count: int, first: int, max_prompt: int = 12, max_response: int = 14, long_every: int = 0):
    """Conversations with unique ids; every ``long_every``-th one is longer than any row the tests use."""
    rng = np.random.default_rng(seed)
    docs, token = [], first
    for i in range(count):
        p = int(rng.integers(0, max_prompt))  # 0: a conversation that opens with a trained token
        r = int(rng.integers(1, max_response)) + (70 if long_every and i % long_every == 0 else 0)
        docs.append((list(range(token, token + p)), list(range(RESPONSE + token, RESPONSE + token + r))))
        token += p + r
    return docs


def pairs(seed: int, count: int, max_prompt: int = 8, max_response: int = 10, long: tuple[int, int] | None = None):
    """Preference pairs: (prompt, chosen) then (the same prompt, rejected); ``long`` = (pair, response length)."""
    rng = np.random.default_rng(seed)
    docs, token = [], 1
    for k in range(count):
        p, c, r = (int(x) for x in rng.integers(1, [max_prompt, max_response, max_response]))
        if long is not None and k == long[0]:
            c = r = long[1]
        prompt = list(range(token, token + p))
        docs.append((prompt, list(range(RESPONSE + token, RESPONSE + token + c))))
        docs.append((prompt, list(range(REJECTED + token, REJECTED + token + r))))
        token += p + max(c, r)
    return docs


def text_docs(count: int, first: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(first)
    docs, token = [], first
    for length in rng.integers(1, 30, size=count):
        docs.append((list(range(token, token + int(length))), []))
        token += int(length)
    return docs


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    return {
        "chat": write_set(root / "chat", chats(1, 150, 1, long_every=17), "chat", docs_per_shard=40),
        "web": write_set(root / "web", text_docs(200, 10_000_000), "text"),
        "prefs": write_set(root / "prefs", pairs(2, 80), "preference", docs_per_shard=30),
        "prefs2": write_set(root / "prefs2", pairs(3, 40, max_prompt=4), "preference"),
    }


def args(kind: str, weights: dict[str, float], seq_len: int = 32, sequences: int = 8, micro: int = 2, phase: int = 0):
    return dict(
        phase_index=phase,
        weights=weights,
        seq_len=seq_len,
        global_sequences=sequences,
        micro_batch_size=micro,
        kind=kind,
    )


def global_batch(loaders: list[PackedMixLoader], **step) -> list:
    """One step on every rank's loader: each rank's micro-batches, in rank order."""
    return [
        mb for rank, loader in enumerate(loaders) for mb in loader.next_step(dp_rank=rank, dp_size=len(loaders), **step)
    ]


def rows(batch) -> list[tuple]:
    """(inputs, targets, doc_ids, pair_ids or None, source) per row of a global batch."""
    out = []
    for mb in batch:
        for i in range(len(mb.inputs)):
            pair = None if mb.pair_ids is None else mb.pair_ids[i]
            out.append((mb.inputs[i], mb.targets[i], mb.doc_ids[i], pair, mb.sources[i]))
    return out


def same_batches(a, b) -> bool:
    """Two global batches (micro-batch lists) hold the same rows, pair ids and pair counts."""
    ra, rb = rows(a), rows(b)
    if len(ra) != len(rb) or [mb.num_pairs for mb in a] != [mb.num_pairs for mb in b]:
        return False
    for p, q in zip(ra, rb):
        if p[4] != q[4] or (p[3] is None) != (q[3] is None):
            return False
        if not all(np.array_equal(x, y) for x, y in zip(p[:4], q[:4]) if x is not None):
            return False
    return True


def set_tokens(shards: TokenShards) -> tuple[np.ndarray, np.ndarray]:
    """(id, trained) of every stored token."""
    return split_loss_mask(shards.read(0, shards.num_tokens))


# --- sft ----------------------------------------------------------------------------------------------------------


def straight(shards: TokenShards, name: str, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The source's stream in its epoch order, as (ids, trained)."""
    return split_loss_mask(_SourceStream(name, shards, seed).read(0, count)[0])


def test_sft_rows_hold_whole_conversations_with_only_assistant_targets(sets):
    shards, seq_len = sets["chat"], 40
    loader = PackedMixLoader({"chat": shards}, 5)
    ids, trained = set_tokens(shards)
    first_tokens = set(ids[np.concatenate([[0], shards.doc_ends[:-1]])].tolist())
    trained_ids = set(ids[trained].tolist())
    trained_targets, splits = [], 0
    while loader.cursors[0] < 2 * shards.num_tokens:  # two epochs
        for inputs, targets, doc_ids, pair_ids, _ in rows(global_batch([loader], **args("sft", {"chat": 1}, seq_len))):
            assert pair_ids is None
            assert np.all(targets < BIT) and np.all(inputs < BIT)  # the mask bit never reaches the model
            # Every document but the row's last (or its padding) is a whole conversation (the first one may be the
            # rest of a split one): it ends in EOS and starts at a conversation's first token.
            for d in np.unique(doc_ids)[:-1]:
                piece = inputs[doc_ids == d]
                assert piece[-1] == EOS and (d == 0 or piece[0] in first_tokens)
            # Trained targets: exactly the next token where it is an assistant token of the same conversation.
            for t in range(seq_len - 1):
                same = doc_ids[t + 1] == doc_ids[t]
                assert targets[t] == (inputs[t + 1] if same and inputs[t + 1] in trained_ids else IGNORE_INDEX)
            trained_targets.append(targets[targets != IGNORE_INDEX])
        splits += loader.last_step.split_conversations
    # In order, the trained targets are the stream's trained tokens: no conversation dropped or repeated, none
    # reordered, padding never trained, over two epochs; the conversations longer than a row were split, not dropped.
    cursor = loader.cursors[0]
    ends = _SourceStream("chat", shards, 5).ends(0, cursor + seq_len + 1)
    starts = np.concatenate([[0], ends[:-1]])
    stream_ids, stream_trained = straight(shards, "chat", 5, cursor)
    stream_trained[starts[starts < cursor]] = False  # a conversation's first token is never a target of its own
    assert np.array_equal(np.concatenate(trained_targets), stream_ids[stream_trained])
    assert np.any(np.isin(stream_ids[starts[starts < cursor]], list(trained_ids)))  # and some would be trained
    long_docs = int(np.count_nonzero((ends - starts > seq_len + 1) & (starts < cursor)))
    assert splits == loader.state_dict()["splitConversations"]["chat"] == long_docs >= 16


def test_a_pretrain_phase_reads_chat_sets_as_streams_then_sft_starts_at_a_conversation(sets):
    shards = sets["chat"]
    loader = PackedMixLoader({"chat": shards, "web": sets["web"]}, 2)
    step = args("pretrain", {"chat": 1.0, "web": 1.0}, seq_len=13, sequences=4, micro=4)
    (mb,) = loader.next_step(dp_rank=0, dp_size=1, **step)
    assert np.array_equal(mb.inputs[:, 1:], mb.targets[:, :-1])  # today's stream: every target trains
    assert np.all(mb.targets < BIT) and np.all(mb.targets != IGNORE_INDEX)
    cursor = loader.cursors[0]
    ends = _SourceStream("chat", shards, 2).ends(0, shards.num_tokens)
    assert cursor not in ends  # the pretrain phase left the chat cursor inside a conversation
    loader.next_step(dp_rank=0, dp_size=1, **args("sft", {"chat": 1.0}, 40, 1, 1, phase=1))
    start = int(ends[np.searchsorted(ends, cursor)])
    assert loader.state_dict()["skippedTokens"]["chat"] == start - cursor == loader.last_step.skipped_tokens > 0


def test_sft_replay_shares_are_shares_of_loss_tokens(sets):
    loader = PackedMixLoader({"chat": sets["chat"], "web": sets["web"]}, 0)
    weights = {"chat": 0.7, "web": 0.3}
    loss = {"chat": 0, "web": 0}
    sequences = {"chat": 0, "web": 0}
    for _ in range(60):
        for _, targets, _, _, source in rows(global_batch([loader], **args("sft", weights, 24, 16, 16))):
            loss[source] += int(np.count_nonzero(targets != IGNORE_INDEX))
            sequences[source] += 1
    share = loss["chat"] / (loss["chat"] + loss["web"])
    assert abs(share - 0.7) < 0.03, (share, loss)
    # Per *row* the chat source is drawn far more often than 0.7: its rows train only their assistant tokens.
    assert sequences["chat"] / sum(sequences.values()) > 0.8


# --- dpo ----------------------------------------------------------------------------------------------------------


def check_dpo_rows(batch) -> int:
    """Every row holds whole pairs (chosen then rejected, the same prompt), pair_ids mark exactly the trained targets
    of each response, padding is never trained; returns the pairs seen."""
    seen = 0
    for inputs, targets, doc_ids, pair_ids, _ in rows(batch):
        assert pair_ids is not None
        assert np.array_equal(pair_ids >= 0, targets != IGNORE_INDEX)
        assert np.array_equal(pair_ids[pair_ids >= 0], doc_ids[pair_ids >= 0])
        count = int(pair_ids.max()) // 2 + 1  # every response has a trained target
        assert int(doc_ids.max()) in (2 * count - 1, 2 * count)  # the pairs' documents, then maybe the padding
        assert np.all(inputs[doc_ids == 2 * count] == EOS)
        for k in range(count):
            chosen, rejected = inputs[doc_ids == 2 * k], inputs[doc_ids == 2 * k + 1]
            prompt = chosen[chosen < RESPONSE]
            prompt = prompt[prompt != EOS]
            assert np.array_equal(rejected[: len(prompt)], prompt)  # the same prompt: one pair, both halves
            trained_c, trained_r = targets[pair_ids == 2 * k], targets[pair_ids == 2 * k + 1]
            assert len(trained_c) and np.all((trained_c >= RESPONSE) & (trained_c < REJECTED))
            assert len(trained_r) and np.all(trained_r >= REJECTED)
            seen += 1
    return seen


def test_dpo_rows_hold_whole_pairs_and_every_pair_once_per_epoch(sets):
    shards, seq_len = sets["prefs"], 48
    loader = PackedMixLoader({"prefs": shards}, 9)
    trained, pairs_seen = [], 0
    while loader.cursors[0] < 2 * shards.num_tokens:
        batch = global_batch([loader], **args("dpo", {"prefs": 1.0}, seq_len, 4, 2))
        seen = check_dpo_rows(batch)
        assert seen == sum(mb.num_pairs for mb in batch) == loader.last_step.pairs
        pairs_seen += seen
        trained.extend(mb.targets[mb.targets != IGNORE_INDEX] for mb in batch)
    assert loader.state_dict()["truncatedPairs"]["prefs"] == 0
    ids, is_trained = straight(shards, "prefs", 9, loader.cursors[0])
    assert np.array_equal(np.concatenate(trained), ids[is_trained])  # each pair exactly once per epoch, in order
    assert pairs_seen == int(np.count_nonzero(ids == EOS)) // 2


def test_preference_blocks_keep_pairs_adjacent_in_every_epoch(sets):
    shards = sets["prefs"]
    stream = _SourceStream("prefs", shards, 4)
    ids, _ = split_loss_mask(stream.read(0, 3 * shards.num_tokens)[0])
    docs = np.split(ids, np.flatnonzero(ids == EOS) + 1)[:-1]
    assert len(docs) == 3 * shards.num_documents
    for chosen, rejected in zip(docs[::2], docs[1::2]):
        assert chosen[0] == rejected[0] and np.all(chosen[1:-1] >= chosen[0])  # one pair: same prompt start
        assert np.any((chosen >= RESPONSE) & (chosen < REJECTED)) and np.any(rejected >= REJECTED)
    first = [int(d[0]) for d in docs[: shards.num_documents : 2]]
    second = [int(d[0]) for d in docs[shards.num_documents : 2 * shards.num_documents : 2]]
    assert sorted(first) == sorted(second) and first != second  # a new order of the same pairs


def test_a_pair_longer_than_the_row_keeps_its_prompt_and_is_counted(tmp_path):
    docs = pairs(4, 6, long=(2, 60))
    shards = write_set(tmp_path / "p", docs, "preference")
    loader = PackedMixLoader({"p": shards}, 0)
    seq_len, found = 32, []
    while loader.cursors[0] < shards.num_tokens:
        batch = global_batch([loader], **args("dpo", {"p": 1.0}, seq_len, 1, 1))
        assert check_dpo_rows(batch) == loader.last_step.pairs
        if loader.last_step.truncated_pairs:
            found.append(rows(batch)[0])
    assert len(found) == 1 == loader.state_dict()["truncatedPairs"]["p"]
    inputs, targets, doc_ids, pair_ids, _ = found[0]
    (prompt, chosen), (_, rejected) = docs[4], docs[5]
    p, room = len(prompt), seq_len + 1
    # The rule: the chosen response keeps max(room // 2, room - rejected length) tokens, the rejected the rest.
    keep_c = min(p + len(chosen) + 1, max(room // 2, room - (p + len(rejected) + 1)))
    keep_r = room - keep_c
    assert (keep_c, keep_r) == (16, 17)
    assert np.count_nonzero(doc_ids == 0) == keep_c and np.count_nonzero(doc_ids == 1) == keep_r - 1  # no padding
    assert np.array_equal(inputs[:p], prompt) and np.array_equal(inputs[keep_c : keep_c + p], prompt)
    assert np.array_equal(targets[pair_ids == 0], chosen[: keep_c - p])  # each response cut from its end
    assert np.array_equal(targets[pair_ids == 1], rejected[: keep_r - p])


def test_a_prompt_longer_than_half_the_row_asks_for_a_larger_seq_len(tmp_path):
    docs = pairs(5, 3)
    docs[2] = (list(range(500, 540)), docs[2][1])  # pair 1: a 40-token prompt
    docs[3] = (list(range(500, 540)), docs[3][1])
    loader = PackedMixLoader({"p": write_set(tmp_path / "p", docs, "preference")}, 0)
    with pytest.raises(DataError, match=r"preference pair 1 does not fit seqLen 32.*raise seqLen \(spec.phases\[0\]"):
        for _ in range(6):
            global_batch([loader], **args("dpo", {"p": 1.0}, 32, 1, 1))


def test_dpo_blend_counts_pairs(sets):
    loader = PackedMixLoader({"prefs": sets["prefs"], "prefs2": sets["prefs2"]}, 0)
    seen = {"prefs": 0, "prefs2": 0}
    for _ in range(40):
        batch = global_batch([loader], **args("dpo", {"prefs": 0.25, "prefs2": 0.75}, 40, 8, 1))
        for mb in batch:
            seen[mb.sources[0]] += mb.num_pairs
    assert abs(seen["prefs2"] / sum(seen.values()) - 0.75) < 0.02


# --- world size and resume --------------------------------------------------------------------------------------

PHASES = [
    ("pretrain", {"chat": 0.5, "web": 0.5}, 12, 3),
    ("sft", {"chat": 0.8, "web": 0.2}, 24, 4),
    ("dpo", {"prefs": 0.6, "prefs2": 0.4}, 40, 4),
    ("sft", {"chat": 1.0}, 16, 3),
]


def steps():
    for phase, (kind, weights, seq_len, count) in enumerate(PHASES):
        for _ in range(count):
            yield args(kind, weights, seq_len, sequences=8, micro=2, phase=phase)


def test_global_batches_and_counts_do_not_depend_on_the_world_size(sets):
    runs = {dp: [PackedMixLoader(sets, 3) for _ in range(dp)] for dp in (1, 2, 4)}
    for step in steps():
        batches = {dp: global_batch(loaders, **step) for dp, loaders in runs.items()}
        for dp in (2, 4):
            assert same_batches(batches[1], batches[dp])
            assert all(loader.last_step == runs[1][0].last_step for loader in runs[dp])
    states = [loader.state_dict() for loaders in runs.values() for loader in loaders]
    assert all(state == states[0] for state in states)
    assert states[0]["splitConversations"]["chat"] > 0 and states[0]["packing"]


@pytest.mark.parametrize("cut, dp", [(2, 2), (4, 1), (5, 4), (8, 2), (11, 1)])
def test_resume_mid_phase_on_another_world_size_continues_on_the_same_batches(sets, cut, dp):
    all_steps = list(steps())
    reference = PackedMixLoader(sets, 8)
    expected = [global_batch([reference], **step) for step in all_steps]
    first = [PackedMixLoader(sets, 8) for _ in range(2)]
    for step in all_steps[:cut]:
        global_batch(first, **step)
    state = json.loads(json.dumps(first[0].state_dict()))
    resumed = [PackedMixLoader(sets, 8) for _ in range(dp)]
    for loader in resumed:
        loader.load_state_dict(state)
    for i, step in enumerate(all_steps[cut:], cut):
        assert same_batches(global_batch(resumed, **step), expected[i])
    assert resumed[0].state_dict() == reference.state_dict()


def test_a_state_without_packing_keys_still_loads(sets):
    loader = PackedMixLoader(sets, 1)
    global_batch([loader], **args("pretrain", {"chat": 1.0, "web": 1.0}, 8, 2, 1))
    state = loader.state_dict()
    for key in ("packing", "drawnAmount", "phaseAmount", "splitConversations", "truncatedPairs", "skippedTokens"):
        state.pop(key)
    again = PackedMixLoader(sets, 1)
    again.load_state_dict(state)
    assert again.state_dict() == loader.state_dict()


# --- refusals -----------------------------------------------------------------------------------------------------


def test_sources_a_kind_cannot_train_on_are_refused_before_anything_moves(sets):
    loader = PackedMixLoader(sets, 0)
    with pytest.raises(
        ValueError, match=r"source 'web' .* holds text, but a dpo phase .*spec.phases\[2\].data.weights"
    ):
        loader.next_step(dp_rank=0, dp_size=1, **args("dpo", {"prefs": 1.0, "web": 0.1}, phase=2))
    with pytest.raises(ValueError, match=r"'prefs' .* only dpo phases train on.*kind is sft.*spec.phases\[1\]"):
        loader.next_step(dp_rank=0, dp_size=1, **args("sft", {"prefs": 1.0}, phase=1))
    with pytest.raises(ValueError, match=r"'prefs' .*kind is pretrain"):
        loader.next_step(dp_rank=0, dp_size=1, **args("pretrain", {"prefs": 1.0}))
    with pytest.raises(ValueError, match="phase kind 'rlhf'"):
        loader.next_step(dp_rank=0, dp_size=1, **args("rlhf", {"chat": 1.0}))
    assert loader.cursors == [0, 0, 0, 0] and loader.phase_index is None


def test_preference_sets_refuse_the_single_document_orders(sets):
    stream = _SourceStream("prefs", sets["prefs"], 0)
    for order in ("bijection", "permutation"):
        with pytest.raises(ValueError, match=rf"'prefs' .* preference set, read only in the block order.*'{order}'"):
            stream.use_order(order, (96, 2))


# --- the step's batch and the prefetcher's key --------------------------------------------------------------------


def test_step_batch_of_a_dpo_phase_masks_documents_and_carries_the_pairs(sets):
    loader = PackedMixLoader(sets, 0)
    mbs = loader.next_step(dp_rank=0, dp_size=1, **args("dpo", {"prefs": 1.0}, 40, 4, 2))
    batch = StepBatch.from_micro_batches(
        mbs, torch.device("cpu"), doc_masking=False, kind="dpo", global_pairs=loader.last_step.pairs
    )
    assert batch.kind == "dpo" and batch.global_pairs == sum(mb.num_pairs for mb in mbs) > 0
    assert all(d.doc_ids is not None and d.pair_ids is not None for d in batch.micro_batches)
    assert batch.local_tokens == sum(int(np.count_nonzero(mb.targets != IGNORE_INDEX)) for mb in mbs)
    assert batch.local_tokens < sum(mb.targets.size for mb in mbs)  # prompts and padding are not counted
    assert torch.equal(batch.micro_batches[0].pair_ids, torch.from_numpy(mbs[0].pair_ids))
    plain = StepBatch.from_micro_batches(mbs, torch.device("cpu"), doc_masking=False)
    assert plain.micro_batches[0].doc_ids is None  # a pretrain batch still follows spec.training.docMasking


def test_the_draw_key_includes_the_phase_kind():
    def plan(kind):
        phase = SimpleNamespace(index=1, weights={"a": 1.0}, micro_batch_size=2, kind=kind)
        return SimpleNamespace(phase=phase, seq_len=16, batch_sequences=8)

    assert DrawKey.of(plan("sft")) != DrawKey.of(plan("pretrain"))
    assert DrawKey.of(plan("sft")).kind == "sft"
