"""`stagerun tokenize` / `stagerun tokenizer train`: text, JSONL and Parquet into shard sets, in parallel processes,
split big files, resumable after an interruption, with the per-input counts in the manifest."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerun.trainer.cli import main
from stagerun.trainer.data import DataError, PackedMixLoader, TokenShards, load_tokenizer, train_tokenizer, write_shards
from stagerun.trainer.data import tokenize as tokenize_module
from stagerun.trainer.data.readers import BadRecords, InputStats, expand_inputs, read_texts
from stagerun.trainer.data.tokenize import auto_unit_bytes, plan_units, tokenize

WORDS = ["alpha", "beta", "gamma", "delta", "Grüße", "你好", "😀", "def f(x):\n    return x", "1234", "<|endoftext|>"]


def make_docs(seed: int, count: int, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words)))) for i in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(make_docs(0, 300) * 3, 400, path)
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=row_group_size)
    return path


def documents(shards: TokenShards, tokenizer) -> list[str]:
    starts = np.concatenate([[0], shards.doc_ends[:-1]])
    out = []
    for a, b in zip(starts, shards.doc_ends):
        tokens = shards.read(int(a), int(b))
        assert tokens[-1] == shards.eos_id and shards.eos_id not in tokens[:-1]
        out.append(tokenizer.decode(tokens[:-1].tolist()))
    return out


def same_set(a: TokenShards, b: TokenShards) -> bool:
    return np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens)) and np.array_equal(a.doc_ends, b.doc_ends)


@pytest.fixture
def corpus(tmp_path):
    """JSONL (two files), a folder of text files and a Parquet file with several row groups."""
    web = [make_docs(1, 150), make_docs(2, 120)]
    texts = make_docs(3, 5, max_words=200)
    rows = make_docs(4, 230)
    write_jsonl(tmp_path / "in" / "web" / "a.jsonl", web[0])
    write_jsonl(tmp_path / "in" / "web" / "b.jsonl", web[1])
    for i, text in enumerate(texts):
        (tmp_path / "in" / "texts").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "texts" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    write_parquet(tmp_path / "in" / "rows.parquet", rows)
    inputs = [
        str(tmp_path / "in" / "web" / "*.jsonl"),
        str(tmp_path / "in" / "texts"),
        str(tmp_path / "in" / "rows.parquet"),
    ]
    return inputs, web[0] + web[1] + texts + rows, [len(web[0]) + len(web[1]), len(texts), len(rows)]


def test_documents_in_order_and_same_tokens_as_write_shards(tokenizer_path, corpus, tmp_path):
    inputs, expected, per_input = corpus
    tokenizer = load_tokenizer(tokenizer_path)
    result = tokenize(inputs, tokenizer_path, tmp_path / "out", processes=1, progress=False)
    shards = TokenShards.open(tmp_path / "out")
    assert documents(shards, tokenizer) == expected
    write_shards(expected, tokenizer, tmp_path / "reference", progress=False)
    assert same_set(shards, TokenShards.open(tmp_path / "reference"))
    manifest = result.manifest
    assert manifest["format"] == "stagerun-tokens/v2" and manifest["dtype"] == "uint16"
    info = manifest["tokenize"]
    assert [i["numDocuments"] for i in info["inputs"]] == per_input
    assert [i["files"] for i in info["inputs"]] == [2, 5, 1]
    assert sum(i["numTokens"] for i in info["inputs"]) == manifest["numTokens"] == shards.num_tokens
    assert info["skippedRecords"] == info["skippedFiles"] == info["emptyDocuments"] == 0
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "in").rglob("*") if p.is_file())
    assert result.tokens == manifest["numTokens"] and result.tokens_per_second > 0 and result.mb_per_second > 0
    assert "M tokens/s" in result.report() and "MB/s" in result.report()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []  # work dir gone


def test_processes_and_unit_sizes_give_the_same_set(tokenizer_path, tmp_path):
    """One big JSONL file and one Parquet file are split into many units; 2 processes give the 1-process set."""
    docs = make_docs(5, 600)
    write_jsonl(tmp_path / "big.jsonl", docs)
    write_parquet(tmp_path / "big.parquet", docs, row_group_size=20)
    inputs = [str(tmp_path / "big.jsonl"), str(tmp_path / "big.parquet")]
    one = tokenize(inputs, tokenizer_path, tmp_path / "one", processes=1, unit_bytes=10**9, progress=False)
    many = tokenize(
        inputs, tokenizer_path, tmp_path / "many", processes=2, unit_bytes=8 * 1024, progress=False, shard_tokens=500
    )
    assert one.units == 1 and many.units > 8
    files = expand_inputs(inputs)
    units = plan_units(files, unit_bytes=8 * 1024, tokenizer_sha="x", text_field="text", shard_tokens=500)
    assert sum(1 for u in units if u.pieces[0].file.format == "jsonl") > 4  # the one JSONL file is split
    assert sum(1 for u in units if u.pieces[0].row_groups is not None) > 2  # and the Parquet file too
    a, b = TokenShards.open(tmp_path / "one"), TokenShards.open(tmp_path / "many")
    assert b.num_shards > a.num_shards
    assert same_set(a, b)
    assert documents(b, load_tokenizer(tokenizer_path)) == docs + docs
    assert many.manifest["tokenize"]["inputs"] == one.manifest["tokenize"]["inputs"]


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="ab\n é", max_size=12).map(lambda s: s.replace("\n", "")), min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    trailing_newline=st.booleans(),
)
def test_byte_ranges_read_every_line_exactly_once(tmp_path_factory, lines, cuts, trailing_newline):
    folder = tmp_path_factory.mktemp("ranges")
    docs = [f"{i}{line}" for i, line in enumerate(lines)]
    data = "\n".join(json.dumps({"text": d}) for d in docs) + ("\n" if trailing_newline else "")
    (folder / "f.jsonl").write_text(data, encoding="utf-8")
    (file,) = expand_inputs([str(folder / "f.jsonl")])
    edges = sorted({0, file.size, *(c for c in cuts if c < file.size)})
    got = []
    for start, end in zip(edges, edges[1:]):
        got.extend(read_texts(file, start=start, end=end))
    assert got == docs


def test_auto_unit_size_is_a_stable_power_of_two():
    assert auto_unit_bytes(0) == auto_unit_bytes(10**6) == 2**20
    assert auto_unit_bytes(10 * 2**30) == 32 * 2**20  # 10 GiB: 320 units of 32 MiB
    assert auto_unit_bytes(10 * 2**30 + 12345) == auto_unit_bytes(10 * 2**30)
    assert auto_unit_bytes(10**15) == 256 * 2**20


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, count: int) -> list:
    """Make the count+1-th unit fail (as if the machine went away); returns the list of units run."""
    real = tokenize_module.run_unit
    calls = []

    def run_unit(unit, *args, **kwargs):
        calls.append(unit.key)
        if len(calls) > count:
            raise Interrupt("interrupted")
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "run_unit", run_unit)
    return calls


def test_an_interrupted_run_is_no_shard_set_and_resumes(tokenizer_path, corpus, tmp_path, monkeypatch):
    inputs, expected, _ = corpus
    args = dict(processes=1, unit_bytes=4096, progress=False)
    reference = tokenize(inputs, tokenizer_path, tmp_path / "reference", **args)
    calls = interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupt):
        tokenize(inputs, tokenizer_path, tmp_path / "out", **args)
    assert len(calls) == 4
    with pytest.raises(DataError, match="not a complete shard set"):
        TokenShards.open(tmp_path / "out")
    assert len(list((tmp_path / "out" / ".stagerun-tokenize" / "units").iterdir())) == 3
    # A committed unit whose shard file was damaged since is done again.
    damaged = sorted((tmp_path / "out").glob("shard-*.bin"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-2])

    monkeypatch.undo()
    calls = interrupt_after(monkeypatch, 10**6)
    result = tokenize(inputs, tokenizer_path, tmp_path / "out", **args)
    assert len(calls) == reference.units - 2 and result.reused_units == 2
    assert "resumed: 2 of" in result.report()
    assert same_set(TokenShards.open(tmp_path / "out"), TokenShards.open(tmp_path / "reference"))
    assert documents(TokenShards.open(tmp_path / "out"), load_tokenizer(tokenizer_path)) == expected
    assert result.manifest["tokenize"]["inputs"] == reference.manifest["tokenize"]["inputs"]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {p.name for p in (tmp_path / "reference").iterdir()}

    # Done: the same command again does nothing; other inputs into the same folder are refused.
    again = tokenize(inputs, tokenizer_path, tmp_path / "out", **args)
    assert again.reused_units == again.units and len(calls) == reference.units - 2
    with pytest.raises(DataError, match="already holds a complete shard set .* choose another --out"):
        tokenize(inputs[:1], tokenizer_path, tmp_path / "out", **args)


def test_a_changed_input_redoes_only_its_units(tokenizer_path, tmp_path, monkeypatch):
    for name in "abc":
        write_jsonl(tmp_path / "in" / f"{name}.jsonl", make_docs(ord(name), 40))
    inputs = [str(tmp_path / "in" / "*.jsonl")]
    args = dict(processes=1, unit_bytes=1024, progress=False)
    units = plan_units(expand_inputs(inputs), unit_bytes=1024, tokenizer_sha="x", text_field="text", shard_tokens=1)
    of_a = sum(1 for u in units if u.pieces[0].file.url.endswith("a.jsonl"))
    assert of_a >= 2 and all(len(u.pieces) == 1 for u in units)
    interrupt_after(monkeypatch, of_a + 1)  # a.jsonl and the first unit of b.jsonl are committed
    with pytest.raises(Interrupt):
        tokenize(inputs, tokenizer_path, tmp_path / "out", **args)
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(99, 40))  # a.jsonl changes: only its units are redone
    monkeypatch.undo()
    result = tokenize(inputs, tokenizer_path, tmp_path / "out", **args)
    assert result.reused_units == 1
    expected = make_docs(99, 40) + make_docs(ord("b"), 40) + make_docs(ord("c"), 40)
    assert documents(TokenShards.open(tmp_path / "out"), load_tokenizer(tokenizer_path)) == expected
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"manifest.json"} | {n for s in result.manifest["shards"] for n in (s["tokens"], s["index"])}


def test_uint32_for_big_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    write_jsonl(tmp_path / "a.jsonl", ["w1 w69999", "w65536 w2"])
    result = tokenize([str(tmp_path / "a.jsonl")], tokenizer, tmp_path / "out", processes=1, progress=False)
    shards = TokenShards.open(tmp_path / "out")
    assert result.manifest["dtype"] == "uint32"
    assert shards.read(0, shards.num_tokens).tolist() == [1, 69999, 0, 65536, 2, 0]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_train_then_tokenize_then_load(corpus, tmp_path):
    inputs, expected, _ = corpus
    args = [arg for path in inputs for arg in ("--input", path)]
    code, out, err = run_cli(
        "tokenizer",
        "train",
        *args,
        "--vocab-size",
        "600",
        "--out",
        str(tmp_path / "tok.json"),
        "--max-bytes",
        "200K",
        "--no-progress",
    )
    assert code == 0, err
    assert "byte-level BPE of " in out
    assert "note: --vocab-size asked for 600 tokens, but the text only had" in out  # a small, repetitive corpus
    tokenizer = load_tokenizer(tmp_path / "tok.json")
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<|pad|>") == 1
    digits = [t for t in tokenizer.encode("in 2024 and 99").tokens if any(c.isdigit() for c in t)]
    assert digits == ["2", "0", "2", "4", "9", "9"]  # one token per digit
    code_text = "def f(x):\n        return x\n"
    assert tokenizer.decode(tokenizer.encode(code_text).ids) == code_text

    code, out, err = run_cli(
        "tokenize",
        *args,
        "--tokenizer",
        str(tmp_path / "tok.json"),
        "--out",
        str(tmp_path / "out"),
        "--processes",
        "2",
        "--unit-bytes",
        "16K",
        "--no-progress",
    )
    assert code == 0, err
    assert "throughput:" in out and "tokens/s" in out and "MB/s" in out and "2 processes" in out
    shards = TokenShards.open(tmp_path / "out")
    assert documents(shards, tokenizer) == expected
    loader = PackedMixLoader({"all": shards}, 0)
    (batch,) = loader.next_step(
        phase_index=0, weights={"all": 1.0}, seq_len=32, global_sequences=4, dp_rank=0, dp_size=1, micro_batch_size=4
    )
    assert batch.inputs.shape == (4, 32)

    code, out, err = run_cli(
        "tokenize",
        "--input",
        str(tmp_path / "nothing-*.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok.json"),
        "--out",
        str(tmp_path / "x"),
        "--no-progress",
    )
    assert code == 1 and "nothing-*.jsonl matches no files: check --input" in err


def test_tokenizer_train_shares_bytes_between_inputs(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["aaaa " * 50] * 100)
    write_jsonl(tmp_path / "b.jsonl", ["bbbb " * 50] * 100)
    from stagerun.trainer.data.tokenizer import train_from_inputs

    _, report = train_from_inputs(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        300,
        tmp_path / "tok.json",
        max_bytes=5000,
        progress=False,
    )
    assert report.bytes == 5000 and report.documents == 20  # 10 documents of 250 bytes from each input


def test_readers_count_what_they_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "", "two"])
    (file,) = expand_inputs([str(tmp_path / "a.jsonl")])
    stats = InputStats()
    assert list(read_texts(file, stats=stats, bad=BadRecords())) == ["one", "two"]
    assert (stats.documents, stats.empty, stats.bytes) == (2, 1, file.size)


def test_records_carry_their_provenance(tmp_path):
    from stagerun.trainer.data import read_records

    write_jsonl(tmp_path / "a.jsonl", ["one", "", "three"])
    write_parquet(tmp_path / "b.parquet", ["x", "y"])
    (tmp_path / "c.txt").write_text("whole file")
    found = [(r.where, r.text) for f in expand_inputs([str(tmp_path)]) for r in read_records(f)]
    assert found == [
        (f"{tmp_path / 'a.jsonl'}:1", "one"),
        (f"{tmp_path / 'a.jsonl'}:3", "three"),
        (f"{tmp_path / 'b.parquet'}: row 0", "x"),
        (f"{tmp_path / 'b.parquet'}: row 1", "y"),
        (str(tmp_path / "c.txt"), "whole file"),
    ]


def test_registering_the_commands_loads_no_data_module():
    """`stagerun` builds its parser on every call, also in the operator's image (no numpy, no tokenizers)."""
    import subprocess
    import sys

    from stagerun.trainer.data import commands, readers

    assert commands.FORMATS == readers.FORMATS
    code = (
        "import sys; from stagerun.trainer.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('stagerun.trainer.data') or m.split('.')[0] in "
        "('numpy', 'tokenizers', 'torch')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # The argument parsers only: tokenizer_commands holds the chat-template options (it imports core only).
    assert loaded.strip() == (
        "['stagerun.trainer.data', 'stagerun.trainer.data.commands', 'stagerun.trainer.data.tokenizer_commands']"
    )


def test_the_hostile_input_options_default_to_the_library_bounds():
    from stagerun.core.spec.quantities import parse_count
    from stagerun.trainer.data import commands, tokenize_units

    assert parse_count(commands.DEFAULT_MAX_RECORD_BYTES) == tokenize_units.DEFAULT_MAX_RECORD_BYTES
    assert commands.DEFAULT_MAX_EXPANSION == tokenize_units.DEFAULT_MAX_EXPANSION
    # Resuming keeps working for runs at the default: the limit enters a unit's key only when changed.
    (file,) = expand_inputs([__file__])
    keys = [
        plan_units([file], unit_bytes=2**20, tokenizer_sha="x", text_field="text", shard_tokens=9, **extra)[0].key
        for extra in ({}, {"max_record_bytes": tokenize_units.DEFAULT_MAX_RECORD_BYTES}, {"max_record_bytes": 5})
    ]
    assert keys[0] == keys[1] != keys[2]
