"""Byte-level BPE tokenizers: train one on the run's sources, or load any ``tokenizers`` JSON file.

Byte-level means every string encodes losslessly (no unknown token, no normalisation): decode(encode(x)) == x
for any language, emoji and code. Digits are split one by one before BPE (as Baichuan 2 and Llama 3 do), so
numbers never merge into arbitrary chunks. The GPT-2 regex of the ByteLevel pre-tokenizer keeps runs of
whitespace together, so the indentation of code can become single tokens.

A chat template's special tokens (<|im_start|>, <|eot_id|>, ...) are added as special tokens: never split by BPE,
one id each, dropped by ``decode(skip_special_tokens=True)``. A trained tokenizer reserves them inside its
vocabulary size; adding them to an existing tokenizer grows its vocabulary (the model's vocabSize must cover it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from stagerun.core import storage
from stagerun.core.chat_template import ChatFormat

from .readers import BadRecords, DataError, InputStats, expand_inputs, read_texts

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # in id order: EOS is id 0
# End-of-document tokens of widely used tokenizers, tried in order when a loaded tokenizer lacks ours.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with this project's pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike[str] | None = None,
    chat_template: ChatFormat | None = None,
) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (special tokens included) on ``texts``; save to out_path.

    With ``chat_template``, its special tokens are special tokens of the result too, within ``vocab_size`` (after
    EOS and PAD, which keep ids 0 and 1)."""
    special = special_tokens_for(chat_template)
    if vocab_size < 256 + len(special):
        chat = f" and the {chat_template.name} chat template's" if chat_template is not None else ""
        raise DataError(
            f"vocab size {vocab_size} is too small for a byte-level BPE: use at least {256 + len(special)} "
            f"(256 bytes + {len(special)} special tokens: {', '.join(SPECIAL_TOKENS)}{chat})"
        )
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        # All 256 bytes up front: bytes absent from the training text must still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if out_path is not None:
        save_tokenizer(tokenizer, out_path)
    return tokenizer


def special_tokens_for(chat_template: ChatFormat | None) -> tuple[str, ...]:
    """The special tokens a trained tokenizer gets, in id order: EOS, PAD, then the chat template's new ones."""
    extra = chat_template.special_tokens if chat_template is not None else ()
    return tuple(dict.fromkeys((*SPECIAL_TOKENS, *extra)))


def add_chat_tokens(tokenizer: Tokenizer, fmt: ChatFormat) -> Tokenizer:
    """A copy of ``tokenizer`` holding every special token of ``fmt`` as a special token (new ones get the next
    ids; one the vocabulary already has keeps its id and becomes special). ``tokenizer`` is left as it was."""
    result = Tokenizer.from_str(tokenizer.to_str())
    special = {t.content for t in result.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in fmt.special_tokens if t not in special]
    if missing:
        result.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return result


def missing_chat_tokens(tokenizer: Tokenizer, fmt: ChatFormat) -> list[str]:
    """The special tokens of ``fmt`` that ``tokenizer`` does not encode as one special id of their own."""
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return [t for t in fmt.special_tokens if t not in special or tokenizer.encode(t).ids != [special[t]]]


def check_chat_tokens(tokenizer: Tokenizer, fmt: ChatFormat, where: str) -> None:
    """Raise DataError naming ``where`` (the tokenizer's field or file) when a special token of ``fmt`` is missing
    or not a single special id: its text would be split into ordinary tokens, and the model could not learn or
    emit the turn markers as the template means them."""
    missing = missing_chat_tokens(tokenizer, fmt)
    if missing:
        raise DataError(
            f"{where}: the tokenizer lacks the {fmt.name} chat template's special tokens {', '.join(missing)} "
            f"(absent, or not single special tokens): add them with `stagerun tokenizer add-chat-tokens "
            f"--chat-template {fmt.name} TOKENIZER --out NEW.json` and use NEW.json (spec.model.vocabSize must "
            f"cover the {vocab_size(tokenizer) + len(missing)} tokens it may then have), or train one with "
            f"spec.tokenizer.train (it reserves them)"
        )


def save_tokenizer(tokenizer: Tokenizer, out_path: str | os.PathLike[str]) -> None:
    """Write the tokenizer JSON (local path or fsspec URL) so that a crash never leaves half a file."""
    fs, path = storage.resolve(out_path)
    if storage.is_local(fs):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_bytes_atomic(fs, path, tokenizer.to_str().encode("utf-8"))


def load_tokenizer(path_or_url: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a ``tokenizers`` JSON file (local path or fsspec URL)."""
    where = str(path_or_url)
    try:
        with fsspec.open(where, "r", encoding="utf-8") as handle:
            text = handle.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        # The user's input is wrong: retrying cannot help. Other OSErrors (a timeout, a reset connection, an S3
        # 5xx) propagate as they are, so `stagerun launch` reports them as transient and the gang is retried.
        raise DataError(f"{where}: cannot read the tokenizer file ({exc}): check spec.tokenizer.path") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(
            f"{where}: not a tokenizers JSON file ({exc}): point spec.tokenizer.path at a file saved "
            f"by tokenizers (tokenizer.json)"
        ) from None


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token that separates packed documents."""
    for token in KNOWN_EOS_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"the tokenizer has no end-of-document token (looked for {', '.join(KNOWN_EOS_TOKENS)}): add "
        f"{EOS_TOKEN} as a special token, or train one with spec.tokenizer.train"
    )


def vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can produce (added/special tokens included)."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A fingerprint of what the tokenizer does, independent of how its JSON file was formatted.

    Shard sets record it, so a shard set made with one tokenizer is never silently read with another.
    """
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def interleave_by_bytes(streams: Sequence[Iterator[str]], max_bytes: int | None) -> Iterator[tuple[str, int]]:
    """Documents of every stream, each with its UTF-8 size, interleaved so each stream gets an equal share of the
    bytes (one that runs out leaves its share to the others), at most ``max_bytes`` in all (None: no limit).

    Equal shares by bytes rather than by documents, so that a source of short documents is not drowned by one of
    long ones; the last document is cut to fit ``max_bytes``.
    """
    taken = [0] * len(streams)
    total = 0
    active = list(range(len(streams)))
    while active and (max_bytes is None or total < max_bytes):
        i = min(active, key=lambda j: (taken[j], j))
        doc = next(streams[i], None)
        if doc is None:
            active.remove(i)
            continue
        data = doc.encode("utf-8")
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
            doc = data.decode("utf-8", errors="ignore")
        taken[i] += len(data)
        total += len(data)
        yield doc, len(data)


@dataclass
class TrainReport:
    """What ``train_from_inputs`` read."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of text the tokenizer was trained on
    stats: InputStats = field(default_factory=InputStats)  # per the readers: skipped / empty records
    skipped: list[dict] = field(default_factory=list)  # the first skipped records (where, problem)


def train_from_inputs(
    inputs: Sequence[str],
    vocab_size: int,
    out_path: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    text_field: str = "text",
    max_bytes: int | None = None,
    skip_bad_records: bool = False,
    progress: bool = True,
    hint: str = "",
    chat_template: ChatFormat | None = None,
) -> tuple[Tokenizer, TrainReport]:
    """Train a tokenizer on the documents of ``inputs`` (paths, globs, fsspec URLs), at most ``max_bytes`` of text.

    With several inputs, documents are interleaved so each input gets an equal share of the bytes (an input that
    runs out leaves its share to the others); the last document is cut to fit ``max_bytes``. ``chat_template``: its
    special tokens are reserved in the vocabulary (see :func:`train_tokenizer`).
    """
    files = expand_inputs(inputs, fmt, what="--input")
    bad = BadRecords(skip=skip_bad_records, hint=hint)
    report = TrainReport(skipped=bad.examples)
    streams: list[Iterator[str]] = []
    for index in range(len(inputs)):
        mine = [f for f in files if f.input_index == index]
        streams.append(_documents_of(mine, text_field, bad, report.stats))
    total = sum(f.size or 0 for f in files)
    bar = tqdm(
        total=min(total, max_bytes) if max_bytes else total,
        desc="train tokenizer",
        unit="B",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
    )

    def texts() -> Iterator[str]:
        for doc, size in interleave_by_bytes(streams, max_bytes):
            report.bytes += size
            report.documents += 1
            bar.update(size)
            yield doc

    try:
        tokenizer = train_tokenizer(texts(), vocab_size, None, chat_template)
        if report.documents == 0:
            raise DataError("the inputs hold no documents to train on: check --input, --format and --text-field")
        save_tokenizer(tokenizer, out_path)
    finally:
        bar.close()
    return tokenizer, report


def _documents_of(files, text_field: str, bad: BadRecords, stats: InputStats) -> Iterator[str]:
    for file in files:
        yield from read_texts(file, text_field=text_field, bad=bad, stats=stats)
