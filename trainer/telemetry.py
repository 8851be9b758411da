"""What rank 0 tells the outside world: a progress bar, a JSONL metrics log, and the run-status file.

The status file (``<run dir>/status.json``) is how a worker gang tells its launcher why it stopped: the local
runner (and later the operator's pod entrypoint) reads it to decide between "done", "relaunch for the next
phase's topology" and "stopped on request; resume later". torchrun folds worker exit codes into its own, so an
exit code alone cannot carry that.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_COMPLETE = "complete"  # every phase's budget is spent; the final checkpoint is committed
STATE_RELAUNCH = "relaunch"  # a phase ended and the next one needs another topology; checkpoint committed
STATE_STOPPED = "stopped"  # SIGTERM/SIGINT: checkpoint committed, resume with the same command
STATE_RUNNING = "running"


@dataclass
class RunStatus:
    state: str
    step: int
    tokens: int
    phase_index: int
    phase: str
    checkpoint: str | None
    message: str = ""
    updated_at: float = 0.0


def write_status(run_dir: Path, status: RunStatus) -> None:
    status.updated_at = time.time()
    path = Path(run_dir) / "status.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(status), indent=2))
    os.replace(tmp, path)  # readers never see a half-written file


def read_status(run_dir: Path) -> RunStatus | None:
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return None
    return RunStatus(**json.loads(path.read_text()))


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


class Progress:
    """A tqdm bar over the run's tokens with phase, step, loss and throughput; silent on other ranks."""

    def __init__(self, total_tokens: int, initial_tokens: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_tokens,
                initial=initial_tokens,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tok [{elapsed}<{remaining}{postfix}]",
            )

    def update(self, tokens: int, *, phase: str, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(f"{phase} step {step}", refresh=False)
        self.bar.set_postfix_str(f"loss {loss:.3f}, {tokens_per_second:,.0f} tok/s", refresh=False)
        self.bar.update(tokens)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
