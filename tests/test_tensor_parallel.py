"""Tensor parallelism (with sequence parallelism and the loss split by vocabulary) is the same maths as one process.

Each layout runs tests/_tp_worker.py under torchrun (gloo, CPU): the real train_step on the tiny model, against a
plain single-process reference on the same seed and global batch. Cases: untied RoPE with z-loss and max-z;
tied embeddings + NormHead + document masking with 5-token loss chunks; query/key norms with per-document positions;
ALiBi + NormHead + distillation. Each runs with the global token count given (StepBatch.global_tokens) and counted
on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_tp_worker.py")
# float32 throughout; TP changes only the order of the reductions (measured: <= 7.3e-7 on the loss terms and the
# norm, <= 1.3e-6 on the gradients, dp2 x tp2), so 1e-5 catches any real difference (a missing all-reduce is off
# by ~50%).
RTOL = 1e-5


def run_layout(tmp_path: Path, dp: int, tp: int) -> dict:
    out = tmp_path / f"dp{dp}-tp{tp}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp * tp}",
        "--monitor-interval=0.1", str(WORKER), str(out), "--dp", str(dp), "--tp", str(tp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {' '.join(cmd[3:])} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def check_matches_single_process(results: dict) -> None:
    assert len(results) == 8
    for case, r in results.items():
        assert r["finite"], case
        assert r["tokens"][0] == r["tokens"][1], case
        for key, value in r.items():
            if key.endswith("_rel") and key != "grad_rel":  # the gradients: per parameter, below
                assert value < RTOL, (case, key, value)
        assert r["zero_terms"] == [], case  # terms the reference has at 0 (disabled) are 0 here too
        assert r["same_params"], case
        worst = max(r["grad_rel"].items(), key=lambda item: item[1])
        assert worst[1] < 10 * RTOL, (case, worst)
        assert r["grad_norm"][1] > 0.5, case  # grad_clip 0.5: the gradients compared were really clipped


def check_no_host_reads_and_one_metrics_all_reduce(results: dict) -> None:
    for case, r in results.items():
        assert r["reads"] == {}, (case, r["reads"])  # no .item()/.tolist()/float()/bool() inside the step
        loss_group = r["all_reduces"].get("loss", 0)
        # The metrics all-reduce, plus the token count's when StepBatch.global_tokens is unset (only with dp > 1:
        # a single-rank loss group reduces nothing).
        assert loss_group <= (1 if case.endswith("/known") else 2), (case, r["all_reduces"])
        assert set(r["all_reduces"]) <= {"loss", "tp"}, (case, r["all_reduces"])


def test_tp2_equals_a_single_process(tmp_path):
    results = run_layout(tmp_path, dp=1, tp=2)
    check_matches_single_process(results)
    check_no_host_reads_and_one_metrics_all_reduce(results)


def test_fsdp2_step_has_no_host_sync_and_one_all_reduce(tmp_path):
    results = run_layout(tmp_path, dp=2, tp=1)
    check_matches_single_process(results)
    check_no_host_reads_and_one_metrics_all_reduce(results)
    assert results["untied-rope/known"]["all_reduces"] == {"loss": 1}
    assert results["untied-rope/counted"]["all_reduces"] == {"loss": 2}


@pytest.mark.slow
def test_dp2_x_tp2_equals_a_single_process(tmp_path):
    results = run_layout(tmp_path, dp=2, tp=2)
    check_matches_single_process(results)
    check_no_host_reads_and_one_metrics_all_reduce(results)
