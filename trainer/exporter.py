"""What a trainer process tells the outside world while it trains: progress (rank 0) and Prometheus metrics.

Which process serves what (port ``STAGERUN_STATUS_PORT``, set in operator pods or by ``stagerun run --metrics-port``):
- global rank 0: /progress and /metrics with the training metrics (and its node's GPU telemetry);
- every other node's local rank 0: /metrics with that node's GPU telemetry;
- with ``spec.metrics.allRanks``: every rank, on port + local rank, with its own view of the training metrics.
Other processes serve nothing (their exporter is a no-op callback).
"""

from __future__ import annotations

import os
import time

from stagerun.core.protocol import CheckpointRef, GangState, PodEnv, Progress
from stagerun.core.spec import ResolvedRun

from .callback_api import Callback, StepRecord
from .checkpoint import CheckpointInfo, CheckpointManager
from .trainer import Trainer


class Exporter(Callback):
    """Publishes each step on /progress (a ``Progress``) and, where ``training``, as Prometheus metrics.

    Loss, throughput and the other values read from the device change only on steps with values (StepRecord); in
    between, /progress advances step and tokens and keeps the last values, and /metrics keeps the last such step's
    snapshot whole (a scrape never mixes two steps)."""

    def __init__(
        self,
        run: ResolvedRun,
        rank: int,
        local_rank: int,
        world_size: int,
        device_type: str,
        port: int,
        training: bool,
        progress: bool,
    ) -> None:
        from .metrics import GpuTelemetry, TrainerMetrics, peak_flops_for
        from .status_server import StatusServer

        gpus = GpuTelemetry() if local_rank == 0 else None
        peak = run.manifest.spec.metrics.peak_tflops * 1e12 if run.manifest.spec.metrics.peak_tflops else None
        if peak is None and device_type == "cuda":
            import torch

            peak = peak_flops_for(torch.cuda.get_device_name())
        self.run, self.training = run, training
        self.metrics = TrainerMetrics(
            run.name,
            run.namespace or os.environ.get(PodEnv.POD_NAMESPACE, ""),
            rank,
            peak_flops_per_device=peak,
            world_size=world_size,
            gpus=gpus,
        )
        host = os.environ.get(PodEnv.POD_IP) or ("0.0.0.0" if os.environ.get(PodEnv.POD_NAME) else "127.0.0.1")
        self.progress = Progress(run=run.name, total_tokens=run.total_tokens)
        self.server = StatusServer(host, port, registry=self.metrics.registry, serves_progress=progress)
        self.server.publish(self.progress)
        self.manager: CheckpointManager | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.manager = trainer.manager

    def on_resume(self, checkpoint: CheckpointInfo, restarts: int, load_seconds: float) -> None:
        if self.training:
            self.metrics.set(
                restarts=restarts, checkpoint_load_seconds=load_seconds, checkpoint_load_bytes=checkpoint.size_bytes
            )

    def on_step(self, record: StepRecord) -> None:
        progress = self.progress
        progress.state, progress.last_step_at = GangState.RUNNING, time.time()
        progress.step, progress.tokens = record.step, record.tokens
        progress.phase, progress.phase_index, progress.tokens_per_source = (
            record.phase,
            record.phase_index,
            record.tokens_per_source,
        )
        if record.has_values:
            progress.loss, progress.tokens_per_second = record.loss, record.tokens_per_second
        self.server.publish(progress)
        if self.training and record.has_values:
            self._step_metrics(record)

    def _step_metrics(self, record: StepRecord) -> None:
        from .metrics import palm_flops_per_token

        assert record.loss is not None and record.z_loss is not None and record.max_z_loss is not None
        assert record.distill_loss is not None and record.grad_norm is not None
        assert record.step_seconds is not None and record.data_seconds is not None
        self.metrics.step(
            phase=record.phase,
            phase_index=record.phase_index,
            step=record.step,
            tokens=record.tokens,
            loss=record.loss,
            z_loss=record.z_loss,
            max_z_loss=record.max_z_loss,
            distill_loss=record.distill_loss,
            grad_norm=record.grad_norm,
            lr=record.lr,
            batch_tokens=record.batch_tokens,
            seq_len=record.seq_len,
            step_seconds=record.step_seconds,
            data_seconds=record.data_seconds,
            flops_per_token=self.run.model.flops_per_token(record.seq_len),
            palm_flops_per_token=palm_flops_per_token(self.run.model, record.seq_len),
            tokens_per_source=record.tokens_per_source,
        )

    def on_checkpoint(self, checkpoint: CheckpointInfo, save_seconds: float | None) -> None:
        self.progress.last_checkpoint = CheckpointRef(checkpoint.path, checkpoint.step, checkpoint.tokens, time.time())
        self.server.publish(self.progress)
        if self.training:
            self.metrics.checkpoint_saved(save_seconds, checkpoint.size_bytes)
            # What training waited for the last save (async: the copy to host memory; sync: the whole save).
            self.metrics.set(checkpoint_stall_seconds=self.manager.last_stall_seconds if self.manager else None)

    def close(self) -> None:
        self.server.close()


def start_exporter(run: ResolvedRun, rank: int, local_rank: int, world_size: int, device_type: str) -> Callback:
    """The exporter this process runs, or a callback that does nothing where it serves nothing."""
    port = os.environ.get(PodEnv.STATUS_PORT)
    if not port:
        return Callback()
    all_ranks = run.manifest.spec.metrics.all_ranks
    if all_ranks:
        return Exporter(run, rank, local_rank, world_size, device_type, int(port) + local_rank, True, rank == 0)
    if rank == 0 or local_rank == 0:
        return Exporter(run, rank, local_rank, world_size, device_type, int(port), rank == 0, rank == 0)
    return Callback()
