"""Trainer metrics for Prometheus, served at ``/metrics`` by the status server (status_server.py).

The values are kept in a plain dict and turned into metric families at scrape time (a custom collector), so a
series exists only for the current phase: no stale ``phase`` label values pile up. Labels are bounded: ``run`` and
``namespace`` (constant per process), ``phase`` (the run's phase names), ``rank``, and ``source`` / ``gpu`` where
they apply.

GPU telemetry comes from NVML (nvidia-ml-py) when a driver is present; without one those metrics are simply absent.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from stagerun.core.spec.model import ModelSpec, resolved_value

from .data import remote_io

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
    "stagerun_model_flops_per_token": "training FLOPs per token at the current seqLen, stagerun convention: "
    "6 x (parameters - input embedding) + 6 x layers x dim x seqLen (attention matmuls, causal: half the scores)",
    "stagerun_mfu": "model FLOPs utilisation of the last step: tokens/s x stagerun_model_flops_per_token / peak dense "
    "bf16 FLOP/s of the gang",
    "stagerun_model_flops_per_token_palm": "training FLOPs per token at the current seqLen, PaLM/torchtitan "
    "convention: 6 x (parameters - embedding) + 12 x layers x heads x headDim x seqLen (no causal halving)",
    "stagerun_mfu_palm": "model FLOPs utilisation of the last step with the PaLM/torchtitan FLOPs convention "
    "(the number torchtitan logs as mfu)",
    "stagerun_restarts": "times this run resumed from a checkpoint",
    "stagerun_checkpoint_save_seconds": "duration of the last checkpoint save, from its start to its commit marker",
    "stagerun_checkpoint_stall_seconds": "time training waited for the last checkpoint save (with asyncSave: the "
    "copy to pinned host memory; otherwise the whole save)",
    "stagerun_checkpoint_save_bytes": "size of the last checkpoint",
    "stagerun_checkpoint_load_seconds": "duration of the last checkpoint load",
    "stagerun_checkpoint_load_bytes": "size of the last checkpoint loaded",
    "stagerun_checkpoints_saved": "checkpoints saved by this process",
}
# sft and dpo phases (StepRecord.post_training_values()): present while such a phase trains, each only where it
# applies (the DPO values in dpo phases), and dropped on a step that does not set it (no stale value under a later
# phase's label).
DPO_GAUGES = {
    "stagerun_dpo_loss": "mean DPO loss -log sigmoid(beta x log-ratio margin) over the last step's pairs",
    "stagerun_dpo_rewards_chosen": "mean implicit reward beta x (policy - reference log-probability) of the chosen "
    "responses",
    "stagerun_dpo_rewards_rejected": "mean implicit reward of the rejected responses",
    "stagerun_dpo_rewards_margin": "mean chosen minus rejected reward",
    "stagerun_dpo_rewards_accuracy": "fraction of the last step's pairs whose chosen reward is above the rejected one",
    "stagerun_dpo_nll": "mean negative log-likelihood of the chosen responses' tokens (the dpo.nllWeight term)",
    "stagerun_dpo_pairs": "preference pairs in the last step's global batch",
}
PACKING_GAUGES = {
    "stagerun_split_conversations": "conversations longer than a row begun in the last step (split over rows, sft)",
    "stagerun_truncated_pairs": "preference pairs longer than a row cut to fit in the last step (dpo)",
}
POST_TRAINING_GAUGES = DPO_GAUGES | PACKING_GAUGES
# Remote shard reads of this process (data/remote_io.py's counters, read at scrape time).
DATA_GAUGES = {
    "stagerun_data_read_requests": ("requests", "ranged reads of remote shard files issued by this process"),
    "stagerun_data_fetched_bytes": ("bytes_fetched", "bytes of remote shard files fetched by this process"),
    "stagerun_data_read_retries": ("retries", "remote shard reads retried after a transient error"),
    "stagerun_data_cache_hit_bytes": ("cache_hit_bytes", "bytes served from the node-local shard chunk cache"),
}
# Per-phase evaluation (evaluation.py, spec.phases[].eval): the latest result, labelled with the phase it ran in.
EVAL_GAUGES = {
    "stagerun_eval_held_out_loss": ("held_out_loss", "mean cross-entropy on the held-out source (eval.heldOut)"),
    "stagerun_eval_needle_accuracy": (
        "needle_accuracy",
        "fraction of needle-in-a-haystack samples whose passkey was retrieved in full (eval.needle)",
    ),
    "stagerun_eval_tokens": ("tokens", "tokens seen when the latest evaluation ran"),
}
SOURCE_GAUGE = ("stagerun_source_tokens_seen", "tokens trained on per data source since the run started")
GPU_GAUGES = {
    "stagerun_gpu_utilization_ratio": "GPU busy fraction over the driver's last sample period",
    "stagerun_gpu_memory_used_bytes": "GPU memory in use",
    "stagerun_gpu_memory_total_bytes": "GPU memory in total",
    "stagerun_gpu_power_watts": "GPU power draw",
    "stagerun_gpu_temperature_celsius": "GPU temperature",
}
# Peak dense (not sparse) bf16 tensor-core TFLOP/s of one device, from NVIDIA's data sheets (which print the sparse
# figure, twice these, with an asterisk). Keyed by the model token of the device name, then the form factor: "SXM"
# (also the default when the name says none, as "NVIDIA H100 80GB HBM3" does), "PCIE", "NVL"; "*" for cards that
# come in one form only. A form the table does not list gives no peak rather than another form's.
PEAK_BF16_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"SXM": 989.0, "PCIE": 756.0, "NVL": 835.0},  # H100 data sheet (NVL: 1,671 sparse)
    "H200": {"SXM": 989.0, "NVL": 835.0},  # H200 data sheet: same tensor cores as H100 SXM / NVL
    "H800": {"SXM": 989.0, "PCIE": 756.0},  # H800 data sheets (the export variant of H100)
    "GH200": {"SXM": 989.0},  # GH200 Grace Hopper data sheet (its H100-class GPU)
    "A100": {"SXM": 312.0, "PCIE": 312.0},  # A100 data sheet: both forms
    "A800": {"SXM": 312.0, "PCIE": 312.0},  # A800 data sheets (the export variant of A100)
    "B200": {"SXM": 2250.0},  # HGX B200 data sheet: 4.5 PFLOP/s sparse per GPU
    "L40S": {"*": 362.0},  # L40S data sheet: 733 sparse
    "L40": {"*": 181.0},  # L40 data sheet: 362 sparse
    "L4": {"*": 121.0},  # L4 data sheet: 242 sparse
    "A10": {"*": 125.0},  # A10 data sheet: 250 sparse (not the A10G, which is slower: no peak)
}


def peak_flops_for(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of the device called ``device_name`` (torch.cuda.get_device_name()), None if unknown.

    The name is split into words and the model must be a whole word, so "L4" never matches "L40", "H20" never
    "H200", "A10" never "A100"; the form factor is a word too ("PCIe", "NVL"), so an NVL card is not read as SXM.
    """
    if not device_name:
        return None
    words = [w for w in re.split(r"[^A-Z0-9]+", device_name.upper()) if w]
    model = next((w for w in words if w in PEAK_BF16_TFLOPS), None)
    if model is None:
        return None
    forms = PEAK_BF16_TFLOPS[model]
    form = next((f for f in ("NVL", "PCIE") if f in words), "SXM")
    tflops = forms.get(form, forms.get("*"))
    return tflops * 1e12 if tflops is not None else None


# Two FLOPs-per-token conventions, both from the resolved model spec (forward + backward = 3 x forward; matmuls only,
# as MFU counts what the model needs, not what recomputation or kernels add). They differ in the attention term and
# in which parameters count: stagerun's (ModelSpec.flops_per_token) halves the score and value matmuls for the causal
# mask and counts a tied embedding once, as the LM head it also is; PaLM's (appendix B) and torchtitan's count the
# full square and drop every embedding parameter, so a tied LM head's FLOPs are not counted. torchtitan's MFU uses
# the latter: compare its numbers with stagerun_mfu_palm.
def stagerun_flops_per_token(model: ModelSpec, seq_len: int) -> int:
    """6 x (parameters - untied input embedding) + 6 x layers x dim x seqLen."""
    return model.flops_per_token(seq_len)


def palm_flops_per_token(model: ModelSpec, seq_len: int) -> int:
    """6 x (parameters - embedding) + 12 x layers x heads x headDim x seqLen (torchtitan's get_nparams_and_flops)."""
    layers, heads = resolved_value(model.layers, "layers"), resolved_value(model.heads, "heads")
    embedding = model.padded_vocab * resolved_value(model.dim, "dim")
    return 6 * (model.parameter_count() - embedding) + 12 * layers * heads * model.head_dim * seq_len


def mfu(tokens_per_second: float, flops_per_token: int, peak_flops: float | None) -> float | None:
    """Achieved over peak FLOP/s (``peak_flops`` of every device that produced ``tokens_per_second`` together)."""
    return tokens_per_second * flops_per_token / peak_flops if peak_flops else None


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
        self.eval_values: dict[str, float] = {}
        self.eval_phase = ""
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
        palm_flops_per_token: int | None = None,
        post_training: dict[str, float] | None = None,
    ) -> None:
        """``flops_per_token``: stagerun's convention (stagerun_flops_per_token); ``palm_flops_per_token``: PaLM's
        (palm_flops_per_token), whose gauges are absent when it is not given. ``post_training``: an sft/dpo step's
        values keyed by POST_TRAINING_GAUGES' names without ``stagerun_`` (StepRecord.post_training_values());
        the series of those it lacks are dropped."""
        tokens_per_second = batch_tokens / step_seconds if step_seconds > 0 else 0.0
        with self._lock:
            self.phase = phase
            self.source_tokens = {k: float(v) for k, v in tokens_per_source.items()}
            for name in POST_TRAINING_GAUGES:  # a stale reward must not carry the next phase's label
                self.values.pop(name, None)
        if post_training:
            unknown = sorted(f"stagerun_{k}" for k in post_training if f"stagerun_{k}" not in POST_TRAINING_GAUGES)
            if unknown:
                known = ", ".join(POST_TRAINING_GAUGES)
                raise ValueError(f"not post-training gauges: {', '.join(unknown)} (known: {known})")
            self.set(**post_training)
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
            mfu=mfu(tokens_per_second, flops_per_token, self.peak_flops),
            model_flops_per_token_palm=palm_flops_per_token,
            mfu_palm=mfu(tokens_per_second, palm_flops_per_token, self.peak_flops) if palm_flops_per_token else None,
        )

    def evaluation(self, result: Any) -> None:
        """The latest evaluation (an evaluation.EvalResult): its gauges carry the phase it ran in."""
        with self._lock:
            self.eval_phase = result.phase
            self.eval_values.update(
                {name: float(getattr(result, attr)) for name, (attr, _) in EVAL_GAUGES.items()
                 if getattr(result, attr) is not None}
            )  # fmt: skip

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
        for name, help_text in (STEP_GAUGES | POST_TRAINING_GAUGES).items():
            if name in values:
                family = GaugeMetricFamily(name, help_text, labels=names)
                family.add_metric(label_values, values[name])
                yield family
        stats = remote_io.STATS
        if stats.requests or stats.cache_hit_bytes:  # absent for a run on local shards
            for name, (attribute, help_text) in DATA_GAUGES.items():
                family = GaugeMetricFamily(name, help_text, labels=names)
                family.add_metric(label_values, float(getattr(stats, attribute)))
                yield family
        with self._lock:
            evals, eval_phase = dict(self.eval_values), self.eval_phase
        for name, (_, help_text) in EVAL_GAUGES.items():
            if name in evals:
                family = GaugeMetricFamily(name, help_text, labels=names)
                family.add_metric(label_values[:2] + [eval_phase, label_values[3]], evals[name])
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
