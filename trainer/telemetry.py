"""What rank 0 leaves in the run dir: the JSONL metrics log and the run-status file (the progress bar is a callback).

The status file (``<run dir>/status.json``) is how a worker gang tells its launcher why it stopped: the local
runner (and later the operator's pod entrypoint) reads it to decide between "done", "relaunch for the next
phase's topology" and "stopped on request; resume later". torchrun folds worker exit codes into its own, so an
exit code alone cannot carry that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from stagerun.core.protocol import GangState, RunStatus
from stagerun.core.storage import write_bytes_atomic

__all__ = [
    "STATE_COMPLETE",
    "STATE_RELAUNCH",
    "STATE_STOPPED",
    "STATE_RUNNING",
    "RunStatus",
    "write_status",
    "read_status",
    "MetricsLog",
    "read_metrics",
]

# The protocol's names (core/protocol.py), kept here for the launchers that read status.json.
STATE_COMPLETE = GangState.COMPLETE
STATE_RELAUNCH = GangState.RELAUNCH
STATE_STOPPED = GangState.STOPPED
STATE_RUNNING = GangState.RUNNING


def write_status(run_dir: Path, status: RunStatus) -> None:
    status.updated_at = time.time()
    # Atomic: the launcher may read it the moment the gang exits, and never sees half a file.
    write_bytes_atomic(LocalFileSystem(), str(Path(run_dir) / RunStatus.FILE), status.to_json().encode())


def read_status(run_dir: Path) -> RunStatus | None:
    path = Path(run_dir) / RunStatus.FILE
    if not path.exists():
        return None
    return RunStatus.from_json(path.read_text())


class MetricsLog:
    """Appends one JSON object per logged step to ``<run dir>/metrics.jsonl``.

    After a resume, steps past the last checkpoint are logged again; readers keep the last record of each step
    (``read_metrics`` does).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """Step records in step order, the last record of each step winning (re-run steps after a resume)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
