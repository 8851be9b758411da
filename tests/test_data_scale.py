"""Data at scale (issue 15, issue 19 item 2): the v2 order (seeded blocks of documents shuffled within windows,
walked from an anchor; the earlier bijection order for runs begun in it), memory that does not grow with the
documents, the memory-mapped index, shard hashes and token-id checks.

The loader's exactness properties are the ones of test_data_loader, run again here on v2 sets (the ``sources``
fixture below replaces that module's v1 one for the imported tests), with blocks small enough that every test
crosses many blocks and windows."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from test_data_loader import (  # noqa: F401 - collected here again, on v2 sets
    EOS,
    global_batch,
    random_docs,
    step_args,
    test_packing_invariants,
    test_phase_changes_continue_every_source_stream_exactly,
    test_rank_slices_union_is_the_global_batch,
    test_save_on_one_dp_size_resume_on_another,
    test_shares_converge_to_the_weights,
    test_state_round_trip_gives_the_same_stream,
    write_token_set,
)

from stagerun.trainer.data import DataError, PackedMixLoader, TokenShards, doc_index
from stagerun.trainer.data.block_order import KEEP_WINDOWS, BlockOrder
from stagerun.trainer.data.loader import _SourceStream
from stagerun.trainer.data.order import BijectionOrder, FeistelPermutation
from stagerun.trainer.data.shard_verify import files_to_check, upgrade_manifest

BLOCK_TOKENS, WINDOW_BLOCKS = 64, 3


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", str(BLOCK_TOKENS))
    monkeypatch.setenv("STAGERUN_DATA_WINDOW_BLOCKS", str(WINDOW_BLOCKS))


def v2_set(folder, docs, tokens_per_shard=10**9) -> TokenShards:
    write_token_set(folder, docs, tokens_per_shard)
    upgrade_manifest(folder)
    return TokenShards.open(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    return {
        "web": v2_set(root / "web", random_docs(1, 120, 1), tokens_per_shard=700),
        "code": v2_set(root / "code", random_docs(2, 60, 10_000, max_len=80)),
        "math": v2_set(root / "math", random_docs(3, 7, 20_000, max_len=10)),
    }


def test_sources_are_v2_and_read_in_the_block_order(sources):
    assert all(s.format == "stagerun-tokens/v2" and s.order == "blocks" for s in sources.values())
    assert sources["web"].num_shards > 3
    order = PackedMixLoader(sources, 0)._streams[0].order
    assert isinstance(order, BlockOrder) and order.num_windows > 10  # the property tests cross many windows


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, (7, 1, 0))
    values = perm(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    if n >= 16:
        assert not np.array_equal(values, np.arange(n))
        assert not np.array_equal(values, FeistelPermutation(n, (7, 1, 1))(np.arange(n)))  # another epoch
    assert np.array_equal(perm(np.arange(n)[::-1]), values[::-1])  # any positions, any order


@pytest.mark.parametrize(
    ("n", "key", "digest", "head"),
    [
        (1000, (7, 1, 0), "bff7d2da8b578c43", [676, 698, 555, 247, 744]),
        (4097, (5,), "5c6b64c6511519f7", [2268, 3782, 1481, 1421, 4032]),
        (500_000, (0, 12345, 3), "f00d6f8216d9dd1e", [425883, 414986, 151322, 19460, 74702]),
    ],
)
def test_feistel_values_are_pinned(n, key, digest, head):
    """A checkpoint resumes on the order it was saved in: the bijection's values must never change between stagerun
    versions (an optimisation of it that moves one value breaks every saved run's resume)."""
    values = FeistelPermutation(n, key)(np.arange(n))
    assert values[:5].tolist() == head
    assert hashlib.sha256(values.astype("<i8").tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("name", ["web", "math"])
def test_v2_epochs_are_new_orders_with_no_token_lost(sources, name):
    shards = sources[name]
    total = shards.num_tokens
    stream = _SourceStream(name, shards, 11).read(0, 3 * total + 5)[0]
    starts = np.concatenate([[0], shards.doc_ends[:-1]])
    documents = sorted(tuple(shards.read(int(a), int(b)).tolist()) for a, b in zip(starts, shards.doc_ends))
    orders = []
    for epoch in range(3):
        chunk = stream[epoch * total : (epoch + 1) * total]
        ends = np.flatnonzero(chunk == EOS) + 1
        docs = [tuple(d.tolist()) for d in np.split(chunk, ends)[:-1]]
        assert ends[-1] == total and sorted(docs) == documents
        orders.append(docs)
    assert orders[0] != orders[1] != orders[2]
    # Epoch 0's first document is p_0(0) of the bijection seeded by (seed, crc32(name), epoch).
    first = int(shards.index.bounds(np.array([0]))[1][0])
    assert len(orders[0][0]) > 0 and first > 0


def test_window_memory_is_bounded_by_the_layout(tmp_path):
    """The order holds the documents of at most KEEP_WINDOWS windows, never an array of all of them."""
    shards = v2_set(tmp_path / "many", random_docs(4, 20_000, 1, max_len=8))
    loader = PackedMixLoader({"a": shards}, 0)
    order = loader._streams[0].order
    assert isinstance(order, BlockOrder)
    seen = []
    for _ in range(200):  # about 1.4 epochs of 64 x 16 tokens
        loader.next_step(dp_rank=0, dp_size=2, **step_args(16, 64, 4, 0, {"a": 1.0}))
        loader.state_dict()
        seen.append(sum(len(w.ends) for w in order._windows.values()))
    per_window_docs = WINDOW_BLOCKS * BLOCK_TOKENS / 2 + WINDOW_BLOCKS  # documents hold at least 2 tokens
    assert max(seen) <= KEEP_WINDOWS * per_window_docs < shards.num_documents / 20


def test_a_window_reads_a_few_contiguous_ranges(tmp_path):
    """Locality: the tokens a window's sequences read are its blocks, one contiguous range of the set each."""
    shards = v2_set(tmp_path / "set", random_docs(8, 3000, 1, max_len=30), tokens_per_shard=5_000)
    stream = _SourceStream("a", shards, 3)
    order = stream.order
    assert isinstance(order, BlockOrder) and order.num_windows > 20
    window = order.window(0, 5, 0)
    index, _ = stream.locate(0, shards.num_tokens)  # epoch 0 whole: every token once
    assert np.array_equal(np.sort(index), np.arange(shards.num_tokens))
    starts, stops = order.block_tokens_range(window.blocks)
    size = int((stops - starts).sum())
    offset = sum(order.window_tokens(0, w) for w in range(5))
    inside = index[offset : offset + size]
    assert np.array_equal(np.sort(inside), np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]))
    assert len(window.blocks) == WINDOW_BLOCKS and not np.array_equal(inside, np.sort(inside))  # shuffled inside


def test_a_run_begun_in_the_bijection_order_resumes_in_it(sources):
    args = step_args(seq_len=24, global_sequences=6, micro=3)
    first = PackedMixLoader(sources, 3)
    for stream in first._streams:
        stream.use_order("bijection", (0, 0))
    expected = [global_batch([first], **args) for _ in range(30)]
    replay = PackedMixLoader(sources, 3)
    for stream in replay._streams:
        stream.use_order("bijection", (0, 0))
    for _ in range(12):
        global_batch([replay], **args)
    state = json.loads(json.dumps(replay.state_dict()))
    assert {f["order"] for f in state["sources"].values()} == {"bijection"} and not state["layouts"]
    resumed = PackedMixLoader(sources, 3)  # a new loader starts in the block order; the state says otherwise
    resumed.load_state_dict(state)
    assert all(isinstance(s.order, BijectionOrder) for s in resumed._streams)
    for i in range(12, 30):
        for x, y in zip(global_batch([resumed], **args)[:3], expected[i][:3]):
            assert np.array_equal(x, y)


def test_a_resumed_run_keeps_its_block_layout(sources, monkeypatch):
    args = step_args(seq_len=24, global_sequences=6, micro=3)
    straight = PackedMixLoader(sources, 3)
    expected = [global_batch([straight], **args) for _ in range(20)]
    for _ in range(8):
        global_batch([PackedMixLoader(sources, 3)], **args)
    saved = PackedMixLoader(sources, 3)
    for _ in range(8):
        global_batch([saved], **args)
    state = json.loads(json.dumps(saved.state_dict()))
    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", "1000")  # another layout for new runs only
    resumed = PackedMixLoader(sources, 3)
    assert resumed._streams[0].order.block_tokens == 1000
    resumed.load_state_dict(state)
    assert resumed._streams[0].order.block_tokens == BLOCK_TOKENS
    for i in range(8, 20):
        for x, y in zip(global_batch([resumed], **args)[:3], expected[i][:3]):
            assert np.array_equal(x, y)


def test_resume_from_an_anchor_is_exact_and_a_lost_anchor_only_slower(sources):
    args = step_args(seq_len=24, global_sequences=6, micro=3)
    straight = PackedMixLoader(sources, 3)
    expected = [global_batch([straight], **args) for _ in range(40)]
    first = PackedMixLoader(sources, 3)
    for _ in range(25):
        global_batch([first], **args)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["version"] == 2 and set(state["anchors"]) == set(sources)
    no_anchor = {k: v for k, v in state.items() if k != "anchors"}
    for saved in (state, no_anchor):
        resumed = [PackedMixLoader(sources, 3) for _ in range(2)]
        for loader in resumed:
            loader.load_state_dict(saved)
        for i in range(25, 40):
            batch = global_batch(resumed, **args)
            for x, y in zip(batch[:3], expected[i][:3]):
                assert np.array_equal(x, y)


def test_a_v1_state_does_not_resume_on_a_v2_set(sources, tmp_path):
    v1 = {
        name: write_token_set(tmp_path / name, random_docs(i + 1, n, t, m))
        for i, (name, n, t, m) in enumerate([("web", 120, 1, 40), ("code", 60, 10_000, 80), ("math", 7, 20_000, 10)])
    }
    state = PackedMixLoader(v1, 0).state_dict()
    state["version"] = 1
    for fingerprint in state["sources"].values():
        del fingerprint["order"]  # what a version 1 state holds
    PackedMixLoader(v1, 0).load_state_dict(state)  # still loads on the v1 sets
    with pytest.raises(ValueError, match=r"source 'web' differs .*order.*converted to v2 reads its documents"):
        PackedMixLoader(sources, 0).load_state_dict(state)


def test_large_multi_shard_index_is_built_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_index, "IN_MEMORY_DOCUMENTS", 10)
    monkeypatch.setattr(doc_index, "CHUNK", 7)
    docs = random_docs(5, 300, 1, max_len=20)
    write_token_set(tmp_path / "set", docs, tokens_per_shard=500)
    cache = tmp_path / "cache"
    shards = TokenShards.open(tmp_path / "set", cache_dir=cache)
    built = list((cache / "index").glob("*.ends"))
    assert len(built) == 1 and isinstance(shards.index.ends, np.memmap) and shards.num_shards > 3
    assert np.array_equal(shards.doc_ends, np.cumsum([len(d) + 1 for d in docs]))
    assert TokenShards.open(tmp_path / "set", cache_dir=cache).index.ends.filename == shards.index.ends.filename
    # A damaged index entry is found while building (every entry is checked once per node).
    path = tmp_path / "set" / "shard-00001.idx"
    ends = np.fromfile(path, dtype="<i8")
    ends[[3, 4]] = ends[[4, 3]]
    ends.tofile(path)
    with pytest.raises(DataError, match=r"shard-00001\.idx: document end offsets must increase, entry 4"):
        TokenShards.open(tmp_path / "set", cache_dir=cache)


# --- integrity (issue 19 item 2) ---------------------------------------------------------------------------------


@pytest.fixture
def v2_folder(tmp_path):
    v2_set(tmp_path / "set", random_docs(6, 200, 1, max_len=30), tokens_per_shard=400)
    return tmp_path / "set"


def test_an_overwritten_token_is_found_by_its_hash(v2_folder, monkeypatch):
    path = v2_folder / "shard-00002.bin"
    data = bytearray(path.read_bytes())
    data[10:12] = (1).to_bytes(2, "little")  # a valid id: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00002\.bin: does not match its sha256 in manifest\.json"):
        TokenShards.open(v2_folder, verify="all")
    with pytest.raises(DataError, match="does not match its sha256"):
        TokenShards.open(v2_folder)  # the default sample covers a set smaller than the budget
    TokenShards.open(v2_folder, verify="off")
    monkeypatch.setenv("STAGERUN_DATA_VERIFY", "off")
    TokenShards.open(v2_folder)


def test_sampled_verification_spreads_shards_over_ranks(v2_folder):
    manifest = json.loads((v2_folder / "manifest.json").read_text())
    per_shard = 400 * 2
    picked = [files_to_check(manifest, "sample", rank, 3 * per_shard, "s") for rank in range(4)]
    assert all(1 <= len(p) // 2 <= 3 for p in picked)
    assert len({i for p in picked for i, _ in p}) > len(picked[0]) // 2  # ranks check different shards
    assert files_to_check(manifest, "sample", 0, 0, "s")  # at least one shard, whatever the budget
    assert len(files_to_check(manifest, "all", 0, 0, "s")) == 2 * len(manifest["shards"])


def test_token_ids_above_the_vocabulary_name_source_and_shard(v2_folder):
    manifest = json.loads((v2_folder / "manifest.json").read_text())
    manifest["vocabSize"] = 150  # ids above it are in the set: as if a shard came from another tokenizer
    (v2_folder / "manifest.json").write_text(json.dumps(manifest))
    shards = TokenShards.open(v2_folder)
    with pytest.raises(DataError, match=r"set/shard-\d+\.bin: token id \d+ at token \d+ is not below .*vocabSize 150"):
        PackedMixLoader({"web": shards}, 0).next_step(dp_rank=0, dp_size=1, **step_args(32, 40, 40, 0, {"web": 1.0}))


def test_reused_prepare_cache_is_hashed_whole(v2_folder, tmp_path):
    shutil.copytree(v2_folder, tmp_path / "copy")
    TokenShards.open(tmp_path / "copy", verify="all")  # an intact copy passes
    last = tmp_path / "copy" / "shard-00001.bin"
    last.write_bytes(last.read_bytes()[:-2] + b"\x01\x00")
    with pytest.raises(DataError, match=r"shard-00001\.bin: does not match"):
        TokenShards.open(tmp_path / "copy", verify="all")


def test_v2_manifest_without_hashes_is_refused(v2_folder):
    manifest = json.loads((v2_folder / "manifest.json").read_text())
    del manifest["shards"][1]["sha256"]
    (v2_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards\[1\]\.sha256 must be the sha256"):
        TokenShards.open(v2_folder)
