"""Remote shard sets read in place (issue 15 item 1) from a real S3 API (moto's server on 127.0.0.1): only the
manifest and index files reach the node cache, the batches fetch only the token ranges they need, transient errors
are retried and counted, permanent ones stop with the URL."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_loader import random_docs, write_token_set
from test_data_remote import BUCKET, s3  # noqa: F401 - the moto fixture

from stagerun.trainer.data import DataError, PackedMixLoader, TokenShards, remote_io
from stagerun.trainer.data.readahead import WindowReader, visiting_order
from stagerun.trainer.data.shard_verify import upgrade_manifest

ARGS = dict(phase_index=0, weights={"web": 1.0}, seq_len=64, global_sequences=8, micro_batch_size=2)


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inplace") / "set"
    write_token_set(folder, random_docs(9, 3000, 1, max_len=60), tokens_per_shard=20_000)
    upgrade_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def remote_url(s3, local_set):  # noqa: F811
    prefix = "inplace/web"
    for path in sorted(local_set.iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def token_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def draw(shards, steps: int, dp_size: int = 1, rank: int = 0) -> list[np.ndarray]:
    loader = PackedMixLoader({"web": shards}, 5)
    return [
        np.concatenate([mb.inputs for mb in loader.next_step(dp_rank=rank, dp_size=dp_size, **ARGS)])
        for _ in range(steps)
    ]


def test_loads_without_a_full_download(remote_url, local_set, tmp_path):
    before = remote_io.STATS.bytes_fetched
    remote = TokenShards.open(remote_url, cache_dir=tmp_path / "cache", verify="off")
    cached = {p.name for p in remote.path.iterdir()}
    assert "manifest.json" in cached and not any(name.endswith(".bin") for name in cached)  # no token file copied
    index_bytes = sum(p.stat().st_size for p in local_set.glob("*.idx"))
    assert remote_io.STATS.bytes_fetched - before == index_bytes
    local = TokenShards.open(local_set)
    start = remote_io.STATS.bytes_fetched
    batches = draw(remote, 6, dp_size=2, rank=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, draw(local, 6, dp_size=2, rank=1)))
    fetched = remote_io.STATS.bytes_fetched - start
    needed = 6 * 4 * (64 + 1) * remote.dtype.itemsize  # this rank's 4 sequences of 65 tokens per step
    assert fetched <= 1.2 * needed and fetched < token_bytes(local_set) / 4


@pytest.mark.parametrize("mode", ["ranges", "blocks"])
def test_survives_transient_errors(remote_url, local_set, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(remote_io, "BACKOFF_SECONDS", 0.001)
    monkeypatch.setenv("STAGERUN_DATA_READ_AHEAD", mode)
    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", "4000")  # several windows: several request batches
    remote = TokenShards.open(remote_url, cache_dir=tmp_path / "cache", verify="off")
    fs = remote.files.files.fs
    real, calls, injected = fs.cat_ranges, [], []

    def flaky(paths, starts, ends, **kwargs):
        calls.append(len(paths))
        if len(calls) % 3 == 1:  # the whole request fails: a reset connection
            injected.append("reset")
            raise ConnectionResetError("connection reset by peer")
        results = real(paths, starts, ends, **kwargs)
        if len(calls) % 3 == 2 and len(results) > 1:  # one range of the batch fails: a 503
            injected.append("503")
            results[0] = OSError("503 Service Unavailable")
        return results

    monkeypatch.setattr(fs, "cat_ranges", flaky)
    retries = remote_io.STATS.retries
    batches = draw(remote, 12)
    assert all(np.array_equal(a, b) for a, b in zip(batches, draw(TokenShards.open(local_set), 12)))
    assert len(injected) >= 3 and remote_io.STATS.retries - retries == len(injected)


def test_permanent_errors_name_the_url(s3, remote_url, local_set, tmp_path, monkeypatch):  # noqa: F811
    prefix = "inplace/broken"
    for path in sorted(local_set.iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    url = f"s3://{BUCKET}/{prefix}"
    shards = TokenShards.open(url, cache_dir=tmp_path / "cache", verify="off")
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/shard-00000.bin")
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/shard-00001.bin")
    with pytest.raises(DataError, match=rf"{url}/shard-0000\d\.bin: not found .*restore it, or re-create it"):
        for _ in range(20):
            draw(shards, 3)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/shard-00000.bin", Body=b"\0" * 10)
    with pytest.raises(DataError, match=rf"{url}/shard-00000\.bin: 10 bytes, expected \d+ .*truncated"):
        TokenShards.open(url, cache_dir=tmp_path / "cache2")


def test_remote_hashes_are_checked_sampled(s3, local_set, tmp_path):  # noqa: F811
    prefix = "inplace/flipped"
    for path in sorted(local_set.iterdir()):
        body = path.read_bytes()
        if path.name == "shard-00003.bin":
            body = body[:4] + (1).to_bytes(2, "little") + body[6:]
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=body)
    with pytest.raises(DataError, match=r"flipped/shard-00003\.bin: does not match its sha256"):
        TokenShards.open(f"s3://{BUCKET}/{prefix}", cache_dir=tmp_path / "cache", verify="all")


def test_node_cache_is_bounded_and_serves_repeat_reads(remote_url, local_set, tmp_path, monkeypatch):
    monkeypatch.setenv("STAGERUN_DATA_CACHE_BYTES", str(64 * 1024))
    monkeypatch.setenv("STAGERUN_DATA_CACHE_DIR", str(tmp_path / "chunks"))
    # Ranged reads: whole blocks (what `auto` picks with a cache) would scan past a cache smaller than a window.
    monkeypatch.setenv("STAGERUN_DATA_READ_AHEAD", "ranges")
    monkeypatch.setattr(remote_io, "CHUNK_BYTES", 4096)
    remote = TokenShards.open(remote_url, cache_dir=tmp_path / "cache", verify="off")
    remote.files.files.cache.chunk = 4096
    hits = remote_io.STATS.cache_hit_bytes
    first = draw(remote, 3)
    again = draw(remote, 3)  # the same windows: served from the chunk cache
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert remote_io.STATS.cache_hit_bytes > hits
    for _ in range(6):
        draw(remote, 12)
    remote.files.files.cache.evict()
    assert sum(p.stat().st_size for p in (tmp_path / "chunks").iterdir()) <= 64 * 1024


def test_whole_blocks_a_window_ahead_give_the_same_batches(remote_url, local_set, tmp_path, monkeypatch):
    """Read-ahead of whole blocks (dp 1): the batches of ranged reads, each block fetched once per epoch, also when a
    step is longer than an epoch (it then reads several windows at once)."""
    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", "3000")
    remote = TokenShards.open(remote_url, cache_dir=tmp_path / "cache", verify="off")
    local = TokenShards.open(local_set)
    for seq_len, sequences, steps in ((64, 8, 30), (2048, 64, 3)):  # 3 steps of 131K tokens: > 1 epoch each
        args = dict(ARGS, seq_len=seq_len, global_sequences=sequences, micro_batch_size=sequences)
        loaders = [PackedMixLoader({"web": s}, 5) for s in (remote, local)]
        start, requests = remote_io.STATS.bytes_fetched, remote_io.STATS.requests
        for _ in range(steps):
            a, b = (np.concatenate([mb.inputs for mb in ld.next_step(dp_rank=0, dp_size=1, **args)]) for ld in loaders)
            assert np.array_equal(a, b)
        consumed = steps * sequences * seq_len * remote.dtype.itemsize
        epochs = -(-steps * sequences * seq_len // remote.num_tokens) + 1  # + the window read ahead
        assert remote_io.STATS.bytes_fetched - start <= consumed + 2 * token_bytes(local_set) * epochs
        assert remote_io.STATS.requests - requests < steps * sequences  # a few large reads, not one per document
    assert isinstance(loaders[0]._streams[0].reader, WindowReader)


@pytest.mark.parametrize("dp", [1, 2])
def test_whole_windows_give_the_same_mixed_and_packed_batches(s3, tmp_path, monkeypatch, dp):  # noqa: F811
    """The whole-window reader lays each window out in visiting order and copies a step's rows of a source as one
    span: pretrain steps mixing a masked chat set with a text set (rows of two sources interleaved), sft steps with
    text replay, and dpo steps all give, on every rank, exactly the batches of gathering by index from a local copy."""
    from test_data_loader_post_training import args, chats, pairs, same_batches, text_docs, write_set

    monkeypatch.setenv("STAGERUN_DATA_BLOCK_TOKENS", "96")
    monkeypatch.setenv("STAGERUN_DATA_WINDOW_BLOCKS", "2")
    monkeypatch.setenv("STAGERUN_DATA_READ_AHEAD", "blocks")  # also at dp 2, where `auto` reads ranges
    docs = {"chat": (chats(1, 150, 1, long_every=17), "chat"), "web": (text_docs(200, 10_000_000), "text")}
    docs["prefs"] = (pairs(2, 80), "preference")
    local, remote = {}, {}
    for name, (content_docs, content) in docs.items():
        local[name] = write_set(tmp_path / "local" / name, content_docs, content, docs_per_shard=40)
        for path in sorted((tmp_path / "local" / name).iterdir()):
            s3.put_object(Bucket=BUCKET, Key=f"windows/{name}/{path.name}", Body=path.read_bytes())
        remote[name] = TokenShards.open(f"s3://{BUCKET}/windows/{name}", cache_dir=tmp_path / "cache", verify="off")
    plan = [
        ("pretrain", {"chat": 0.4, "web": 0.6}, 3, 0),
        ("sft", {"chat": 0.7, "web": 0.3}, 4, 1),
        ("dpo", {"prefs": 1.0}, 4, 2),
    ]
    pairs_seen = 0
    for kind, weights, count, phase in plan:
        names = list(weights)
        loaders = {
            where: [PackedMixLoader({n: sets[n] for n in names}, 3) for _ in range(dp)]
            for where, sets in (("local", local), ("remote", remote))
        }
        for _ in range(count):
            step = args(kind, weights, seq_len=32, sequences=8, phase=phase)
            got = {
                where: [mb for r, ld in enumerate(lds) for mb in ld.next_step(dp_rank=r, dp_size=dp, **step)]
                for where, lds in loaders.items()
            }
            assert same_batches(got["remote"], got["local"]), (kind, dp)
            pairs_seen += sum(mb.num_pairs for mb in got["remote"])
        assert all(isinstance(s.reader, WindowReader) for ld in loaders["remote"] for s in ld._streams)
    assert pairs_seen > 0


@pytest.mark.parametrize("mean", [4, 600])  # the vectorised gather of short documents, the slice copies of long ones
def test_visiting_order_lays_documents_out_in_order(mean):
    rng = np.random.default_rng(mean)
    lengths = rng.integers(1, 2 * mean, size=300).astype(np.int64)
    fetched = rng.integers(0, 2**16, size=int(lengths.sum()), dtype=np.uint16)
    src = (np.cumsum(lengths) - lengths)[order := rng.permutation(len(lengths))]
    expected = np.concatenate([fetched[a : a + n] for a, n in zip(src, lengths[order])])
    got = visiting_order(fetched, src, lengths[order])
    assert got.dtype == fetched.dtype and np.array_equal(got, expected)
    assert len(visiting_order(fetched, src[:0], lengths[:0])) == 0
