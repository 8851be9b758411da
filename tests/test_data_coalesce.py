"""Coalescing a step's byte ranges (remote_io.coalesce): fewer requests, the same bytes back, and never more than
1 + OVERFETCH times the bytes the ranges need."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
from test_data_loader import random_docs, write_token_set

from stagerun.trainer.data import PackedMixLoader, TokenShards, remote_io
from stagerun.trainer.data.remote_io import RemoteFiles, coalesce
from stagerun.trainer.data.shard_verify import upgrade_manifest


def union_bytes(starts: np.ndarray, ends: np.ndarray) -> int:
    covered = np.zeros(int(ends.max()) + 1, dtype=bool)
    for s, e in zip(starts.tolist(), ends.tolist()):
        covered[s:e] = True
    return int(covered.sum())


def random_ranges(rng: np.random.Generator, count: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, span, size=count)
    return starts, starts + rng.integers(1, 64, size=count)  # overlapping, touching and apart, in any order


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_kept_and_every_range_is_inside_its_merge(seed):
    rng = np.random.default_rng(seed)
    starts, ends = random_ranges(rng, 400, 40_000)
    merged_starts, merged_ends, owner = coalesce(starts, ends)
    needed = union_bytes(starts, ends)
    assert (merged_ends - merged_starts).sum() <= (1 + remote_io.OVERFETCH) * needed
    assert np.all(merged_starts[owner] <= starts) and np.all(ends <= merged_ends[owner])
    assert np.all(merged_starts[1:] > merged_ends[:-1])  # sorted, disjoint, never touching: each one request
    # Without a budget only overlapping and touching ranges merge: exactly the union's pieces, nothing extra.
    exact_starts, exact_ends, _ = coalesce(starts, ends, overfetch=0.0)
    assert (exact_ends - exact_starts).sum() == needed
    assert len(merged_starts) < len(exact_starts)  # the budget bought fewer requests
    # The gaps merged are the cheapest ones: any gap left open is at least as wide as every gap closed.
    gaps = exact_starts[1:] - exact_ends[:-1]
    closed = ~np.isin(exact_starts[1:], merged_starts)
    assert closed.any() and (~closed).any()
    assert gaps[~closed].min() >= gaps[closed].max()
    # A budget as large as the file's span: one request.
    assert len(coalesce(starts, ends, overfetch=1e9)[0]) == 1


def test_edge_cases():
    assert [len(a) for a in coalesce([], [])] == [0, 0, 0]
    s, e, owner = coalesce([10, 0, 5], [20, 5, 12])  # touching and overlapping: one range, no overfetch
    assert (s.tolist(), e.tolist(), owner.tolist()) == ([0], [20], [0, 0, 0])
    s, e, owner = coalesce([0, 100], [10, 110])  # a 90-byte gap costs more than 0.2 x 20 bytes: kept apart
    assert (s.tolist(), e.tolist(), owner.tolist()) == ([0, 100], [10, 110], [0, 1])


class Counting:
    """A filesystem whose ``cat_ranges`` calls and ranges are counted."""

    def __init__(self, fs):
        self.fs, self.calls, self.ranges = fs, 0, 0

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self.calls += 1
        self.ranges += len(paths)
        return self.fs.cat_ranges(paths, starts, ends, **kwargs)


def test_read_many_returns_the_same_bytes_in_one_batch():
    rng = np.random.default_rng(7)
    memory = fsspec.filesystem("memory")
    blobs = {name: rng.integers(0, 256, size=50_000, dtype=np.uint8).tobytes() for name in ("a.bin", "b.bin")}
    for name, blob in blobs.items():
        memory.pipe_file(f"/coalesce/{name}", blob)
    counting = Counting(memory)
    files = RemoteFiles(counting, "/coalesce", "memory://coalesce", {n: len(b) for n, b in blobs.items()})
    parts = [(name, *map(np.ndarray.tolist, random_ranges(rng, 300, 49_000))) for name in blobs]
    before = remote_io.STATS.bytes_fetched
    out = files.read_many(parts)
    assert out == [[blobs[name][s:e] for s, e in zip(starts, ends)] for name, starts, ends in parts]
    fetched = remote_io.STATS.bytes_fetched - before
    needed = sum(union_bytes(np.array(starts), np.array(ends)) for _, starts, ends in parts)
    assert fetched <= (1 + remote_io.OVERFETCH) * needed
    assert counting.calls == 1 and counting.ranges < 600 * 0.8


def test_a_step_is_one_request_batch_and_the_batches_are_unchanged(tmp_path):
    folder = tmp_path / "set"
    write_token_set(folder, random_docs(3, 4000, 1, max_len=12), tokens_per_shard=8_000)
    upgrade_manifest(folder)
    memory = fsspec.filesystem("memory")
    for path in sorted(folder.iterdir()):
        memory.pipe_file(f"/step-set/{path.name}", path.read_bytes())
    remote = TokenShards.open("memory://step-set", cache_dir=tmp_path / "cache", verify="off")
    assert remote.num_shards > 1  # a step reads several shards: still one batch
    counting = Counting(remote.files.files.fs)
    remote.files.files.fs = counting
    args = dict(phase_index=0, weights={"a": 1.0}, seq_len=64, global_sequences=16, micro_batch_size=2)
    loaders = [PackedMixLoader({"a": shards}, 11) for shards in (remote, TokenShards.open(folder))]
    for _ in range(5):
        got, want = (loader.next_step(dp_rank=1, dp_size=2, **args) for loader in loaders)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
            assert np.array_equal(a.doc_ids, b.doc_ids) and a.sources == b.sources
    assert counting.calls == 5
