"""The byte-level BPE: lossless on any text, digits one by one, EOS id 0, identical after save/load."""

from __future__ import annotations

import pytest

from stagerun.core.spec.run import SourceSpec
from stagerun.trainer.data import DataError, eos_id, load_tokenizer, tokenizer_sha256, train_tokenizer, vocab_size
from stagerun.trainer.data.corpora import BUILTIN_CODE, BUILTIN_DOCS, iter_documents

SAMPLES = [
    "Grüße aus München! Übermäßig schöne Äpfel, Öl und Straße.",
    "你好，世界。机器学习模型需要大量的数据。",
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇩🇪🇯🇵",
    "def f(x):\n    if x:\n        return x  +  1\n\t\treturn None\n\n\n",
    "    \n        \n",
    "Ünïcödé ∑ ∫ ≠ → ∞ — “quotes” ‘single’ …",
    "mixed 123 abc4567 0.5e-10 3.14159",
    "  leading and trailing spaces   ",
]


def sample_texts() -> list[str]:
    docs = list(iter_documents(SourceSpec(path=BUILTIN_DOCS, weight=1), max_bytes=150_000))
    code = list(iter_documents(SourceSpec(path=BUILTIN_CODE, weight=1), max_bytes=150_000))
    return docs + code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(sample_texts(), 512, path), path


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_lossless(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


def test_round_trip_of_real_code_and_prose(trained):
    tokenizer, _ = trained
    docs = list(iter_documents(SourceSpec(path=BUILTIN_CODE, weight=1), max_bytes=60_000))
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc).ids) == doc


def test_indentation_runs_survive_and_merge(trained):
    tokenizer, _ = trained
    text = "class A:\n    def f(self):\n        return 1\n"
    encoding = tokenizer.encode(text)
    assert tokenizer.decode(encoding.ids) == text
    # Trained on code, the BPE learns whitespace runs: indentation costs fewer tokens than characters.
    assert any(token.count("Ġ") >= 3 for token in encoding.tokens)


def test_each_digit_is_its_own_token(trained):
    tokenizer, _ = trained
    encoding = tokenizer.encode("year 2024 and 1234567890 items")
    digit_tokens = [t for t in encoding.tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("2024") + list("1234567890")


def test_special_tokens_and_vocab_size(trained):
    tokenizer, _ = trained
    assert eos_id(tokenizer) == 0
    assert tokenizer.token_to_id("<|pad|>") == 1
    assert vocab_size(tokenizer) == 512


def test_save_and_load_give_identical_encodings(trained):
    tokenizer, path = trained
    loaded = load_tokenizer(path)
    for text in SAMPLES:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert tokenizer_sha256(loaded) == tokenizer_sha256(tokenizer)
    assert eos_id(loaded) == 0


def test_fingerprint_ignores_json_formatting(trained, tmp_path):
    import json

    tokenizer, path = trained
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert tokenizer_sha256(load_tokenizer(pretty)) == tokenizer_sha256(tokenizer)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json.*spec.tokenizer.path"):
        load_tokenizer(missing)
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{not json")
    with pytest.raises(DataError, match="garbled.json: not a tokenizers JSON file"):
        load_tokenizer(garbled)


def test_too_small_vocab_is_refused():
    with pytest.raises(DataError, match="at least 258"):
        train_tokenizer(["abc"], 100)
