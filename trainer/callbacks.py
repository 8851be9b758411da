"""The built-in callbacks of the step loop (trainer.py): GC schedule, metrics log, progress bar, checkpoint policy,
manifest reload.

The Prometheus and /progress exporter is one too (exporter.py). ``standard_callbacks`` puts them in the order they
must run: the GC schedule, the metrics line and the bar, then the exporter, then the checkpoint (whose
``on_checkpoint`` reaches all of them), then the manifest reload at a phase's end.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from stagerun.core.plan import StepPlan, segments
from stagerun.core.spec import ResolvedRun, SpecError, load_run
from stagerun.core.spec.changes import immutable_changes

from .callback_api import Callback, StepRecord
from .checkpoint import CheckpointInfo
from .evaluation import Evaluation
from .exporter import Exporter
from .telemetry import MetricsLog
from .trainer import Trainer

log = logging.getLogger("stagerun.trainer")


class GcSchedule(Callback):
    """Python's automatic garbage collection off while training, a young-generation collection every
    ``spec.training.gcEverySteps`` steps instead (0: GC left alone).

    Automatic collections start whenever enough objects were allocated, so they land at random points of random
    steps on each rank, and a rank that pauses makes every other one wait at the next collective; collecting on
    the same steps everywhere keeps the ranks in step. Generation 1 only: a full collection walks every object and
    the training state is long-lived.
    """

    def __init__(self) -> None:
        self.every = 0
        self.reenable = False

    def on_start(self, trainer: Trainer) -> None:
        self.every = trainer.run.training.gc_every_steps
        if self.every > 0:
            self.reenable = gc.isenabled()
            gc.disable()

    def on_step(self, record: StepRecord) -> None:
        if self.every > 0 and record.step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.reenable:
            gc.enable()
            self.reenable = False


class MetricsLogger(Callback):
    """Every step with values as one line of ``<run dir>/metrics.jsonl`` (rank 0): each
    ``spec.training.logEverySteps``-th step, plus checkpoint steps and a phase's last step (StepRecord)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log: MetricsLog | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.log = MetricsLog(self.path)

    def on_step(self, record: StepRecord) -> None:
        assert self.log is not None
        if record.has_values:
            self.log.write(record.to_dict())

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class ProgressBar(Callback):
    """A tqdm bar over the run's tokens with phase, step, loss and throughput, and a line per phase and checkpoint."""

    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens
        self.bar: Any = None

    def on_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_tokens,
            initial=trainer.tokens,
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tok [{elapsed}<{remaining}{postfix}]",
        )

    def on_phase_start(self, plan: StepPlan) -> None:
        self.bar.write(
            f"phase {plan.phase.name}: seqLen {plan.seq_len}, batch {plan.batch_tokens:,} tokens, "
            f"mix {plan.phase.weights}"
        )

    def on_step(self, record: StepRecord) -> None:
        self.bar.set_description_str(f"{record.phase} step {record.step}", refresh=False)
        if record.loss is not None and record.tokens_per_second is not None:  # else: the last values stay shown
            self.bar.set_postfix_str(f"loss {record.loss:.3f}, {record.tokens_per_second:,.0f} tok/s", refresh=False)
        self.bar.update(record.batch_tokens)

    def on_checkpoint(self, checkpoint: CheckpointInfo, save_seconds: float | None) -> None:
        self.bar.write(
            f"checkpoint step {checkpoint.step} ({checkpoint.tokens:,} tokens) committed at {checkpoint.path}"
        )

    def on_phase_end(self, record: StepRecord) -> None:
        self.bar.write(f"phase {record.phase} finished at step {record.step} ({record.tokens:,} tokens)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CheckpointPolicy(Callback):
    """Saves after a phase's last step, after a stop request, and every ``spec.checkpoint.everyTokens``; rank 0
    then applies retention."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step(self, record: StepRecord) -> None:
        assert self.trainer is not None
        if self.trainer.wants_checkpoint():  # the loop read this step's values for it (the NaN check comes first)
            self.trainer.save_checkpoint()

    def on_checkpoint(self, checkpoint: CheckpointInfo, save_seconds: float | None) -> None:
        assert self.trainer is not None
        if self.trainer.topo.is_main:
            self.trainer.manager.apply_retention()


def reload_manifest(run: ResolvedRun, manifest: Path | None, world_size: int | None, phase_index: int) -> ResolvedRun:
    """The manifest as it is now on disk, when it only changed phases after ``phase_index`` (an accepted edit of a
    live run, written by the operator into the pod's ConfigMap); otherwise the run unchanged."""
    if manifest is None:
        return run
    try:
        new = load_run(manifest, world_size=world_size)
    except (SpecError, OSError) as exc:
        log.warning("manifest %s no longer reads (%s): continuing with the one loaded at start", manifest, exc)
        return run
    if new.phases == run.phases:
        return run
    refused = immutable_changes(run, new, phase_index)
    if refused:
        log.warning("manifest %s changed %s, which a live run cannot take: ignored", manifest, ", ".join(refused))
        return run
    log.warning("manifest %s changed later phases: they take effect as reached", manifest)
    return new


class ManifestReload(Callback):
    """At a phase's end, takes the later phases of the manifest as it is now on disk (see ``reload_manifest``)."""

    def __init__(self, manifest: Path | None, world_size: int | None) -> None:
        self.manifest, self.world_size = manifest, world_size
        self.trainer: Trainer | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_phase_end(self, record: StepRecord) -> None:
        assert self.trainer is not None
        self.trainer.run = reload_manifest(self.trainer.run, self.manifest, self.world_size, record.phase_index)


def standard_callbacks(
    trainer: Trainer, run_dir: Path, exporter: Callback, manifest: Path | None, world_size: int | None
) -> list[Callback]:
    logs: list[Callback] = []
    if trainer.topo.is_main:  # the bar counts up to the last step's overshoot of the budget
        logs = [MetricsLogger(Path(run_dir) / "metrics.jsonl"), ProgressBar(segments(trainer.run)[-1].end_tokens)]
    # Evaluation after the checkpoint policy: a phase's end is saved before the evaluation's forwards run, and
    # before the manifest reload (the phase just ended is evaluated as it was trained).
    evaluation = Evaluation(Path(run_dir), exporter if isinstance(exporter, Exporter) else None)
    return [GcSchedule(), *logs, exporter, CheckpointPolicy(), evaluation, ManifestReload(manifest, world_size)]
