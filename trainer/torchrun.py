"""torchrun, started by `stagerun run` and `stagerun launch`: ``python -m stagerun.trainer.torchrun ARGS``.

The same agent in the same process (``torch.distributed.run.main``, same arguments), except for how a failed worker
is reported: torchrun raises ChildFailedError out of its ``main``, so every worker failure, a user's full disk or
unusable data included, ended in a Python traceback of torchrun's own frames. Here it is one line; the worker has
already printed why it failed (its own traceback when it is a bug), and the launcher prints what to do next
(failure_advice.py).
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()  # parses sys.argv[1:], as `python -m torch.distributed.run` would
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(
            f"torchrun: worker rank {rank} (pid {failure.pid}) exited with code {failure.exitcode} first; "
            "its own message is above",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
