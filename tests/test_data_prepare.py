"""prepare_data end to end (tokenizer training, pretokenizing, reuse on resume) and the text corpora it reads."""

from __future__ import annotations

import gzip
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from stagerun.core.spec import resolve_run
from stagerun.core.spec.run import SourceSpec
from stagerun.trainer.data import (
    DataError,
    PackedMixLoader,
    TokenShards,
    iter_documents,
    load_tokenizer,
    prepare,
    train_tokenizer,
)
from stagerun.trainer.data.corpora import BUILTIN_CODE, BUILTIN_DOCS, CorpusStats, stdlib_source_files
from stagerun.trainer.data.prepare import prepare_data

SOURCE_BYTES = 40_000


def manifest(sources: dict, tokenizer: dict, model_vocab: int = 512) -> dict:
    return {
        "apiVersion": "stagerun.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "data-test"},
        "spec": {
            "model": {"preset": "tiny", "vocabSize": model_vocab},
            "tokenizer": tokenizer,
            "data": {"sources": sources},
            "phases": [{"name": "core", "tokens": "64K", "seqLen": 64, "batch": {"size": 512}, "lr": {"peak": 1e-3}}],
        },
    }


BUILTIN_SOURCES = {"docs": {"path": BUILTIN_DOCS, "weight": 0.7}, "code": {"path": BUILTIN_CODE, "weight": 0.3}}
TRAIN = {"train": {"vocabSize": 512, "maxBytes": 60_000}}


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run = resolve_run(manifest(BUILTIN_SOURCES, TRAIN))
    return run, run_dir, prepare_data(run, run_dir, progress=False, max_source_bytes=SOURCE_BYTES)


def test_end_to_end_on_builtin_corpora(prepared_run):
    run, run_dir, prepared = prepared_run
    assert prepared.tokenizer_path == str(run_dir / "tokenizer.json")
    assert prepared.vocab_size == 512 and prepared.eos_id == 0
    assert prepared.shard_dirs == {"docs": str(run_dir / "data" / "docs"), "code": str(run_dir / "data" / "code")}
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    shards = {name: TokenShards.open(path) for name, path in prepared.shard_dirs.items()}
    for name, source in run.sources.items():
        documents = list(iter_documents(source, max_bytes=SOURCE_BYTES))
        assert shards[name].num_documents == len(documents)
        first = shards[name].read(0, int(shards[name].doc_ends[0]) - 1)
        assert tokenizer.decode(first.tolist()) == documents[0]
        assert shards[name].manifest["source"]["path"] == source.path
    loader = PackedMixLoader(shards, run.data_seed)
    (batch,) = loader.next_step(
        phase_index=0,
        weights=run.phases[0].weights,
        seq_len=64,
        global_sequences=8,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=8,
    )
    assert batch.inputs.shape == (8, 64) and batch.inputs.max() < prepared.vocab_size


def mtimes(run_dir):
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_second_call_reuses_tokenizer_and_shards(prepared_run, monkeypatch):
    run, run_dir, first = prepared_run
    before = mtimes(run_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not retrain or re-tokenize")

    monkeypatch.setattr(prepare, "train_tokenizer", refuse)
    monkeypatch.setattr(prepare, "write_shards", refuse)
    again = prepare_data(run, run_dir, progress=False, max_source_bytes=SOURCE_BYTES)
    assert again == first
    assert mtimes(run_dir) == before


def test_tokenizer_is_reused_even_when_the_sources_change(prepared_run, tmp_path, monkeypatch):
    _, run_dir, _ = prepared_run
    calls = []
    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: calls.append(a))
    run = resolve_run(manifest({"docs": {"path": BUILTIN_DOCS, "weight": 1.0}}, TRAIN))
    target = tmp_path / "run"
    (target).mkdir()
    (target / "tokenizer.json").write_bytes((run_dir / "tokenizer.json").read_bytes())
    prepared = prepare_data(run, target, progress=False, max_source_bytes=10_000)
    assert calls == [] and TokenShards.open(prepared.shard_dirs["docs"]).num_documents > 0


def test_a_changed_or_damaged_cache_is_tokenized_again(prepared_run, tmp_path):
    run, run_dir, _ = prepared_run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((run_dir / "tokenizer.json").read_bytes())
    prepare_data(run, copy, progress=False, max_source_bytes=SOURCE_BYTES)
    # Damage one set and change the other's source cap: both are rebuilt, and the result opens cleanly.
    bin_file = copy / "data" / "code" / "shard-00000.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:100])
    prepared = prepare_data(run, copy, progress=False, max_source_bytes=SOURCE_BYTES // 2)
    for path in prepared.shard_dirs.values():
        shards = TokenShards.open(path)
        assert shards.manifest["source"]["maxBytes"] == SOURCE_BYTES // 2
        assert shards.num_tokens > 0


def test_pretokenized_sources_are_used_as_they_are(prepared_run):
    _, run_dir, first = prepared_run
    sources = {
        "docs": {"path": first.shard_dirs["docs"], "weight": 0.5},
        "code": {"path": first.shard_dirs["code"], "weight": 0.5, "format": "tokens"},
    }
    run = resolve_run(manifest(sources, {"path": first.tokenizer_path}))
    prepared = prepare_data(run, run_dir / "other", progress=False)
    assert prepared.shard_dirs == first.shard_dirs
    assert not (run_dir / "other" / "data").exists()


def test_shard_set_made_with_another_tokenizer_is_refused(prepared_run, tmp_path):
    _, _, first = prepared_run
    other = tmp_path / "other.json"
    train_tokenizer(["a different corpus, a different vocabulary"] * 20, 300, other)
    run = resolve_run(manifest({"docs": {"path": first.shard_dirs["docs"], "weight": 1.0}}, {"path": str(other)}))
    expected = r"spec.data.sources.docs.path: .*made with another tokenizer.*spec.tokenizer.path"
    with pytest.raises(DataError, match=expected):
        prepare_data(run, tmp_path / "run", progress=False)


def test_tokenizer_larger_than_the_model_vocab_is_refused(prepared_run, tmp_path):
    _, _, first = prepared_run
    run = resolve_run(manifest(BUILTIN_SOURCES, {"path": first.tokenizer_path}, model_vocab=300))
    expected = r"tokenizer.json: the tokenizer has 512 tokens but spec.model.vocabSize is 300: set spec.model.vocabSize"
    with pytest.raises(DataError, match=expected + " to at least 512"):
        prepare_data(run, tmp_path, progress=False)


def test_text_and_jsonl_sources(prepared_run, tmp_path):
    _, _, first = prepared_run
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file ÄÖÜ\n")
    (folder / "a.txt").write_text("first file\n    indented\n")
    (folder / ".hidden.txt").write_text("never read")
    with gzip.open(tmp_path / "records.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": "eins zwei"}) + "\n\n" + json.dumps({"body": "drei 123"}) + "\n")
    sources = {
        "plain": {"path": str(folder), "weight": 0.5},
        "records": {"path": str(tmp_path / "*.jsonl.gz"), "weight": 0.5, "textField": "body"},
    }
    run = resolve_run(manifest(sources, {"path": first.tokenizer_path}))
    tokenizer = load_tokenizer(first.tokenizer_path)
    prepared = prepare_data(run, tmp_path / "run", progress=False)
    for name, expected in {
        "plain": ["first file\n    indented\n", "second file ÄÖÜ\n"],
        "records": ["eins zwei", "drei 123"],
    }.items():
        shards = TokenShards.open(prepared.shard_dirs[name])
        starts = np.concatenate([[0], shards.doc_ends[:-1]])
        assert [
            tokenizer.decode(shards.read(int(a), int(b) - 1).tolist()) for a, b in zip(starts, shards.doc_ends)
        ] == expected


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        list(iter_documents(SourceSpec(path=str(path), weight=1)))
    path.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'.*textField"):
        list(iter_documents(SourceSpec(path=str(path), weight=1)))
    for missing in ("none-*.jsonl", "missing.txt"):
        with pytest.raises(DataError, match=re.escape(missing) + r".*matches no files: check the source's path"):
            list(iter_documents(SourceSpec(path=str(tmp_path / missing), weight=1)))
    (tmp_path / "latin1.txt").write_bytes("Stra\xdfe".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text .*convert the file to UTF-8"):
        list(iter_documents(SourceSpec(path=str(tmp_path / "latin1.txt"), weight=1)))


def test_builtin_corpora_are_deterministic_and_capped():
    docs = SourceSpec(path=BUILTIN_DOCS, weight=1)
    stats = CorpusStats()
    first = list(iter_documents(docs, max_bytes=520_000, stats=stats))
    assert stats.bytes == sum(len(d.encode()) for d in first) == 520_000
    assert first == list(iter_documents(docs, max_bytes=520_000))
    assert any("return" in d.lower() and len(d) >= 200 for d in first[100:])  # docstrings after the topics
    files = stdlib_source_files()
    assert files and all(not {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(p.parts) for p in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    code = list(iter_documents(SourceSpec(path=BUILTIN_CODE, weight=1), max_bytes=50_000))
    assert code[0] == files[0].read_text(encoding="utf-8")
