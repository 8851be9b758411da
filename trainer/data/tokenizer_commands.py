"""The chat-template parts of ``stagerun tokenizer``: ``--chat-template`` and ``add-chat-tokens``.

    stagerun tokenizer train --input 'web/*.jsonl' --vocab-size 32000 --chat-template chatml --out tok.json
    stagerun tokenizer add-chat-tokens --chat-template llama3 tok.json --out tok-chat.json

``--chat-template`` takes a built-in format (chatml, zephyr, llama3) or a YAML/JSON file holding a
``spec.tokenizer.chatTemplate`` block (``format: custom`` with system/user/assistant prefix and suffix, and
specialTokens), the block under a ``chatTemplate`` key, or a whole TrainingRun manifest.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from stagerun.core.chat_template import FORMATS, ChatFormat, ChatFormatError, chat_format

CHAT_TEMPLATE_HELP = (
    f"a chat format ({', '.join(FORMATS)}) or a YAML/JSON file with a spec.tokenizer.chatTemplate block "
    "(format: custom): its special tokens become special tokens of the tokenizer"
)


def chat_template_arg(value: str | None, where: str = "--chat-template") -> ChatFormat | None:
    """The ChatFormat a ``--chat-template`` value names (None for None); DataError naming the file or the choices."""
    from .readers import DataError

    if value is None:
        return None
    if value in FORMATS:
        return FORMATS[value]
    if not os.path.isfile(value):
        raise DataError(
            f"{where} {value!r}: neither a chat format ({', '.join(FORMATS)}) nor a file; give one of those names, "
            "or a YAML/JSON file with a chatTemplate block"
        )
    try:
        return chat_format(_read_template_spec(value), where=f"{value}: chatTemplate")
    except ChatFormatError as exc:
        raise DataError(str(exc)) from None


def _read_template_spec(path: str) -> Any:
    from stagerun.core.spec import read_manifest
    from stagerun.core.spec.fields import Reader, SpecError
    from stagerun.core.spec.run import ChatTemplateSpec

    from .readers import DataError

    try:
        raw = read_manifest(path)
    except SpecError as exc:
        raise DataError(str(exc)) from None
    block: Any = raw
    key = "chatTemplate"
    if isinstance(raw, dict) and isinstance(raw.get("spec"), dict):  # a whole TrainingRun manifest
        block, key = (raw["spec"].get("tokenizer") or {}).get("chatTemplate"), "spec.tokenizer.chatTemplate"
        if block is None:
            raise DataError(f"{path}: the manifest sets no spec.tokenizer.chatTemplate; add one, or name a format")
    elif isinstance(raw, dict) and "chatTemplate" in raw:
        block = raw["chatTemplate"]
    reader = Reader()
    spec = reader.read(ChatTemplateSpec, block, key)
    if spec is None or reader.problems:
        raise DataError(str(SpecError(reader.problems, path)))
    return spec


def add_chat_template_option(parser: argparse.ArgumentParser) -> None:
    """``--chat-template`` on ``tokenizer train``: reserve the format's special tokens in the trained vocabulary."""
    parser.add_argument("--chat-template", metavar="NAME_OR_FILE", help=CHAT_TEMPLATE_HELP)


def add_chat_tokens_command(actions) -> None:
    """Register ``tokenizer add-chat-tokens`` on the ``stagerun tokenizer`` subparsers."""
    parser = actions.add_parser(
        "add-chat-tokens",
        help="add a chat template's special tokens to an existing tokenizers JSON file",
        description="Write a copy of a tokenizers JSON file that holds a chat template's special tokens as "
        "special tokens (never split, one id each, skipped by decode(skip_special_tokens=True)). Tokens it "
        "lacks get the next ids, so the vocabulary grows: the model's spec.model.vocabSize must cover it.",
    )
    parser.add_argument("tokenizer", metavar="TOKENIZER", help="the tokenizers JSON file (path or fsspec URL)")
    parser.add_argument("--chat-template", metavar="NAME_OR_FILE", required=True, help=CHAT_TEMPLATE_HELP.split(":")[0])
    parser.add_argument("--out", required=True, help="where to write the new tokenizer JSON (path or fsspec URL)")
    parser.set_defaults(func=cmd_add_chat_tokens)


def cmd_add_chat_tokens(args) -> int:
    from .readers import DataError
    from .tokenizer import add_chat_tokens, load_tokenizer, missing_chat_tokens, save_tokenizer, vocab_size

    try:
        fmt = chat_template_arg(args.chat_template)
        assert fmt is not None
        tokenizer = load_tokenizer(args.tokenizer)
        missing = missing_chat_tokens(tokenizer, fmt)
        result = add_chat_tokens(tokenizer, fmt)
        save_tokenizer(result, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    before, after = vocab_size(tokenizer), vocab_size(result)
    added = ", ".join(f"{t}={result.token_to_id(t)}" for t in missing) or "none (it had them all)"
    print(f"{args.out}: {fmt.name} special tokens added: {added}; {before:,} -> {after:,} tokens")
    if after > before:
        print(f"note: spec.model.vocabSize must be at least {after:,} for a model to use this tokenizer")
    return 0
