"""Trainer metrics: values, labels, MFU, and GPU telemetry present (NVML double) or cleanly absent (no NVML)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from stagerun.core.spec import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer.metrics import (
    GpuTelemetry,
    TrainerMetrics,
    palm_flops_per_token,
    peak_flops_for,
    stagerun_flops_per_token,
)
from stagerun.trainer.status_server import StatusServer

NVML_STUB = Path(__file__).parent / "stubs" / "nvml"


def step(metrics: TrainerMetrics, phase="core", **changes):
    values = dict(
        phase=phase,
        phase_index=0,
        step=10,
        tokens=20480,
        loss=5.5,
        z_loss=0.0,
        max_z_loss=0.01,
        grad_norm=0.7,
        lr=1e-3,
        batch_tokens=2048,
        seq_len=64,
        step_seconds=0.5,
        data_seconds=0.01,
        flops_per_token=1_000_000,
        tokens_per_source={"docs": 10240, "code": 10240},
    )
    values.update(changes)
    metrics.step(**values)


def exposition(metrics: TrainerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_step_values_and_labels():
    metrics = TrainerMetrics("demo", "team-a", 0, peak_flops_per_device=None, world_size=2)
    step(metrics)
    text = exposition(metrics)
    assert 'stagerun_loss{namespace="team-a",phase="core",rank="0",run="demo"} 5.5' in text
    assert 'stagerun_tokens_per_second{namespace="team-a",phase="core",rank="0",run="demo"} 4096.0' in text
    assert 'stagerun_batch_sequences{namespace="team-a",phase="core",rank="0",run="demo"} 32.0' in text
    assert 'source="code"' in text and "stagerun_mfu" not in text  # no peak known: no MFU rather than a wrong one


def test_mfu_is_achieved_over_peak_of_the_gang():
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=1e9, world_size=2)
    step(metrics)  # 4096 tokens/s x 1e6 FLOPs/token over 2 x 1e9 FLOP/s
    assert "stagerun_mfu{" in exposition(metrics)
    assert metrics.values["stagerun_mfu"] == pytest.approx(4096 * 1e6 / 2e9)


def test_a_phase_change_leaves_no_stale_series():
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=None, world_size=1)
    step(metrics, phase="core")
    step(metrics, phase="anneal")
    text = exposition(metrics)
    assert 'phase="anneal"' in text and 'phase="core"' not in text


def test_checkpoint_counters():
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=None, world_size=1)
    metrics.checkpoint_saved(0.25, 123456)
    metrics.checkpoint_saved(0.5, 123457)
    assert metrics.values["stagerun_checkpoints_saved"] == 2
    assert metrics.values["stagerun_checkpoint_save_seconds"] == 0.5


def test_peak_flops_by_device_name():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some CPU") is None and peak_flops_for(None) is None


# torch.cuda.get_device_name() strings -> dense bf16 TFLOP/s from the data sheets (half the sparse figure).
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989,  # SXM: the name says no form factor
    "NVIDIA H100 SXM5 80GB": 989,
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,  # not 989: the NVL card is clocked lower
    "NVIDIA H200": 989,
    "NVIDIA H200 NVL": 835,
    "NVIDIA H800": 989,
    "NVIDIA H800 PCIe": 756,
    "NVIDIA GH200 480GB": 989,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A800-SXM4-80GB": 312,
    "NVIDIA B200": 2250,
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,  # "L4" is a prefix of "L40": whole words only
    "NVIDIA L4": 121,
    "NVIDIA A10": 125,
}


@pytest.mark.parametrize("name", sorted(DEVICE_PEAKS))
def test_peak_flops_table_matches_whole_words_and_form_factors(name):
    assert peak_flops_for(name) == DEVICE_PEAKS[name] * 1e12
    assert peak_flops_for(name.lower()) == DEVICE_PEAKS[name] * 1e12  # case does not matter


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H20",  # a prefix of H200, a different (much slower) chip
        "NVIDIA A10G",  # not an A10
        "NVIDIA H200 PCIe",  # no such card in the table: no peak rather than the SXM one
        "NVIDIA GeForce RTX 4090",
        "NVIDIA GB200",
        "",
    ],
)
def test_unknown_devices_have_no_peak(name):
    assert peak_flops_for(name) is None


def stablelm2_shape() -> dict:
    """stablelm2-1.6b's widths, written out: the hand computation below does not trust parameter_count()."""
    d, layers, heads, ffn, vocab = 2048, 24, 32, 5632, 100352  # vocab 100289 padded to a multiple of 64
    attention = 4 * d * d + 3 * d  # q, k, v, o (32 KV heads: k and v are d x d) + q/k/v biases
    block = attention + 3 * d * ffn + 2 * 2 * d  # SwiGLU + two LayerNorms with bias
    params = layers * block + 2 * d + 2 * vocab * d  # final LayerNorm, untied embedding and head
    return dict(d=d, layers=layers, heads=heads, head_dim=d // heads, params=params, embedding=vocab * d)


def test_flops_per_token_conventions_by_hand_for_stablelm2():
    model, seq = resolve_model(ModelSpec(preset="stablelm2-1.6b")), 4096
    s = stablelm2_shape()
    assert model.parameter_count() == s["params"] == 1_644_515_328
    matmuls = 6 * (s["params"] - s["embedding"])  # the head is a matmul; the input embedding is a lookup
    assert stagerun_flops_per_token(model, seq) == matmuls + 6 * s["layers"] * s["d"] * seq == 9_841_926_144
    palm = matmuls + 12 * s["layers"] * s["heads"] * s["head_dim"] * seq  # no causal halving
    assert palm_flops_per_token(model, seq) == palm == 11_049_885_696
    # The conventions differ by exactly the halved attention term; at 4K it is ~11 % of the total.
    assert palm - stagerun_flops_per_token(model, seq) == 6 * s["layers"] * s["d"] * seq


def test_palm_convention_drops_a_tied_embedding_as_torchtitan_does():
    model = resolve_model(ModelSpec(preset="tiny"))  # tied: the embedding is also the LM head
    d, layers, seq = 64, 2, 64
    body = model.parameter_count() - 512 * d
    assert palm_flops_per_token(model, seq) == 6 * body + 12 * layers * d * seq
    assert stagerun_flops_per_token(model, seq) == 6 * (body + 512 * d) + 6 * layers * d * seq


def test_both_mfu_conventions_are_exported():
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=1e9, world_size=2)
    step(metrics, palm_flops_per_token=1_500_000)
    assert metrics.values["stagerun_mfu"] == pytest.approx(4096 * 1e6 / 2e9)
    assert metrics.values["stagerun_mfu_palm"] == pytest.approx(4096 * 1.5e6 / 2e9)
    text = exposition(metrics)
    assert "stagerun_model_flops_per_token_palm{" in text
    assert "# HELP stagerun_mfu_palm" in text and "no causal halving" in text


def test_without_nvml_gpu_metrics_are_absent_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as on a machine without nvidia-ml-py
    gpus = GpuTelemetry()
    assert not gpus.available and gpus.sample() == [] and gpus.device_name() is None
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=None, world_size=1, gpus=gpus)
    step(metrics)
    assert "stagerun_gpu" not in exposition(metrics)


def test_with_nvml_every_gpu_is_reported(monkeypatch):
    monkeypatch.syspath_prepend(str(NVML_STUB))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    gpus = GpuTelemetry()
    assert gpus.available and gpus.device_name() == "NVIDIA H100 80GB HBM3"
    text = exposition(TrainerMetrics("demo", "", 0, peak_flops_per_device=None, world_size=1, gpus=gpus))
    assert 'stagerun_gpu_power_watts{gpu="1",namespace="",rank="0",run="demo"} 351.0' in text
    assert text.count("stagerun_gpu_temperature_celsius{") == 2


def test_status_server_serves_progress_and_metrics():
    metrics = TrainerMetrics("demo", "", 0, peak_flops_per_device=None, world_size=1)
    step(metrics)
    server = StatusServer("127.0.0.1", 0, registry=metrics.registry)
    try:
        server.update(step=10, lastStepAt=1.0)
        base = f"http://127.0.0.1:{server.port}"
        assert json.loads(urllib.request.urlopen(f"{base}/progress").read())["step"] == 10
        assert b"stagerun_loss" in urllib.request.urlopen(f"{base}/metrics").read()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/nothing")
    finally:
        server.close()
    gpu_only = StatusServer("127.0.0.1", 0, registry=metrics.registry, serves_progress=False)
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{gpu_only.port}/progress")
    finally:
        gpu_only.close()
