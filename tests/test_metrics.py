"""Trainer metrics: values, labels, MFU, and GPU telemetry present (NVML double) or cleanly absent (no NVML)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from stagerun.trainer.metrics import GpuTelemetry, TrainerMetrics, peak_flops_for
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
