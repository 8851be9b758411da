"""The `stagerun` command: run, plan, validate (the operator and data tools join later)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version
from pathlib import Path

from stagerun.core.spec import SpecError, load_run, parse_count


def _add_manifest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="TrainingRun manifest (YAML)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="worker processes on this machine (default: spec.resources, nodes x processesPerNode)",
    )


def cmd_validate(args) -> int:
    """Every problem of the manifest, or one line saying it is valid. A user's mistake (a SpecError, which main()
    prints as its list of problems) never shows a traceback; anything else is a bug in stagerun and still does."""
    from stagerun.core.spec.fields import printable

    if args.nproc is not None and args.nproc < 1:
        print(f"error: --nproc {args.nproc}: give at least 1 worker process (or leave it out)", file=sys.stderr)
        return 2
    run = load_run(args.manifest, world_size=args.nproc)
    phases = ", ".join(p.name for p in run.phases)
    count = f"{len(run.phases)} phase{'s' if len(run.phases) != 1 else ''}"
    print(f"{printable(str(args.manifest))}: valid TrainingRun {run.name!r} ({count}: {phases})")
    from stagerun.core.memory_estimate import memory_warnings

    for warning in memory_warnings(run):  # a model of the peak, not a measurement: a warning, never a refusal
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from stagerun.core.plan_report import memory_table, plot_schedule, render_table, training_lines

    run = load_run(args.manifest, world_size=args.nproc)
    print(render_table(run, args.throughput))
    print("\n" + "\n".join(training_lines(run)))
    print("\n" + memory_table(run))
    if args.plot:
        plot_schedule(run, str(args.plot))
        print(f"\nschedule plot written to {args.plot}")
    return 0


def cmd_run(args) -> int:
    """A user's mistake (the manifest, a pre-flight problem, unusable data) is one message, never a traceback."""
    from .data import DataError
    from .preflight import PreflightError, check_nproc

    problems = check_nproc(args.nproc)
    if problems:  # before the manifest: --nproc -1 would read as a world size there and blame spec.parallelism
        raise PreflightError(problems, "the command line")
    run = load_run(args.manifest, world_size=args.nproc)  # every problem is reported before anything starts
    from .runner import run_local

    try:
        return run_local(
            run,
            args.manifest,
            nproc=args.nproc,
            run_dir=args.run_dir,
            max_restarts=args.max_restarts,
            max_source_bytes=args.max_source_bytes,
            metrics_port=args.metrics_port,
        )
    except DataError as exc:  # found while preparing the data, before any worker started
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_launch(args) -> int:
    from .launch import launch

    return launch()


def cmd_operator(args) -> int:
    from stagerun.operator.main import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagerun", description="Staged LLM pretraining from one TrainingRun manifest."
    )
    # The installed distribution's version: what docker/build.sh tags the images with (tests/test_images.py).
    parser.add_argument("--version", action="version", version=f"stagerun {version('stagerun')}")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a manifest and print every problem with its field and a fix")
    _add_manifest(validate)
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser("plan", help="print the schedule (phases, batches, LR) and optionally plot it")
    _add_manifest(plan)
    plan.add_argument("--plot", type=Path, help="write a PNG of LR, batch size and context length against tokens")
    plan.add_argument("--throughput", type=float, help="tokens/s, to estimate the time of each phase")
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", help="train the manifest on this machine (torchrun; gloo on CPU, NCCL on GPUs)")
    _add_manifest(run)
    run.add_argument("--run-dir", type=Path, help="tokenizer, data, checkpoints and metrics (default: runs/<name>)")
    run.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of a failed gang before giving up")
    run.add_argument(
        "--max-source-bytes",
        type=parse_count,
        default=None,
        help="tokenize at most this much text per source (e.g. 2M): a quick smoke run on a sample",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics (/metrics) and progress (/progress) on 127.0.0.1:PORT",
    )
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="entrypoint of the trainer pods the operator creates (reads its env)")
    launch.set_defaults(func=cmd_launch)

    operator = sub.add_parser("operator", help="run the Kubernetes operator (needs the `operator` extra)")
    try:
        from stagerun.operator.main import add_arguments

        add_arguments(operator)
    except ImportError:  # pragma: no cover - the operator package is always installed with stagerun
        pass
    operator.set_defaults(func=cmd_operator)

    from .hf.commands import add_export_command

    add_export_command(sub)

    from .data.commands import add_data_commands

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `stagerun plan FILE | head`: the reader left; say nothing more (as other Unix tools do). Python would
        # print a traceback at exit flushing stdout into the closed pipe: point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
