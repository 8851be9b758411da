"""torchtitan's Llama 3 trainer on a stagerun shape, for gpu_throughput.py: its own trainer and CLI in a subprocess.

gpu_throughput.py calls :func:`run_torchtitan`; this file is also what torchrun starts (``__main__``): it registers
the shape as a torchtitan train spec with synthetic data and hands over to torchtitan's ``main``. It drives the CLI
of torchtitan 0.2.x (0.2.2 is the newest that imports on torch 2.11); nothing of torchtitan is imported until then.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

from stagerun.core.spec import ResolvedRun

SUPPORTED = "0.2.x (0.2.2 is the newest that imports on torch 2.11)"
MODEL_ENV = "STAGERUN_BENCH_MODEL"  # the TransformerModelArgs, as JSON, for the worker
LOG_LINE = re.compile(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%")


@dataclass(frozen=True)
class TitanResult:
    step: int  # the step of the log line read
    reserved_gib: float  # torchtitan logs max reserved memory (>= allocated)
    tokens_per_second: float  # per device, over the last window of `steps` steps
    mfu_percent: float  # its own MFU (PaLM convention, its peak table)


def skip_reason() -> str | None:
    """Why the comparison cannot run here, or None."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return f"torchtitan is not installed: pip install torchtitan==0.2.2 ({SUPPORTED})"
    if not version.startswith("0.2."):
        return f"torchtitan {version} is installed; this comparison drives the CLI of {SUPPORTED}"
    return None


def model_args(run: ResolvedRun) -> dict:
    """Llama 3 TransformerModelArgs with the shape's widths (torchtitan rounds 8/3 x dim x multiplier up to
    multiple_of: with multiple_of = the width, it lands on exactly our SwiGLU width)."""
    model = run.model
    dim, width = model.dim or 0, model.ffn_width
    return dict(
        dim=dim,
        n_layers=model.layers,
        n_heads=model.heads,
        n_kv_heads=model.kv_heads,
        vocab_size=model.padded_vocab,
        multiple_of=width,
        ffn_dim_multiplier=width / int(8 * dim / 3),
        norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
    )


def cli(seq_len: int, local_batch: int, warmup: int, steps: int, dump: str) -> list[str]:
    """torchtitan's own flags for the GPU defaults stagerun uses: compile, selective op-level AC, fused AdamW, bf16.

    It logs tokens/s averaged since its previous log line: log every ``steps`` steps and train until the last
    window of ``steps`` steps follows at least ``warmup`` steps, then read the last line."""
    total = steps * (1 + math.ceil(warmup / steps))
    return [
        *("--model.name", "stagerun_bench", "--model.flavor", "bench", "--job.dump_folder", dump),
        *("--training.local_batch_size", str(local_batch), "--training.seq_len", str(seq_len)),
        *("--training.steps", str(total), "--lr_scheduler.warmup_steps", "1"),
        *("--metrics.log_freq", str(steps), "--metrics.disable_color_printing"),
        *("--compile.enable", "--activation_checkpoint.mode", "selective"),
        *("--activation_checkpoint.selective_ac_option", "op", "--optimizer.implementation", "fused"),
        *("--training.mixed_precision_param", "bfloat16", "--parallelism.data_parallel_shard_degree", "1"),
    ]


def parse_log(text: str) -> TitanResult | None:
    """The last metrics line torchtitan logged, or None."""
    matches = LOG_LINE.findall(text)
    if not matches:
        return None
    step, memory, tps, mfu_percent = matches[-1]
    return TitanResult(int(step), float(memory), float(tps.replace(",", "")), float(mfu_percent))


def run_torchtitan(run: ResolvedRun, flags: list[str], deadline: float, log) -> TitanResult | str:
    """Train with torchtitan on one GPU (torchrun, this file as the worker): its result, or why there is none."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", __file__]
    env = dict(os.environ, **{MODEL_ENV: json.dumps(model_args(run))})
    returncode, output = run_streaming(command + flags, env, deadline, log)
    parsed = parse_log(output)
    if returncode != 0 or parsed is None:
        reason = "--max-seconds reached while it ran" if returncode == -signal.SIGKILL else f"exit code {returncode}"
        return reason + ": " + " / ".join(output.strip().splitlines()[-5:])
    return parsed


def run_streaming(command: list[str], env: dict[str, str], deadline: float, log) -> tuple[int, str]:
    """Run ``command`` in its own process group, echo its metrics lines as progress, kill the group at ``deadline``
    (torchrun's worker would otherwise outlive a killed torchrun and keep the GPU)."""
    lines: list[str] = []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as process:
        timer = threading.Timer(max(1.0, deadline - time.monotonic()), os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
        try:
            for line in process.stdout or ():
                lines.append(line)
                if LOG_LINE.search(line) or "Error" in line:
                    log("torchtitan: " + line.strip()[-160:])
        finally:
            timer.cancel()
    return process.returncode, "".join(lines)


def worker() -> None:
    """Under torchrun: register the shape as a train spec with synthetic data, then run torchtitan's main."""
    import torchtitan.train as titan  # reads sys.argv[1:] (the flags) as its parse_args default, at import
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.models.llama3 import TransformerModelArgs, get_train_spec
    from torchtitan.protocols.train_spec import register_train_spec

    args = json.loads(os.environ[MODEL_ENV])

    class SyntheticLoader(BaseDataLoader):
        """Random tokens, the same distribution as gpu_throughput.py's (no document masking either side)."""

        def __init__(self, job_config) -> None:
            self.shape = (job_config.training.local_batch_size, job_config.training.seq_len + 1)

        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            while True:
                tokens = torch.randint(0, args["vocab_size"], self.shape, generator=generator)
                yield {"input": tokens[:, :-1]}, tokens[:, 1:]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

    spec = dataclasses.replace(
        get_train_spec(),
        model_args={"bench": TransformerModelArgs(**args)},
        build_dataloader_fn=lambda job_config, **_: SyntheticLoader(job_config),
        build_tokenizer_fn=None,
        build_validator_fn=None,
    )
    register_train_spec("stagerun_bench", spec)
    titan.main(titan.Trainer)


if __name__ == "__main__":
    worker()
