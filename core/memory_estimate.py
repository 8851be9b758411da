"""Estimated memory per GPU of each phase: what `stagerun plan` prints and `stagerun validate` warns about.

A model of what the trainer holds at the peak of a step (the start of backward, when every saved activation is
still alive and the loss's backward works on its first chunk), per rank:

- parameters: fp32 master weights sharded over FSDP (dp_shard x cp) and TP, plus the blocks FSDP2 has unsharded at
  once (the current one and the prefetched next, in the compute dtype);
- gradients: fp32 (FSDP reduces in fp32), sharded like the parameters;
- optimizer state: two fp32 tensors per parameter for both optimizers (AdamW: exp_avg, exp_avg_sq;
  rmspropMomentum: square_avg, momentum_buffer; trainer/step.py);
- activations: what autograd keeps per token and block (counted op by op below, for each activation-checkpointing
  mode), for the micro-batch's tokens on this rank (seq len / cp / tp with sequence parallelism), plus the working
  set of the one block that backward recomputes under checkpointing;
- frozen models: a distillation teacher or a dpo phase's reference, built and sharded like the policy (fp32
  weights, FSDP's gathered blocks while it runs), no gradients or optimizer state, activations freed as it goes;
- loss: the fused chunked loss (trainer/losses.py) holds one chunk of fp32 logits over this rank's vocabulary rows
  in backward, with its gradient and the head's fp32 gradient accumulator.

The parts do not all peak together. Backward starts with the loss (every saved activation alive, no gradient yet)
and ends with every gradient (activations freed block by block, the last block's recomputed under checkpointing),
so the peak is parameters + optimizer state + the larger of (activations + loss) and (gradients + activations +
the recomputed block): the latter counts every saved activation still alive at the end, the safe side for a "does
it fit" check. benchmarks/memory_estimate.py measures the peak of real CPU steps against this model;
tests/test_memory_estimate.py keeps the two within a stated factor.
Pure arithmetic on the resolved spec: no torch here (core/ imports neither torch nor kopf).
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec.model import ModelSpec, resolved_value
from .spec.resolve import ResolvedPhase, ResolvedRun
from .spec.validate import phase_layout

__all__ = ["MemoryEstimate", "activation_values_per_token", "estimate_phase_memory", "format_bytes", "memory_rows"]

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank at the peak of a step of one phase."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward by every block, plus the embedding's and final norm's
    recompute: int  # the one block backward re-runs under activation checkpointing (0 without)
    loss: int
    frozen: int = 0  # a teacher's or a dpo reference's weights (no gradients, no optimizer state)

    @property
    def total(self) -> int:
        start_of_backward = self.activations + self.loss
        end_of_backward = self.gradients + self.activations + self.recompute
        return self.parameters + self.frozen + self.optimizer + max(start_of_backward, end_of_backward)


def activation_values_per_token(model: ModelSpec, mode: str, *, compiled: bool) -> int:
    """Values autograd keeps per token in one block (TransformerBlock), for activation checkpointing ``mode``.

    ``none``, counted from the saved tensors of an eager block (torch.autograd.graph.saved_tensors_hooks):
    each RMSNorm keeps its input, input x rstd and the normalised output (the next matmul's input): 3d, twice;
    attention keeps q (d), k and v (kv each, after RoPE) and its output (d); SwiGLU keeps w1 x, w3 x, silu(w1 x)
    and the product (4 x ffn). Compiled blocks let inductor's partitioner recompute the norm's intermediate and
    SwiGLU's elementwise results (2d per norm, 2 x ffn). LayerNorm keeps its input and output (native kernel).
    ``selective`` (distributed.py's save list: matmul and attention outputs, block input) measures
    3d + 2 kv + 2 x ffn; ``full`` keeps only the block's input (d).
    """
    d = resolved_value(model.dim, "dim")
    kv = resolved_value(model.kv_heads, "kvHeads") * model.head_dim
    ffn = model.ffn_width
    if mode == "full":
        return d
    if mode == "selective":
        return 3 * d + 2 * kv + 2 * ffn
    norm = 2 * d if (compiled or model.norm == "layernorm") else 3 * d
    return 2 * norm + 2 * d + 2 * kv + (2 if compiled else 4) * ffn


def estimate_phase_memory(run: ResolvedRun, phase: ResolvedPhase) -> MemoryEstimate:
    model, training = run.model, run.training
    gpu = phase.resources.gpus_per_node > 0
    layout = phase_layout(phase)
    shard, cp, tp = (layout.dp_shard * layout.cp, layout.cp, layout.tp) if layout is not None else (1, 1, 1)
    compute_bytes = 2 if training.uses_bf16(gpu) else 4
    mode = training.checkpointing_mode(gpu)
    compiled = training.uses_compile(gpu)
    layers = resolved_value(model.layers, "layers")

    params = model.parameter_count()
    block_params = model.parameter_count(include_embedding=False) // layers
    held = -(-params // (shard * tp))  # this rank's share (ceil)
    gathered = 2 * block_params // tp * compute_bytes if shard > 1 else 0  # FSDP2: current block + prefetched next
    parameters = held * 4 + gathered
    gradients = held * 4 + (gathered if shard > 1 else 0)  # the unsharded block's gradient before reduce-scatter
    optimizer = 2 * held * 4

    tokens = phase.micro_batch_size * phase.seq_len // cp  # this rank's tokens of a micro-batch
    per_token = activation_values_per_token(model, mode, compiled=compiled)
    # Sequence parallelism splits the activations between the norms and the matmuls over tp; attention and the MLP
    # interior are split by heads / hidden columns: to first order every saved value divides by tp.
    saved = layers * tokens * per_token * compute_bytes // tp
    recompute = 0
    if mode != "none":  # backward re-runs one block at a time and holds its full activations meanwhile
        recompute = tokens * activation_values_per_token(model, "none", compiled=compiled) * compute_bytes // tp
    d = resolved_value(model.dim, "dim")
    around = tokens * d * compute_bytes * 3  # the embedding output, the final norm's input and output
    activations = saved + around

    vocab = model.padded_vocab // tp
    chunk = min(training.loss_chunk_tokens, tokens)
    # One chunk's fp32 logits and its gradient (fp32, then cast to the compute dtype), the head's fp32 gradient
    # accumulator when there is more than one chunk, the per-token statistics, the hidden states' gradient.
    loss = chunk * vocab * (4 + compute_bytes) + tokens * (12 + d * compute_bytes)
    if tokens > chunk:
        loss += vocab * d * 4
    return MemoryEstimate(
        parameters, gradients, optimizer, activations, recompute, loss, _frozen(run, phase, shard * tp)
    )


def _frozen(run: ResolvedRun, phase: ResolvedPhase, shards: int) -> int:
    """fp32 weights of the model the phase runs beside the policy, this rank's share."""
    if phase.kind == "dpo":
        count = run.model.parameter_count()  # the reference has the policy's architecture
    elif phase.distill is not None:
        from .spec.presets import resolve_model

        teacher = phase.distill.teacher.model
        count = (resolve_model(teacher) if teacher is not None else run.model).parameter_count()
    else:
        return 0
    return -(-count // shards) * 4


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def memory_rows(run: ResolvedRun, gpu_memory: dict[str, int | None] | None = None) -> list[tuple[str, ...]]:
    """One row per phase: the parts and their total per rank; ``gpu_memory`` (phase name -> bytes per GPU, when
    known) adds the share of the GPU the total takes."""
    rows = []
    for phase in run.phases:
        est = estimate_phase_memory(run, phase)
        # A teacher's or reference's weights count with the parameters: the table keeps its columns.
        parts = (est.parameters + est.frozen, est.gradients, est.optimizer, est.activations + est.recompute, est.loss)
        row = (phase.name,) + tuple(format_bytes(v) for v in parts)
        row += (format_bytes(est.total),)
        capacity = (gpu_memory or {}).get(phase.name)
        if gpu_memory is not None:
            row += (f"{100 * est.total / capacity:.0f}%" if capacity else "?",)
        rows.append(row)
    return rows


def gpu_memory_of(phase: ResolvedPhase) -> int | None:
    """Bytes of one GPU of the phase's resources (``resources.gpuMemory``); None when unknown or on CPU."""
    from .spec.quantities import resource_quantity_value

    memory = phase.resources.gpu_memory
    if phase.resources.gpus_per_node == 0 or memory is None:
        return None
    return int(resource_quantity_value(memory))


def memory_warnings(run: ResolvedRun) -> list[str]:
    """One line per phase whose estimate exceeds the GPU memory its resources name (a warning: the estimate is a
    model, and allocator fragmentation or a kernel's workspace can move the real peak either way)."""
    lines = []
    for phase in run.phases:
        capacity = gpu_memory_of(phase)
        est = estimate_phase_memory(run, phase)
        if capacity is None or est.total <= capacity:
            continue
        own = run.manifest.spec.phases[phase.index].resources is not None
        field = f"spec.phases[{phase.index}].resources.gpuMemory" if own else "spec.resources.gpuMemory"
        parts = (
            f"parameters {format_bytes(est.parameters)}, "
            + (f"teacher/reference {format_bytes(est.frozen)}, " if est.frozen else "")
            + f"gradients {format_bytes(est.gradients)}, optimizer "
            f"{format_bytes(est.optimizer)}, activations {format_bytes(est.activations + est.recompute)}, loss "
            f"{format_bytes(est.loss)}"
        )
        lines.append(
            f"phase {phase.name}: estimated {format_bytes(est.total)} per GPU ({parts}) exceeds {field} "
            f"{phase.resources.gpu_memory}: lower microBatchSize, use activationCheckpointing: selective or full, "
            "raise contextParallel or tensorParallel, or shard over more ranks (see `stagerun plan`)"
        )
    return lines
