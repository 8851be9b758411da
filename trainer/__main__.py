"""Worker entrypoint, started by torchrun on every rank: ``python -m stagerun.trainer --manifest FILE --run-dir DIR``.

Users run ``stagerun run FILE`` instead, which prepares the data and starts torchrun with the right arguments.
Extra callbacks (custom logging, the tests' faults) come from ``STAGERUN_CALLBACKS`` (see trainer.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from stagerun.core.spec import SpecError, load_run

_PARENT = os.getppid()  # as early as possible: the parent the worker must not outlive


def main(argv: list[str] | None = None) -> int:
    from .gang_life import die_with_parent

    die_with_parent(parent=_PARENT)  # torchrun killed (it was, if `stagerun run` was): this worker stops too
    parser = argparse.ArgumentParser(prog="python -m stagerun.trainer")
    parser.add_argument("--manifest", required=True, help="TrainingRun manifest (YAML)")
    parser.add_argument("--run-dir", required=True, type=Path, help="prepared data, metrics and status live here")
    parser.add_argument(
        "--world-size", type=int, default=None, help="override every phase's world size (local runs with --nproc)"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        run = load_run(args.manifest, world_size=args.world_size)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    from .failure_advice import classify
    from .train import train  # torch is imported only once the manifest is known to be valid

    try:
        train(run, args.run_dir, Path(args.manifest), args.world_size)
    except Exception as exc:
        if classify(exc) is None:
            raise  # a bug, or trouble that may pass: the traceback is what helps
        print(f"[rank {rank}] {exc}", file=sys.stderr)  # the user's to fix, named in the message: no traceback
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
