"""PackedMixLoader: exact resharding across data-parallel sizes, resumable state, packing and mixing."""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerun.trainer.data import PackedMixLoader, TokenShards

EOS = 0


def write_token_set(folder, docs: list[list[int]], tokens_per_shard: int = 10**9, sha: str = "test") -> TokenShards:
    """A stagerun-tokens/v1 set written by hand (as an external tokenizer job would), EOS after each document."""
    folder.mkdir(parents=True)
    shards, current = [], []
    for doc in docs:
        current.append(doc)
        if sum(len(d) + 1 for d in current) >= tokens_per_shard:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    entries = []
    dtype = "uint16" if max(max(d) for d in docs) < 2**16 else "uint32"
    for i, shard_docs in enumerate(shards):
        tokens = np.concatenate([np.array(d + [EOS], dtype=dtype) for d in shard_docs])
        tokens.tofile(folder / f"shard-{i:05d}.bin")
        np.cumsum([len(d) + 1 for d in shard_docs], dtype="<i8").tofile(folder / f"shard-{i:05d}.idx")
        entries.append(
            {
                "tokens": f"shard-{i:05d}.bin",
                "index": f"shard-{i:05d}.idx",
                "numTokens": len(tokens),
                "numDocuments": len(shard_docs),
            }
        )
    manifest = {
        "format": "stagerun-tokens/v1",
        "dtype": dtype,
        "eosId": EOS,
        "vocabSize": 2**16 if dtype == "uint16" else 2**32 - 1,
        "tokenizerSha256": sha,
        "numTokens": sum(e["numTokens"] for e in entries),
        "numDocuments": len(docs),
        "shards": entries,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return TokenShards.open(folder)


def random_docs(seed: int, count: int, first_token: int, max_len: int = 40) -> list[list[int]]:
    """Documents whose tokens are all distinct and non-EOS, so every token names its place in the source."""
    rng = np.random.default_rng(seed)
    docs, token = [], first_token
    for length in rng.integers(1, max_len, size=count):
        docs.append(list(range(token, token + int(length))))
        token += int(length)
    return docs


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "web": write_token_set(root / "web", random_docs(1, 120, 1), tokens_per_shard=700),
        "code": write_token_set(root / "code", random_docs(2, 60, 10_000, max_len=80)),
        "math": write_token_set(root / "math", random_docs(3, 7, 20_000, max_len=10)),  # shorter than a sequence
    }


WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}


def step_args(seq_len=16, global_sequences=8, micro=2, phase=0, weights=WEIGHTS):
    return dict(
        phase_index=phase, weights=weights, seq_len=seq_len, global_sequences=global_sequences, micro_batch_size=micro
    )


def global_batch(loaders: list[PackedMixLoader], **args) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One step on every rank's loader, the ranks' micro-batches concatenated in rank order."""
    parts = [
        mb for rank, loader in enumerate(loaders) for mb in loader.next_step(dp_rank=rank, dp_size=len(loaders), **args)
    ]
    return (
        np.concatenate([mb.inputs for mb in parts]),
        np.concatenate([mb.targets for mb in parts]),
        np.concatenate([mb.doc_ids for mb in parts]),
        [s for mb in parts for s in mb.sources],
    )


def assert_same_batch(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)
    assert a[3] == b[3]


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from([8, 16, 24]), st.integers(1, 3), st.integers(0, 1)), min_size=1, max_size=6
    ),
    micro=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rank_slices_union_is_the_global_batch(sources, steps, micro, seed):
    runs = {dp: [PackedMixLoader(sources, seed) for _ in range(dp)] for dp in (1, 2, 4)}
    for seq_len, accum, phase in steps:
        weights = WEIGHTS if phase == 0 else {"web": 0.1, "code": 0.0, "math": 0.9}
        batches = {
            dp: global_batch(loaders, **step_args(seq_len, 4 * micro * accum, micro, phase, weights))
            for dp, loaders in runs.items()
        }
        assert_same_batch(batches[1], batches[2])
        assert_same_batch(batches[1], batches[4])
    states = [loader.state_dict() for loaders in runs.values() for loader in loaders]
    assert all(state == states[0] for state in states)  # every rank holds the same (global) state


def test_micro_batch_split_and_shapes(sources):
    loader = PackedMixLoader(sources, 0)
    micro_batches = loader.next_step(dp_rank=1, dp_size=2, **step_args(seq_len=16, global_sequences=12, micro=2))
    assert len(micro_batches) == 3  # 12 sequences / 2 ranks = 6 per rank = 3 accumulation steps of 2
    for mb in micro_batches:
        assert mb.inputs.shape == mb.targets.shape == mb.doc_ids.shape == (2, 16)
        assert mb.inputs.dtype == mb.targets.dtype == np.int64 and mb.doc_ids.dtype == np.int32
        assert len(mb.sources) == 2


@settings(max_examples=15, deadline=None)
@given(total=st.integers(2, 14), cut=st.integers(1, 13), seed=st.integers(0, 1000))
def test_state_round_trip_gives_the_same_stream(sources, total, cut, seed):
    cut = min(cut, total - 1)
    phases = [0] * (total // 2) + [1] * (total - total // 2)
    weights = [WEIGHTS, {"web": 0.2, "code": 0.8}]

    def args(i):
        phase = phases[i]
        return step_args(seq_len=16 + 8 * (i % 2), global_sequences=4, micro=1, phase=phase, weights=weights[phase])

    straight = PackedMixLoader(sources, seed)
    expected = [global_batch([straight], **args(i)) for i in range(total)]
    first = PackedMixLoader(sources, seed)
    for i in range(cut):
        global_batch([first], **args(i))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PackedMixLoader(sources, seed)
    resumed.load_state_dict(state)
    for i in range(cut, total):
        assert_same_batch(global_batch([resumed], **args(i)), expected[i])
    assert resumed.state_dict() == straight.state_dict()


@pytest.mark.parametrize("save_dp, resume_dp", [(2, 1), (1, 4), (4, 2)])
def test_save_on_one_dp_size_resume_on_another(sources, save_dp, resume_dp):
    args = step_args(seq_len=16, global_sequences=8, micro=1)
    straight = [PackedMixLoader(sources, 7)]
    expected = [global_batch(straight, **args) for _ in range(10)]
    before = [PackedMixLoader(sources, 7) for _ in range(save_dp)]
    for i in range(4):
        assert_same_batch(global_batch(before, **args), expected[i])
    state = json.loads(json.dumps(before[0].state_dict()))
    after = [PackedMixLoader(sources, 7) for _ in range(resume_dp)]
    for loader in after:
        loader.load_state_dict(state)
    for i in range(4, 10):
        assert_same_batch(global_batch(after, **args), expected[i])


def test_shares_converge_to_the_weights(sources):
    loader = PackedMixLoader(sources, 0)
    counts = dict.fromkeys(sources, 0)
    for _ in range(100):
        for mb in loader.next_step(dp_rank=0, dp_size=1, **step_args(seq_len=8, global_sequences=40, micro=40)):
            for name in mb.sources:
                counts[name] += 1
    total = sum(counts.values())
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / total - weight) < 0.01
    assert loader.tokens_per_source == {name: count * 8 for name, count in counts.items()}


def test_weights_change_at_a_phase_change(sources):
    loader = PackedMixLoader(sources, 0)

    def drawn(phase, weights, n=20):
        mbs = loader.next_step(dp_rank=0, dp_size=1, **step_args(8, n, n, phase, weights))
        return [s for mb in mbs for s in mb.sources]

    assert set(drawn(0, {"web": 1.0, "code": 0.0, "math": 0.0})) == {"web"}  # a weight of 0 never draws
    assert set(drawn(0, {"web": 1.0})) == {"web"}
    # New phase: counts restart, so the blend alternates from the start (it would favour code for 40 sequences
    # if the first phase's counts were carried over).
    assert drawn(1, {"web": 0.5, "code": 0.5}, 6) == ["web", "code"] * 3
    assert set(drawn(2, {"math": 1.0})) == {"math"}
    assert loader.state_dict()["phaseIndex"] == 2


def test_packing_invariants(sources):
    loader = PackedMixLoader(sources, 3)
    for _ in range(30):
        for mb in loader.next_step(dp_rank=0, dp_size=1, **step_args(seq_len=32, global_sequences=6, micro=3)):
            assert np.array_equal(mb.inputs[:, 1:], mb.targets[:, :-1])  # targets are inputs shifted by one
            for inputs, doc_ids in zip(mb.inputs, mb.doc_ids):
                assert doc_ids[0] == 0
                # A new document starts exactly after each EOS (the EOS belongs to the document it ends).
                assert np.array_equal(np.diff(doc_ids), (inputs[:-1] == EOS).astype(np.int32))


def source_stream(name, shards, seed, sequences):
    """The one-source stream rebuilt from its sequences: the inputs in order, then the last target."""
    loader = PackedMixLoader({name: shards}, seed)
    batches = loader.next_step(
        dp_rank=0,
        dp_size=1,
        phase_index=0,
        weights={name: 1.0},
        seq_len=24,
        global_sequences=sequences,
        micro_batch_size=sequences,
    )
    inputs, targets = batches[0].inputs, batches[0].targets
    assert np.array_equal(targets[:-1, -1], inputs[1:, 0])  # the last target is the next sequence's first input
    return np.concatenate([inputs.reshape(-1), targets[-1, -1:]])


@pytest.mark.parametrize("name", ["web", "math"])
def test_epochs_are_new_permutations_with_no_token_lost(sources, name):
    shards = sources[name]
    total = shards.num_tokens
    stream = source_stream(name, shards, 11, sequences=3 * total // 24 + 2)
    documents = sorted(
        tuple(shards.read(int(a), int(b)).tolist())
        for a, b in zip(np.concatenate([[0], shards.doc_ends[:-1]]), shards.doc_ends)
    )
    orders = []
    for epoch in range(3):
        chunk = stream[epoch * total : (epoch + 1) * total]
        ends = np.flatnonzero(chunk == EOS) + 1
        docs = [tuple(d.tolist()) for d in np.split(chunk, ends)[:-1]]
        assert ends[-1] == total and sorted(docs) == documents  # each epoch is every document exactly once
        orders.append(docs)
    assert orders[0] != orders[1] != orders[2]
    # The permutation is seeded by (seed, crc32(name), epoch): stable across processes and machines.
    rng = np.random.Generator(np.random.PCG64([11, zlib.crc32(name.encode()), 0]))
    order = rng.permutation(shards.num_documents)
    starts = np.concatenate([[0], shards.doc_ends[:-1]])
    assert orders[0][0] == tuple(shards.read(int(starts[order[0]]), int(shards.doc_ends[order[0]])).tolist())


def test_seed_changes_the_order(sources):
    a = source_stream("web", sources["web"], 1, 10)
    b = source_stream("web", sources["web"], 2, 10)
    assert not np.array_equal(a, b)


def test_resume_with_different_sources_is_refused(sources, tmp_path):
    state = PackedMixLoader(sources, 0).state_dict()
    with pytest.raises(ValueError, match=r"data sources \['web', 'code', 'math'\] but this run has \['web', 'code'\]"):
        PackedMixLoader({k: sources[k] for k in ("web", "code")}, 0).load_state_dict(state)
    other = write_token_set(tmp_path / "web2", random_docs(5, 10, 1))
    with pytest.raises(ValueError, match=r"source 'web' differs .*numTokens, numDocuments.*same shard set"):
        PackedMixLoader({**sources, "web": other}, 0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data seed is 0 but this run uses 5: set spec.data.seed back to 0"):
        PackedMixLoader(sources, 5).load_state_dict(state)


def test_bad_arguments_are_refused(sources):
    loader = PackedMixLoader(sources, 0)
    with pytest.raises(ValueError, match="multiple of 6 sequences"):
        loader.next_step(dp_rank=0, dp_size=3, **step_args(global_sequences=8, micro=2))
    with pytest.raises(ValueError, match="unknown sources"):
        loader.next_step(dp_rank=0, dp_size=1, **step_args(weights={"books": 1.0}))
    with pytest.raises(ValueError, match="dp_rank 2 is not in"):
        loader.next_step(dp_rank=2, dp_size=2, **step_args())
    assert loader.cursors == [0, 0, 0]  # a refused step moves nothing


def test_step_is_fast(tmp_path):
    shards = write_token_set(tmp_path / "big", random_docs(0, 5000, 1, max_len=300))
    loader = PackedMixLoader({"a": shards, "b": shards}, 0)
    args = dict(
        phase_index=0,
        weights={"a": 0.7, "b": 0.3},
        seq_len=256,
        global_sequences=64,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=8,
    )
    loader.next_step(**args)
    start = time.perf_counter()
    for _ in range(20):
        loader.next_step(**args)
    per_step = (time.perf_counter() - start) / 20
    assert per_step < 0.02, f"64 x 256 tokens took {per_step * 1000:.1f} ms"


# --- properties across phases: weights, seqLen and world size change; saves at random points ---------------------


def source_token_counts(batches) -> dict[str, int]:
    counts: dict[str, int] = {}
    for inputs, _, _, sources in batches:
        for name in sources:
            counts[name] = counts.get(name, 0) + inputs.shape[1]
    return counts


@settings(max_examples=30, deadline=None)
@given(
    raw=st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0]), min_size=3, max_size=3).filter(any),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    seq_len=st.sampled_from([4, 8, 16]),
)
def test_each_source_share_of_tokens_converges_to_its_weight(sources, raw, sizes, seq_len):
    """After n sequences of a phase, every source has drawn within one sequence of weight x n (Megatron's blend),
    so its share of the phase's tokens is within 1/n of its weight, whatever the batch sizes were."""
    weights = dict(zip(sources, raw))
    shares = {name: w / sum(raw) for name, w in weights.items()}
    loader = PackedMixLoader(sources, 0)
    tokens = dict.fromkeys(sources, 0)
    n = 0
    for size in sizes:
        batch = global_batch([loader], **step_args(seq_len, size, size, 0, weights))
        for name, count in source_token_counts([batch]).items():
            tokens[name] += count
        n += size
        for name in sources:
            assert abs(tokens[name] / seq_len - shares[name] * n) < 1.0
            if shares[name] == 0:
                assert tokens[name] == 0
    assert loader.tokens_per_source == tokens


def test_shares_over_a_long_run(sources):
    loader = PackedMixLoader(sources, 0)
    weights = {"web": 0.62, "code": 0.33, "math": 0.05}
    batches = [global_batch([loader], **step_args(8, 64, 64, 0, weights)) for _ in range(60)]
    counts = source_token_counts(batches)
    total = sum(counts.values())
    for name, weight in weights.items():
        assert abs(counts[name] / total - weight) < 1 / (60 * 64)


def straight_stream(shards: TokenShards, name: str, seed: int, count: int) -> np.ndarray:
    from stagerun.trainer.data.loader import _SourceStream

    return _SourceStream(name, shards, seed).read(0, count)[0]


phase_strategy = st.tuples(
    st.lists(st.sampled_from([0.0, 0.1, 0.3, 1.0]), min_size=3, max_size=3).filter(any),  # weights
    st.sampled_from([8, 12, 16, 40]),  # seqLen (40: longer than the whole "math" source)
    st.sampled_from([1, 2, 4]),  # world size
    st.integers(1, 2),  # micro batch size
    st.integers(1, 2),  # gradient accumulation steps
    st.integers(1, 4),  # steps in the phase
)


@settings(max_examples=25, deadline=None)
@given(
    phases=st.lists(phase_strategy, min_size=1, max_size=4),
    saves=st.sets(st.integers(0, 15), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_phase_changes_continue_every_source_stream_exactly(sources, phases, saves, seed):
    """Weights, seqLen and world size change between phases, and the state is saved and restored (as JSON, by a
    new set of ranks) at random steps: the ranks' batches are always the one-rank batches, and each source's
    sequences, in global order, are its stream read straight through — no document repeated or skipped within an
    epoch, whatever changed between them."""
    names = list(sources)
    reference = PackedMixLoader(sources, seed)  # one rank, never restarted
    ranks = [PackedMixLoader(sources, seed)]
    drawn: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in names}
    step = 0
    for phase, (raw, seq_len, world, micro, accum, steps) in enumerate(phases):
        weights = dict(zip(names, raw))
        for _ in range(steps):
            if len(ranks) != world or step in saves:  # a restart: new world size or a resume from a checkpoint
                state = json.loads(json.dumps(ranks[0].state_dict()))
                ranks = [PackedMixLoader(sources, seed) for _ in range(world)]
                for loader in ranks:
                    loader.load_state_dict(state)
            args = step_args(seq_len, world * micro * accum, micro, phase, weights)
            expected = global_batch([reference], **args)
            batch = global_batch(ranks, **args)
            assert_same_batch(batch, expected)
            for inputs, targets, name in zip(batch[0], batch[1], batch[3]):
                drawn[name].append((inputs, targets))
            step += 1
    assert ranks[0].state_dict() == reference.state_dict()
    for name in names:
        if not drawn[name]:
            continue
        # Each sequence starts on the previous one's last target: positions are contiguous across every change.
        for (_, before), (after, _) in zip(drawn[name], drawn[name][1:]):
            assert before[-1] == after[0]
        stream = np.concatenate([inputs for inputs, _ in drawn[name]] + [drawn[name][-1][1][-1:]])
        assert np.array_equal(stream, straight_stream(sources[name], name, seed, len(stream)))
        # And so, within each epoch, every token of the source (they are all distinct) appears exactly once.
        total = sources[name].num_tokens
        everything = np.sort(sources[name].read(0, total))
        for epoch in range(len(stream) // total):
            assert np.array_equal(np.sort(stream[epoch * total : (epoch + 1) * total]), everything)
        tail = stream[(len(stream) // total) * total :]
        tail = tail[tail != EOS]
        assert len(np.unique(tail)) == len(tail)
