"""What a trainer process tells the outside world while it trains: progress (rank 0) and Prometheus metrics.

Which process serves what (port ``STAGERUN_STATUS_PORT``, set in operator pods or by ``stagerun run --metrics-port``):
- global rank 0: /progress and /metrics with the training metrics (and its node's GPU telemetry);
- every other node's local rank 0: /metrics with that node's GPU telemetry;
- with ``spec.metrics.allRanks``: every rank, on port + local rank, with its own view of the training metrics.
Other processes serve nothing; the loop then talks to a ``NullExporter``.
"""

from __future__ import annotations

import os
import time

from stagerun.core.spec import ResolvedRun


class NullExporter:
    def step(self, **_) -> None: ...
    def checkpoint_saved(self, **_) -> None: ...
    def resumed(self, **_) -> None: ...
    def close(self) -> None: ...


class Exporter(NullExporter):
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
    ):
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
            run.namespace or os.environ.get("POD_NAMESPACE", ""),
            rank,
            peak_flops_per_device=peak,
            world_size=world_size,
            gpus=gpus,
        )
        host = os.environ.get("POD_IP") or ("0.0.0.0" if os.environ.get("POD_NAME") else "127.0.0.1")
        self.server = StatusServer(host, port, registry=self.metrics.registry, serves_progress=progress)
        self.server.update(run=run.name, totalTokens=run.total_tokens)

    def step(
        self, *, plan, step: int, tokens: int, result, seconds: float, data_seconds: float, tokens_per_source: dict
    ) -> None:
        phase = plan.phase
        self.server.update(
            state="running",
            step=step,
            tokens=tokens,
            phase=phase.name,
            phaseIndex=phase.index,
            loss=result.loss,
            lastStepAt=time.time(),
            tokensPerSecond=plan.batch_tokens / seconds,
            tokensPerSource=dict(tokens_per_source),
        )
        if self.training:
            self.metrics.step(
                phase=phase.name,
                phase_index=phase.index,
                step=step,
                tokens=tokens,
                loss=result.loss,
                z_loss=result.z_loss,
                max_z_loss=result.max_z_loss,
                distill_loss=result.distill_loss,
                grad_norm=result.grad_norm,
                lr=plan.lr,
                batch_tokens=plan.batch_tokens,
                seq_len=phase.seq_len,
                step_seconds=seconds,
                data_seconds=data_seconds,
                flops_per_token=self.run.model.flops_per_token(phase.seq_len),
                tokens_per_source=tokens_per_source,
            )

    def checkpoint_saved(self, *, path: str, step: int, tokens: int, seconds: float | None, size: int | None) -> None:
        self.server.update(lastCheckpoint={"path": path, "step": step, "tokens": tokens, "time": time.time()})
        if self.training:
            self.metrics.checkpoint_saved(seconds, size)

    def resumed(self, *, restarts: int, load_seconds: float | None, load_bytes: int | None) -> None:
        if self.training:
            self.metrics.set(restarts=restarts, checkpoint_load_seconds=load_seconds, checkpoint_load_bytes=load_bytes)

    def close(self) -> None:
        self.server.close()


def start_exporter(run: ResolvedRun, rank: int, local_rank: int, world_size: int, device_type: str):
    port = os.environ.get("STAGERUN_STATUS_PORT")
    if not port:
        return NullExporter()
    all_ranks = run.manifest.spec.metrics.all_ranks
    if all_ranks:
        return Exporter(run, rank, local_rank, world_size, device_type, int(port) + local_rank, True, rank == 0)
    if rank == 0 or local_rank == 0:
        return Exporter(run, rank, local_rank, world_size, device_type, int(port), rank == 0, rank == 0)
    return NullExporter()
