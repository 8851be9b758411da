"""What stagerun's step costs over a bare PyTorch loop, on CPU, for the same model and batch.

    python benchmarks/step_overhead.py                    # small model, 5 rounds of 8 steps each
    python benchmarks/step_overhead.py --short            # tiny preset, a few steps (tests/test_benchmarks.py)
    python benchmarks/step_overhead.py --profile          # then where each spends its time (torch.profiler)

(a) stagerun: build_model + build_optimizer + train_step on a real single-process Topology (gloo), exactly as the
Trainer calls them, with the CPU defaults of spec.training (fp32, eager). (b) bare: a plain nn.Module of the same
architecture and parameter count, F.cross_entropy over the logits, torch.optim.AdamW(foreach=True) with the same
decay groups, backward, gradient clipping (stagerun clips at 1.0 by default), step. Both train on the same synthetic
batches; the rounds alternate which goes first, and the median step time of each is compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gpu_throughput import Shape, bench_run, single_process_topology, synthetic_batch
from torch import nn

from stagerun.core.spec import ModelSpec, ResolvedRun
from stagerun.trainer import distributed as D
from stagerun.trainer.batch import StepBatch
from stagerun.trainer.step import build_optimizer, train_step
from stagerun.trainer.train import build_model

SMALL = Shape(
    "small",
    {"preset": "tiny", "dim": 128, "layers": 4, "heads": 4, "kvHeads": 2, "ffnHidden": 384, "vocabSize": 4096},
    128,
    4,
)
SHORT = Shape("tiny", {"preset": "tiny"}, 64, 4)


class BareBlock(nn.Module):
    """Pre-norm block: GQA attention with RoPE (SDPA, causal) and a SwiGLU MLP, no biases: the tiny presets' shape."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dim, heads, kv_heads = spec.dim or 0, spec.heads or 0, spec.kv_heads or 0
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, spec.head_dim
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim, eps=spec.norm_eps), nn.RMSNorm(dim, eps=spec.norm_eps)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.w1 = nn.Linear(dim, spec.ffn_width, bias=False)
        self.w2 = nn.Linear(spec.ffn_width, dim, bias=False)
        self.w3 = nn.Linear(dim, spec.ffn_width, bias=False)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        f = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(f)) * self.w3(f))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class BareModel(nn.Module):
    def __init__(self, spec: ModelSpec, seq_len: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(spec.padded_vocab, spec.dim or 0)
        self.blocks = nn.ModuleList(BareBlock(spec) for _ in range(spec.layers or 0))
        self.norm = nn.RMSNorm(spec.dim or 0, eps=spec.norm_eps)
        inverse = 1.0 / ((spec.rope_theta or 1e4) ** (torch.arange(0, spec.head_dim, 2).float() / spec.head_dim))
        angles = torch.outer(torch.arange(seq_len).float(), inverse).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for param in self.parameters():
            if param.ndim >= 2:
                nn.init.normal_(param, std=spec.init_std or 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens)
        for block in self.blocks:
            h = block(h, self.cos, self.sin)
        return F.linear(self.norm(h), self.embedding.weight)  # tied head, as the tiny presets


class Bare:
    def __init__(self, run: ResolvedRun) -> None:
        spec = run.model
        if not spec.tied_embeddings or spec.norm != "rmsnorm" or spec.qkv_bias or spec.rotary_fraction != 1:
            raise ValueError("the bare model mirrors the tiny presets only (tied, RMSNorm, full RoPE, no biases)")
        self.model = BareModel(spec, run.phases[0].seq_len)
        assert sum(p.numel() for p in self.model.parameters()) == spec.parameter_count(), "not the same model"
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        opt = run.training.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
            foreach=True,
        )
        self.grad_clip = run.training.grad_clip

    def load_from(self, model: nn.Module) -> None:
        """Copy a stagerun Transformer's weights (FSDP-sharded DTensors: gathered) so both start identical."""
        renames = {"tok_embeddings.": "embedding.", "layers.": "blocks.", "attention.w": "w", "feed_forward.w": "w"}
        theirs = {}
        for name, value in model.state_dict().items():
            for old, new in renames.items():
                name = name.replace(old, new)
            theirs[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
        self.model.load_state_dict(theirs, strict=True)

    def step(self, batch) -> float:
        (mb,) = batch
        inputs, targets = torch.from_numpy(mb.inputs), torch.from_numpy(mb.targets)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class Stagerun:
    def __init__(self, run: ResolvedRun, topo: D.Topology) -> None:
        self.run, self.topo = run, topo
        self.model = build_model(run.model, run.training, topo)
        self.optimizer = build_optimizer(self.model, run.training, topo.device)

    def step(self, batch) -> float:
        phase = self.run.phases[0]
        step_batch = StepBatch.from_micro_batches(  # as the Trainer's prefetcher builds it (on CPU: no copy)
            batch,
            self.topo.device,
            doc_masking=self.run.training.doc_masking,
            global_tokens=phase.micro_batch_size * phase.seq_len,
        )
        result = train_step(self.model, self.optimizer, step_batch, lr=1e-4, topo=self.topo, training=self.run.training)
        return float(result.loss)  # the Trainer reads the loss every step at the default logEverySteps: 1


def time_steps(impl, batches: list, times: dict[str, list[float]]) -> None:
    """Appends each step's wall time to times["wall"] and its process CPU time (all threads) to times["cpu"]: on a
    shared machine, wall time also holds the waits for a core; CPU time does not."""
    for batch in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        impl.step(batch)
        times["wall"].append(time.perf_counter() - wall)
        times["cpu"].append(time.process_time() - cpu)


def measure(impls: dict, run: ResolvedRun, rounds: int, steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds on identical batches; each round alternates which implementation runs first."""
    rng = np.random.default_rng(0)
    warm = [synthetic_batch(run, rng) for _ in range(warmup)]
    for impl in impls.values():
        time_steps(impl, warm, {"wall": [], "cpu": []})
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in impls}
    names = list(impls)
    for index in range(rounds):
        batches = [synthetic_batch(run, rng) for _ in range(steps)]
        for name in names if index % 2 == 0 else names[::-1]:
            time_steps(impls[name], batches, times[name])
        medians = ", ".join(f"{n} {1e3 * statistics.median(t['wall']):.1f} ms" for n, t in times.items())
        print(f"round {index + 1}/{rounds}: median so far {medians}", file=sys.stderr, flush=True)
    return times


def report(times: dict[str, dict[str, list[float]]], shape: Shape) -> str:
    bare = {kind: statistics.median(times["bare"][kind]) for kind in ("wall", "cpu")}
    lines = [
        "| implementation | median step ms | min step ms | median CPU ms | steps | tokens/s | vs bare (wall) "
        "| vs bare (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        wall, cpu = statistics.median(values["wall"]), statistics.median(values["cpu"])
        cells = [f"{1e3 * wall:.2f}", f"{1e3 * min(values['wall']):.2f}", f"{1e3 * cpu:.2f}", str(len(values["wall"]))]
        cells += [f"{shape.seq_len * shape.micro_batch / wall:,.0f}", f"{wall / bare['wall']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cpu / bare['cpu']:.3f} |")
    ratio = statistics.median(times["stagerun"]["wall"]) / bare["wall"]
    lines += ["", f"stagerun / bare median step time: {ratio:.3f} (goal <= 1.05)"]
    return "\n".join(lines)


def profile(impls: dict, run: ResolvedRun, steps: int) -> str:
    """The top operators by self CPU time of each implementation over the same steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rng, parts = np.random.default_rng(1), []
    batches = [synthetic_batch(run, rng) for _ in range(steps)]
    for name, impl in impls.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(impl, batches, {"wall": [], "cpu": []})
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        parts.append(f"### {name} ({steps} steps)\n\n```\n{table}\n```")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="tiny preset, seq 64, 2 rounds of 3 steps")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 2 with --short)")
    parser.add_argument("--steps", type=int, help="steps per round and implementation (default 8; 3 with --short)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="then profile both with torch.profiler")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    shape = SHORT if args.short else SMALL
    rounds = args.rounds or (2 if args.short else 5)
    steps = args.steps or (3 if args.short else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = bench_run(shape, gpu=False)
    topo = single_process_topology(run)
    impls = {"stagerun": Stagerun(run, topo), "bare": Bare(run)}
    impls["bare"].load_from(impls["stagerun"].model)
    model = run.model
    print(
        f"model: {shape.name} (dim {model.dim}, {model.layers} layers, {model.parameter_count():,} parameters), "
        f"batch {shape.micro_batch} x {shape.seq_len} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    text = report(measure(impls, run, rounds, steps, warmup=2), shape)
    if args.profile:
        text += "\n\n" + profile(impls, run, steps)
    print(text, flush=True)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
