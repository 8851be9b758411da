"""The data subcommands of ``stagerun``: ``tokenizer train`` and ``tokenize``.

    stagerun tokenizer train --input 's3://bucket/web/*.jsonl' [--input ...] --vocab-size 100289 --out tok.json
    stagerun tokenize --input 's3://bucket/web/*.jsonl' [--input ...] --tokenizer tok.json --out s3://bucket/tokens/web
    stagerun tokenize --format chat --chat-template chatml --input chats.jsonl --tokenizer tok.json --out sft/

``cli.build_parser`` registers them with ``add_data_commands(sub)``.
"""

from __future__ import annotations

import argparse
import sys

from stagerun.core.chat_template import FORMATS as CHAT_FORMATS_BY_NAME

from . import usable_cpus
from .tokenizer_commands import add_chat_template_option, add_chat_tokens_command, chat_template_arg

CHAT_FORMAT_NAMES = tuple(CHAT_FORMATS_BY_NAME)  # the named formats of spec.tokenizer.chatTemplate.format

# readers.FORMATS and tokenize_units' hostile-input bounds, repeated so that building the parser imports nothing
# heavy (a test checks they agree).
FORMATS = ("auto", "text", "jsonl", "parquet")
CHAT_FORMATS = ("chat", "preference")  # `stagerun tokenize` only: JSONL rendered with --chat-template
DEFAULT_MAX_RECORD_BYTES = "64Mi"
DEFAULT_MAX_EXPANSION = 100.0


class _Upgrade(argparse.Action):
    """``--upgrade``: shard_upgrade.UpgradeAction, imported when the option is given (building the parser, on every
    ``stagerun`` call, loads no data module)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .shard_upgrade import UpgradeAction

        UpgradeAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def _count(text: str) -> int:
    from stagerun.core.spec.quantities import parse_count

    try:
        value = parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _printable(text: str) -> str:
    """``text`` with what the terminal cannot encode (file names that are not UTF-8) escaped, not a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _add_inputs(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH_OR_URL",
        help="a file, folder, glob or fsspec URL (s3://, gs://, http(s)://, memory://); repeatable. "
        "Quote globs so the shell leaves them alone",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS + (CHAT_FORMATS if chat else ()),
        default="auto",
        help="text (a document per file), jsonl (a document per line), parquet (a document per "
        "row); auto: by extension (.jsonl/.ndjson/.json, .parquet/.pq, else text)"
        + (
            "; chat: JSONL of {messages: [{role, content}]}, preference: JSONL of {prompt, chosen, rejected} "
            "(both need --chat-template; the loss-token share is printed)"
            if chat
            else ""
        ),
    )
    parser.add_argument("--text-field", default="text", help="the JSONL field / Parquet column with the text")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip malformed records (and empty or unreadable files) and count them, instead of "
        "stopping at the first with an error",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_tokenizer_train(args) -> int:
    from .readers import DataError
    from .tokenize import SKIP_HINT
    from .tokenizer import train_from_inputs, vocab_size

    try:
        tokenizer, report = train_from_inputs(
            args.input,
            args.vocab_size,
            args.out,
            chat_template=chat_template_arg(args.chat_template),
            fmt=args.format,
            text_field=args.text_field,
            max_bytes=args.max_bytes,
            skip_bad_records=args.skip_bad_records,
            progress=not args.no_progress,
            hint=SKIP_HINT,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = vocab_size(tokenizer)
    print(
        f"{args.out}: byte-level BPE of {size:,} tokens trained on {report.documents:,} documents "
        f"({report.bytes / 1e6:,.1f} MB of text)"
    )
    if size < args.vocab_size:
        print(
            f"note: --vocab-size asked for {args.vocab_size:,} tokens, but the text only had {size:,} worth "
            f"learning: train on more (or more varied) text, or raise --max-bytes"
        )
    stats = report.stats
    if stats.skipped_records or stats.skipped_files:
        first = "; ".join(f"{e['where']}: {e['problem']}" for e in report.skipped[:5])
        print(
            f"skipped: {stats.skipped_records:,} malformed records and {stats.skipped_files:,} files (first: {first})"
        )
    return 0


def cmd_tokenize(args) -> int:
    from .readers import DataError
    from .tokenize import tokenize

    def log(message: str) -> None:
        print(_printable(f"tokenize: {message}"), file=sys.stderr, flush=True)

    try:
        template = None
        if args.format in CHAT_FORMATS:
            if args.chat_template is None:
                raise DataError(
                    f"--format {args.format} needs --chat-template ({', '.join(CHAT_FORMAT_NAMES)}, or a file with a "
                    f"chatTemplate block): the format the conversations are rendered in"
                )
            template = chat_template_arg(args.chat_template)
        elif args.chat_template is not None:
            raise DataError(f"--chat-template applies to --format chat or preference, not {args.format}: drop it")
        result = tokenize(
            args.input,
            args.tokenizer,
            args.out,
            fmt=args.format,
            text_field=args.text_field,
            chat_template=template,
            processes=args.processes,
            threads=args.threads,
            shard_tokens=args.shard_tokens,
            unit_bytes=args.unit_bytes,
            skip_bad_records=args.skip_bad_records,
            max_record_bytes=args.max_record_bytes,
            max_expansion=args.max_expansion,
            progress=not args.no_progress,
            log=log,
        )
    except DataError as exc:
        print(_printable(f"error: {exc}"), file=sys.stderr)
        return 1
    except OSError as exc:  # the output folder or an input became unwritable/unreadable while working
        print(
            _printable(
                f"error: {exc}: check that path and its permissions; units already done are kept, rerun the "
                f"same command to resume"
            ),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: units already done are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(_printable(result.report()))
    return 0


def add_data_commands(sub) -> None:
    """Register ``tokenizer train`` and ``tokenize`` on the ``stagerun`` subparsers (importing nothing heavy)."""
    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text / JSONL / Parquet")
    actions = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE (digits split one per token, whitespace runs kept, <|endoftext|> "
        "and <|pad|> special tokens) and save it as a tokenizers JSON file",
    )
    _add_inputs(train)
    train.add_argument(
        "--vocab-size",
        type=_count,
        required=True,
        help="tokens in the vocabulary, special tokens included (e.g. 100289)",
    )
    train.add_argument("--out", required=True, help="where to write the tokenizer JSON (path or fsspec URL)")
    train.add_argument(
        "--max-bytes",
        type=_count,
        default=_count("1G"),
        help="train on at most this much text, shared equally between inputs (default 1G)",
    )
    train.set_defaults(func=cmd_tokenizer_train)
    add_chat_template_option(train)
    add_chat_tokens_command(actions)

    tok = sub.add_parser(
        "tokenize", help="pretokenize text / JSONL / Parquet into a token shard set (parallel, resumable)"
    )
    _add_inputs(tok, chat=True)
    tok.add_argument("--tokenizer", required=True, help="a tokenizers JSON file (path or fsspec URL)")
    tok.add_argument(
        "--chat-template",
        metavar="FORMAT_OR_FILE",
        default=None,
        help=f"with --format chat / preference: how conversations are written ({', '.join(CHAT_FORMAT_NAMES)}, or a "
        "YAML/JSON file holding a spec.tokenizer.chatTemplate block); its special tokens are added to the tokenizer",
    )
    tok.add_argument(
        "--out",
        required=True,
        help="the shard set folder (path or fsspec URL); rerun the same command to resume an interrupted run",
    )
    tok.add_argument(
        "--processes",
        type=_positive,
        default=usable_cpus(),
        help=f"worker processes (default: the CPUs, {usable_cpus()} here); 1 tokenizes in this process",
    )
    tok.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="tokenizer threads per worker process (default: the CPUs divided among the workers)",
    )
    tok.add_argument(
        "--shard-tokens",
        type=_count,
        default="64Mi",
        help="close a shard once it holds this many tokens (default 64Mi; documents are never split)",
    )
    tok.add_argument(
        "--unit-bytes",
        type=_count,
        default=None,
        help="input bytes per unit of work (default: about 1/256 of the input, a power of two "
        "between 1Mi and 256Mi); a rerun must use the same value to resume",
    )
    tok.add_argument(
        "--max-record-bytes",
        type=_count,
        default=DEFAULT_MAX_RECORD_BYTES,
        help="the largest record (a JSONL line, a text file, a Parquet value) read; a bigger one is a malformed "
        "record (default 64Mi). Long documents within it are encoded in pieces, in bounded memory",
    )
    tok.add_argument(
        "--max-expansion",
        type=_ratio,
        default=DEFAULT_MAX_EXPANSION,
        help="a compressed input may decompress to at most this many times its size (after its first 16 MiB), "
        "else the run stops naming it: a decompression bomb (default 100)",
    )
    tok.add_argument(
        "--upgrade",
        metavar="DIR_OR_URL",
        action=_Upgrade,
        help="instead: convert the stagerun-tokens/v1 shard set at DIR_OR_URL to v2 in place (hashes its files, "
        "rewrites its manifest) and exit; needs no other option",
    )
    tok.set_defaults(func=cmd_tokenize)
