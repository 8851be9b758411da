"""``stagerun export``: a Hugging Face model folder from a run, a checkpoint root or one checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_export_command(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``stagerun`` subparsers (cli.build_parser)."""
    parser = subparsers.add_parser(
        "export",
        help="write a Hugging Face model folder (config.json, safetensors, tokenizer) from a run or checkpoint",
        description="Export the newest committed checkpoint of a run (or a given step-XXXXXXXX folder) so that "
        "transformers' AutoModelForCausalLM / AutoTokenizer .from_pretrained(OUT) load it with no custom code. "
        "rmsnorm models become LlamaForCausalLM, layernorm models StableLmForCausalLM; ALiBi models and rmsnorm "
        "with partial rotary are refused (see docs/huggingface.md).",
    )
    parser.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a run dir (runs/<name>), a checkpoint root (spec.checkpoint.path), or a step-XXXXXXXX "
        "folder; local path or fsspec URL",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty)")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="dtype of the written weights (default fp32: the checkpoint's master weights, exact)",
    )
    parser.add_argument(
        "--manifest", type=Path, help="the run's manifest, for checkpoints whose meta.json does not record the model"
    )
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run's, found beside the checkpoint)")
    parser.add_argument(
        "--chat-template",
        metavar="NAME_OR_FILE",
        help="the chat format to write to tokenizer_config.json (chatml, zephyr, llama3, or a YAML/JSON file with "
        "a chatTemplate block; default: the one the checkpoint records, else --manifest's)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="split model.safetensors into shards of at most this size (default 5GB)"
    )
    parser.add_argument(
        "--average",
        type=int,
        default=1,
        metavar="N",
        help="export the mean weights of the N newest committed checkpoints of the chosen checkpoint's phase, "
        "ending with it (Polyak / Llama 3 checkpoint averaging; default 1: no averaging)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_export)
    return parser


def cmd_export(args) -> int:
    from ..data.tokenizer_commands import chat_template_arg
    from .export import export_checkpoint

    try:
        chat_template = chat_template_arg(getattr(args, "chat_template", None))
        result = export_checkpoint(
            args.source,
            args.out,
            dtype=args.dtype,
            manifest=args.manifest,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            average=args.average,
            chat_template=chat_template,
        )
    except (ValueError, FileNotFoundError) as exc:  # ExportError, UnsupportedArchitecture, DataError (a bad file)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {result.checkpoint} ({', '.join(result.notes)}) as {result.architecture}: "
        f"{result.parameters:,} parameters, {_human(result.bytes)} -> {result.out}"
    )
    print(f"  files: {', '.join(result.files)}")
    print(f"  tokenizer: {result.tokenizer or 'none'}")
    print(f"  load with: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
    return 0


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError  # pragma: no cover
