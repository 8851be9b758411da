"""Shard sets (stagerun-tokens/v2): round trip, dtype choice, atomic writes and a clear error for each defect."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from stagerun.core.spec.run import SourceSpec
from stagerun.trainer.data import DataError, TokenShards, train_tokenizer, write_shards
from stagerun.trainer.data.corpora import BUILTIN_DOCS, iter_documents
from stagerun.trainer.data.tokenizer import tokenizer_sha256

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Grüße! 你好 😀",
    "A document that mentions <|endoftext|> as plain text stays one document.",
    "x",
] + [f"document number {i} " * (i % 5 + 1) for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(iter_documents(SourceSpec(path=BUILTIN_DOCS, weight=1), max_bytes=100_000)) + DOCS
    return train_tokenizer(texts, 400)


def decoded_documents(tokenizer, shards: TokenShards) -> list[str]:
    starts = np.concatenate([[0], shards.doc_ends[:-1]])
    out = []
    for start, end in zip(starts, shards.doc_ends):
        tokens = shards.read(int(start), int(end))
        assert tokens[-1] == shards.eos_id  # every document ends with its EOS
        assert shards.eos_id not in tokens[:-1]
        out.append(tokenizer.decode(tokens[:-1].tolist()))
    return out


def test_round_trip(tokenizer, tmp_path):
    manifest = write_shards(DOCS, tokenizer, tmp_path / "set", progress=False)
    shards = TokenShards.open(tmp_path / "set")
    assert manifest["format"] == "stagerun-tokens/v2" and manifest["dtype"] == "uint16"
    assert shards.num_documents == len(DOCS) and shards.num_shards == 1
    assert shards.num_tokens == shards.doc_ends[-1] == manifest["numTokens"]
    assert shards.doc_ends.dtype == np.int64
    assert shards.read(0, 5).dtype == np.int64
    assert shards.tokenizer_sha256 == tokenizer_sha256(tokenizer)
    assert decoded_documents(tokenizer, shards) == DOCS
    assert not tokenizer.encode_special_tokens  # write_shards restores the tokenizer's setting


def test_multi_shard_reads_cross_boundaries(tokenizer, tmp_path):
    write_shards(DOCS, tokenizer, tmp_path / "one", progress=False)
    write_shards(DOCS, tokenizer, tmp_path / "many", shard_tokens=100, progress=False)
    one, many = TokenShards.open(tmp_path / "one"), TokenShards.open(tmp_path / "many")
    assert many.num_shards > 5
    assert np.array_equal(one.doc_ends, many.doc_ends)
    assert np.array_equal(one.read(0, one.num_tokens), many.read(0, many.num_tokens))
    boundary = int(many._shard_starts[2])
    assert np.array_equal(many.read(boundary - 7, boundary + 300), one.read(boundary - 7, boundary + 300))
    indices = np.array([boundary + 3, 0, boundary - 1, one.num_tokens - 1, 5])
    assert np.array_equal(many.take(indices), one.read(0, one.num_tokens)[indices])
    assert decoded_documents(tokenizer, many) == DOCS
    with pytest.raises(IndexError):
        many.read(0, many.num_tokens + 1)


def big_vocab_tokenizer(size: int) -> Tokenizer:
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.mark.parametrize("size, dtype", [(65536, "uint16"), (65537, "uint32"), (100_000, "uint32")])
def test_dtype_follows_vocab_size(tmp_path, size, dtype):
    tokenizer = big_vocab_tokenizer(size)
    top = size - 1
    manifest = write_shards([f"w1 w{top}", "w65535 w2"], tokenizer, tmp_path / "set", progress=False)
    assert manifest["dtype"] == dtype and manifest["vocabSize"] == size
    shards = TokenShards.open(tmp_path / "set")
    assert (tmp_path / "set" / "shard-00000.bin").stat().st_size == shards.num_tokens * (2 if dtype == "uint16" else 4)
    assert shards.read(0, shards.num_tokens).tolist() == [1, top, 0, 65535, 2, 0]


@pytest.fixture
def good_set(tokenizer, tmp_path):
    write_shards(DOCS, tokenizer, tmp_path / "set", shard_tokens=400, progress=False)
    return tmp_path / "set"


def edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_truncated_token_file(good_set):
    path = good_set / "shard-00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard-00001\.bin: \d+ bytes, expected \d+ .*truncated.*re-create"):
        TokenShards.open(good_set)


def test_missing_token_file(good_set):
    (good_set / "shard-00000.bin").unlink()
    with pytest.raises(DataError, match=r"shard-00000\.bin: missing .*shards\[0\]"):
        TokenShards.open(good_set)


def test_index_not_monotonic(good_set):
    path = good_set / "shard-00000.idx"
    ends = np.fromfile(path, dtype="<i8")
    ends[[1, 2]] = ends[[2, 1]]
    ends.tofile(path)
    with pytest.raises(DataError, match=r"shard-00000\.idx: document end offsets must increase, entry 2"):
        TokenShards.open(good_set)


def test_index_not_ending_at_num_tokens(good_set):
    path = good_set / "shard-00000.idx"
    ends = np.fromfile(path, dtype="<i8")
    ends[-1] -= 1
    ends.tofile(path)
    with pytest.raises(DataError, match=r"shard-00000\.idx: the last document ends at"):
        TokenShards.open(good_set)


def test_manifest_missing_means_incomplete(good_set):
    (good_set / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json not found: .*not a complete shard set"):
        TokenShards.open(good_set)


def test_manifest_garbled(good_set):
    (good_set / "manifest.json").write_text('{"format": "stagerun-tok')
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON .*re-create"):
        TokenShards.open(good_set)


def test_wrong_format_string(good_set):
    edit_manifest(good_set, format="stagerun-tokens/v9")
    expected = r"manifest\.json: format is 'stagerun-tokens/v9', expected 'stagerun-tokens/v1'"
    with pytest.raises(DataError, match=expected):
        TokenShards.open(good_set)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dtype": "int8"}, "dtype 'int8' is not one of uint16, uint32"),
        ({"numTokens": 3}, "numTokens is 3 but its shards add up to"),
        ({"eosId": -1}, "eosId must be a non-negative integer"),
        ({"shards": {"a": 1}}, "shards must be a list of objects"),
    ],
)
def test_inconsistent_manifest(good_set, changes, message):
    edit_manifest(good_set, **changes)
    with pytest.raises(DataError, match=message):
        TokenShards.open(good_set)


def test_interrupted_write_leaves_no_set_and_keeps_the_old_one(tokenizer, tmp_path):
    def failing_docs():
        yield from DOCS[:50]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError):
        write_shards(failing_docs(), tokenizer, tmp_path / "new", shard_tokens=50, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder

    write_shards(DOCS[:3], tokenizer, tmp_path / "old", progress=False)
    with pytest.raises(RuntimeError):
        write_shards(failing_docs(), tokenizer, tmp_path / "old", progress=False)
    assert decoded_documents(tokenizer, TokenShards.open(tmp_path / "old")) == DOCS[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_rewrite_replaces_a_set(tokenizer, tmp_path):
    write_shards(DOCS, tokenizer, tmp_path / "set", shard_tokens=50, progress=False)
    write_shards(DOCS[:2], tokenizer, tmp_path / "set", progress=False)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "manifest.json",
        "shard-00000.bin",
        "shard-00000.idx",
    ]
    assert decoded_documents(tokenizer, TokenShards.open(tmp_path / "set")) == DOCS[:2]


def test_fsspec_url_is_written_and_read_through_a_cache(tokenizer, tmp_path):
    url = "memory://stagerun-test/shards"
    write_shards(DOCS, tokenizer, url, shard_tokens=300, progress=False, extra={"source": {"path": "x"}})
    shards = TokenShards.open(url, cache_dir=tmp_path / "cache")
    assert shards.path.is_relative_to(tmp_path / "cache") and shards.source == url
    assert shards.manifest["source"] == {"path": "x"}
    assert decoded_documents(tokenizer, shards) == DOCS
    assert TokenShards.open(url, cache_dir=tmp_path / "cache").path == shards.path  # copied once
    with pytest.raises(DataError, match="memory://stagerun-test/nothing/manifest.json not found"):
        TokenShards.open("memory://stagerun-test/nothing", cache_dir=tmp_path / "cache")
