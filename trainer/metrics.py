"""Trainer metrics for Prometheus, served at ``/metrics`` by the status server (status_server.py).

The values are kept in a plain dict and turned into metric families at scrape time (a custom collector), so a
series exists only for the current phase: no stale ``phase`` label values pile up. Labels are bounded: ``run`` and
``namespace`` (constant per process), ``phase`` (the run's phase names), ``rank``, and ``source`` / ``gpu`` where
they apply.

GPU telemetry comes from NVML (nvidia-ml-py) when a driver is present; without one those metrics are simply absent.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("stagerun.trainer.metrics")

# name -> (help, unit note). The documented set; tests/test_metrics_prometheus.py checks each appears.
STEP_GAUGES = {
    "stagerun_loss": "mean cross-entropy of the last step's global batch",
    "stagerun_z_loss": "mean weighted z-loss term of the last step (0 when disabled)",
    "stagerun_max_z_loss": "mean weighted max-z loss term of the last step (0 when disabled)",
    "stagerun_distill_loss": "mean cross-entropy of the teacher's top-1 predictions (0 when not distilling)",
    "stagerun_grad_norm": "global gradient norm of the last step, before clipping",
    "stagerun_learning_rate": "learning rate of the last step",
    "stagerun_batch_tokens": "global batch of the last step, in tokens",
    "stagerun_batch_sequences": "global batch of the last step, in sequences",
    "stagerun_seq_len": "sequence length of the current phase",
    "stagerun_phase_index": "index of the current phase (0-based)",
    "stagerun_step": "optimizer steps completed",
    "stagerun_tokens_seen": "tokens trained on since the run started",
    "stagerun_tokens_per_second": "training throughput of the last step (tokens/s, whole gang)",
    "stagerun_step_seconds": "wall time of the last step",
    "stagerun_data_wait_seconds": "time the last step waited for its data",
    "stagerun_model_flops_per_token": "training FLOPs per token of the model at the current sequence length",
    "stagerun_mfu": "model FLOPs utilisation of the last step (achieved / peak FLOP/s of the gang)",
    "stagerun_restarts": "times this run resumed from a checkpoint",
    "stagerun_checkpoint_save_seconds": "duration of the last checkpoint save",
    "stagerun_checkpoint_save_bytes": "size of the last checkpoint",
    "stagerun_checkpoint_load_seconds": "duration of the last checkpoint load",
    "stagerun_checkpoint_load_bytes": "size of the last checkpoint loaded",
    "stagerun_checkpoints_saved": "checkpoints saved by this process",
}
SOURCE_GAUGE = ("stagerun_source_tokens_seen", "tokens trained on per data source since the run started")
GPU_GAUGES = {
    "stagerun_gpu_utilization_ratio": "GPU busy fraction over the driver's last sample period",
    "stagerun_gpu_memory_used_bytes": "GPU memory in use",
    "stagerun_gpu_memory_total_bytes": "GPU memory in total",
    "stagerun_gpu_power_watts": "GPU power draw",
    "stagerun_gpu_temperature_celsius": "GPU temperature",
}
# Peak dense bf16 FLOP/s per device, by a substring of the device name (NVIDIA data sheets).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops_for(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


class GpuTelemetry:
    """The node's GPUs through NVML; ``available`` is False (and nothing is reported) without a driver."""

    def __init__(self) -> None:
        self.available = False
        self._nvml: Any = None  # the pynvml module, once NVML answered
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml, self.available = pynvml, True
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            log.info("no GPU telemetry (%s: %s)", type(exc).__name__, exc)

    def device_name(self) -> str | None:
        if not self.available or not self._handles:
            return None
        name = self._nvml.nvmlDeviceGetName(self._handles[0])
        return name.decode() if isinstance(name, bytes) else name

    def sample(self) -> list[dict[str, float]]:
        """One dict per GPU; a GPU that fails to answer is skipped, never an error for the scrape."""
        samples = []
        for handle in self._handles:
            try:
                nvml = self._nvml
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                samples.append(
                    {
                        "stagerun_gpu_utilization_ratio": nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                        "stagerun_gpu_memory_used_bytes": float(memory.used),
                        "stagerun_gpu_memory_total_bytes": float(memory.total),
                        "stagerun_gpu_power_watts": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                        "stagerun_gpu_temperature_celsius": float(
                            nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                        ),
                    }
                )
            except Exception as exc:  # one GPU's NVML hiccup must not break the scrape
                log.debug("NVML sample failed: %s", exc)
                samples.append({})
        return samples


class TrainerMetrics:
    """The trainer's current values, exported as a Prometheus registry."""

    def __init__(
        self,
        run: str,
        namespace: str,
        rank: int,
        *,
        peak_flops_per_device: float | None,
        world_size: int,
        gpus: GpuTelemetry | None = None,
    ):
        self.labels = {"run": run, "namespace": namespace, "rank": str(rank)}
        self.phase = ""
        self.values: dict[str, float] = {"stagerun_restarts": 0.0, "stagerun_checkpoints_saved": 0.0}
        self.source_tokens: dict[str, float] = {}
        self.peak_flops = peak_flops_per_device * world_size if peak_flops_per_device else None
        self.gpus = gpus
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def set(self, **values: float | None) -> None:
        with self._lock:
            self.values.update({f"stagerun_{k}": float(v) for k, v in values.items() if v is not None})

    def step(
        self,
        *,
        phase: str,
        phase_index: int,
        step: int,
        tokens: int,
        loss: float,
        z_loss: float,
        max_z_loss: float,
        grad_norm: float,
        distill_loss: float = 0.0,
        lr: float,
        batch_tokens: int,
        seq_len: int,
        step_seconds: float,
        data_seconds: float,
        flops_per_token: int,
        tokens_per_source: dict[str, int],
    ) -> None:
        tokens_per_second = batch_tokens / step_seconds if step_seconds > 0 else 0.0
        with self._lock:
            self.phase = phase
            self.source_tokens = {k: float(v) for k, v in tokens_per_source.items()}
        self.set(
            loss=loss,
            z_loss=z_loss,
            max_z_loss=max_z_loss,
            distill_loss=distill_loss,
            grad_norm=grad_norm,
            learning_rate=lr,
            batch_tokens=batch_tokens,
            batch_sequences=batch_tokens // seq_len,
            seq_len=seq_len,
            phase_index=phase_index,
            step=step,
            tokens_seen=tokens,
            tokens_per_second=tokens_per_second,
            step_seconds=step_seconds,
            data_wait_seconds=data_seconds,
            model_flops_per_token=flops_per_token,
            mfu=tokens_per_second * flops_per_token / self.peak_flops if self.peak_flops else None,
        )

    def checkpoint_saved(self, seconds: float | None, size: int | None) -> None:
        with self._lock:
            self.values["stagerun_checkpoints_saved"] = self.values.get("stagerun_checkpoints_saved", 0.0) + 1
        self.set(checkpoint_save_seconds=seconds, checkpoint_save_bytes=size)

    # prometheus_client custom collector protocol
    def collect(self):
        with self._lock:
            values, sources, phase = dict(self.values), dict(self.source_tokens), self.phase
        names, label_values = (
            ["run", "namespace", "phase", "rank"],
            [self.labels["run"], self.labels["namespace"], phase, self.labels["rank"]],
        )
        for name, help_text in STEP_GAUGES.items():
            if name in values:
                family = GaugeMetricFamily(name, help_text, labels=names)
                family.add_metric(label_values, values[name])
                yield family
        if sources:
            family = GaugeMetricFamily(SOURCE_GAUGE[0], SOURCE_GAUGE[1], labels=names + ["source"])
            for source, value in sorted(sources.items()):
                family.add_metric(label_values + [source], value)
            yield family
        if self.gpus is not None and self.gpus.available:
            samples = self.gpus.sample()
            for name, help_text in GPU_GAUGES.items():
                family = GaugeMetricFamily(name, help_text, labels=["run", "namespace", "rank", "gpu"])
                for index, sample in enumerate(samples):
                    if name in sample:
                        family.add_metric(
                            [self.labels["run"], self.labels["namespace"], self.labels["rank"], str(index)],
                            sample[name],
                        )
                yield family
