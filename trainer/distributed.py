"""Process layout: process group, DeviceMesh, its named sub-meshes and reductions, and how the model is split
across it (TP, FSDP2, AC, compile).

The degrees and every rank's coordinates come from stagerun.core.layout.ParallelLayout; here they become a mesh
over (dp_replicate, dp_shard, cp, tp) with the flattened sub-meshes ``batch`` (dp_replicate x dp_shard: ranks that
read different sequences) and ``loss`` (dp x cp: ranks that split the global batch's tokens, where token counts and
loss sums are reduced). FSDP2 shards over dp_shard (HSDP when dp_replicate > 1), tensor parallelism splits heads
and MLP columns over tp, context parallelism splits every sequence over cp (context_parallel.py; FSDP then
shards over dp_shard x cp, the ``dp_shard_cp`` mesh, as torchtitan does). The model is built on the meta device, split,
then materialised and initialised shard by shard (see model.init_weights), so no rank ever holds the whole model.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stagerun.core.layout import MESH_DIMS, LayoutError, ParallelLayout, RankCoordinates
from stagerun.core.spec import ResolvedPhase
from stagerun.core.spec.model import resolved_value

from .compat import flatten_mesh
from .context_parallel import ContextShard
from .context_parallel import apply_context_parallel as attach_context_parallel
from .model import Transformer


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the phase's layout: rank, device, the mesh and its named sub-meshes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ParallelLayout
    mesh: DeviceMesh  # (dp_replicate, dp_shard, cp, tp)
    batch_mesh: DeviceMesh  # dp_replicate x dp_shard, flattened
    loss_mesh: DeviceMesh  # dp_replicate x dp_shard x cp, flattened
    shard_cp_mesh: DeviceMesh | None = None  # dp_shard x cp, flattened: FSDP's mesh when cp > 1 (build_shard_cp_mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def coordinates(self) -> RankCoordinates:
        return self.layout.coordinates(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coordinates.dp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.mesh["cp"]

    @property
    def context_shard(self) -> ContextShard | None:
        """How this rank's batches keep its part of every sequence; None without context parallelism."""
        return ContextShard(self.coordinates.cp, self.layout.cp) if self.layout.cp > 1 else None

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """2-D for HSDP (replicate over dim 0, shard over dim 1), else the dp_shard dim alone. With cp > 1 it is
        dp_shard x cp: context-parallel peers hold the same parameters, so FSDP shards them over both and its
        reduce-scatter sums their gradients (each peer's loss covers its own tokens)."""
        if self.layout.cp > 1:
            if self.shard_cp_mesh is None or self.layout.dp_replicate > 1:
                raise RuntimeError("context parallelism needs Topology.shard_cp_mesh and dataParallelReplicate: 1")
            return self.shard_cp_mesh
        if self.layout.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    def sum_over_loss(self, values: list[float]) -> list[float]:
        """Sum scalars (token counts, loss sums, the batch checksum) over the ``loss`` group, the ranks that split
        the global batch's tokens. TP peers hold identical copies and each sums within its own group, so no copy
        is counted twice."""
        return self.all_reduce_loss_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def all_reduce_loss_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed in place over the ``loss`` group, on the device: nothing is read back (no host sync)."""
        if self.layout.loss > 1:
            dist.all_reduce(tensor, group=self.loss_mesh.get_group())
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank. A stop request is agreed by the whole world, not
        one sub-mesh, or some ranks would leave the step loop while their peers wait in a collective."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def build_mesh(layout: ParallelLayout, device_type: str) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh]:
    """The layout's mesh and its flattened ``batch`` and ``loss`` sub-meshes (collective: every rank calls it)."""
    mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=MESH_DIMS)
    batch = flatten_mesh(mesh["dp_replicate", "dp_shard"], "batch")
    loss = flatten_mesh(mesh["dp_replicate", "dp_shard", "cp"], "loss")
    return mesh, batch, loss


def build_shard_cp_mesh(mesh: DeviceMesh, layout: ParallelLayout) -> DeviceMesh | None:
    """FSDP's dp_shard x cp mesh when cp > 1 (collective: every rank calls it), else None."""
    return flatten_mesh(mesh["dp_shard", "cp"], "dp_shard_cp") if layout.cp > 1 else None


def init_topology(phase: ResolvedPhase, *, timeout_minutes: float = 30.0) -> Topology:
    """Initialise torch.distributed from torchrun's environment and build the phase's device mesh."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != phase.world_size:
        raise RuntimeError(
            f"phase {phase.name!r} is planned for {phase.world_size} processes but {world} were started; "
            "launch with the phase's world size (stagerun run --nproc N overrides it for local runs)"
        )
    # Validation rejects both cases earlier; kept as guards for direct callers.
    try:
        layout = ParallelLayout.of_phase(phase)
    except LayoutError as exc:
        raise RuntimeError(f"phase {phase.name!r}: {exc}") from None
    if layout.cp > 1 and layout.dp_replicate > 1:
        raise RuntimeError(
            f"phase {phase.name!r}: contextParallel > 1 with dataParallelReplicate > 1 is not supported; "
            "set dataParallelReplicate: 1 (FSDP shards over fsdp x contextParallel)"
        )
    use_gpu = phase.resources.gpus_per_node > 0
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("spec.resources.gpusPerNode > 0 but no CUDA device is visible; set gpusPerNode: 0 for CPU")
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if use_gpu else None,
        )
    mesh, batch, loss = build_mesh(layout, device.type)
    coords = layout.coordinates(rank)
    # The loader picks this rank's sequences from the pure arithmetic: it must agree with torch's mesh.
    if tuple(mesh.get_coordinate() or ()) != (coords.dp_replicate, coords.dp_shard, coords.cp, coords.tp):
        raise RuntimeError(f"rank {rank}: DeviceMesh coordinates {mesh.get_coordinate()} disagree with {coords}")
    return Topology(rank, world, local_rank, device, layout, mesh, batch, loss, build_shard_cp_mesh(mesh, layout))


def apply_context_parallel(model: Transformer, topo: Topology) -> None:
    """Every forward of ``model`` takes this rank's sequence shards and gathers K/V over cp (context_parallel.py)."""
    attach_context_parallel(model, topo.cp_mesh.get_group())


def apply_tensor_parallel(model: Transformer, topo: Topology) -> None:
    """Megatron-style tensor parallelism with sequence parallelism (torchtitan's Llama 3 plan as the reference).

    Between blocks the residual stream is split by sequence (Shard(1)): the norms run on their sequence shard,
    attention and the MLP gather the full sequence on entry, q/k/v and w1/w3 are split column-wise (by head /
    hidden unit), wo and w2 row-wise with a reduce-scatter back to sequence shards. The embedding and the head
    are split by vocabulary rows; the head stays split through the loss (loss parallel, losses.py), so no rank
    holds the logits of the whole vocabulary. Every parameter then lives on the tp mesh (norms replicated), and
    FSDP adds dp: one (dp x tp) mesh for all of them, which gradient clipping needs.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp_mesh, tp = topo.tp_mesh, topo.tp_size
    if model.spec.padded_vocab % tp:
        raise RuntimeError(
            f"spec.parallelism.tensorParallel: {tp} does not divide the padded vocabulary ({model.spec.padded_vocab}); "
            "the embedding and head are split by vocabulary rows: set spec.model.padVocabMultiple to a multiple "
            "of the degree"
        )
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
    }
    if model.output is not None:  # tied: the head is tok_embeddings.weight, already split by vocabulary rows
        # The head's weight is read directly by the fused loss (Transformer._head_weight): the module's input and
        # output hooks never run, the style only splits the weight by rows.
        root_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1))
    parallelize_module(model, tp_mesh, root_plan)
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    if model.spec.qk_norm:  # per-head norms on [B, T, H, D] split by head: their weight replicated like the others
        block_plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block_plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    heads = resolved_value(model.spec.heads, "heads")
    tp_rank = tp_mesh.get_local_rank()
    for block in model.blocks():
        parallelize_module(block, tp_mesh, block_plan)
        block.attention.head_offset = tp_rank * heads // tp  # picks this rank's ALiBi slopes


def check_sequence_parallel(seq_len: int, tp: int) -> None:
    """Sequence parallelism splits every sequence into tp equal parts."""
    if seq_len % tp:
        raise RuntimeError(
            f"spec.phases[*].seqLen: {seq_len} is not a multiple of spec.parallelism.tensorParallel ({tp}); "
            "sequence parallelism splits each sequence evenly across the tensor-parallel ranks"
        )


def apply_fsdp(model: Transformer, topo: Topology, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the data-parallel mesh: one unit per block, the rest (embeddings, final norm, head) in the root.

    Gradients are summed, not averaged, across ranks: the loop divides each micro-batch loss by the global token
    count, so the result is the exact mean however the batch is split (torchtitan does the same).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if topo.fsdp_mesh.size() == 1 and param_dtype is None and topo.tp_size == 1:
        # One rank, nothing to cast, no tensor parallelism (whose replicated norm weights under sequence parallel
        # get partial gradients that FSDP's reduction completes): nothing to shard, gather or reduce, and FSDP2
        # would still copy every parameter through its all-gather and gradient buffers and run its hooks (~15 % of
        # a small model's CPU step, benchmarks/step_overhead.py). torchtitan skips it too. DCP checkpoints stay
        # interchangeable: plain tensors and FSDP's DTensors save and load as the same global tensors.
        return
    kwargs: dict[str, Any] = {"mesh": topo.fsdp_mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block is needed again at the start of backward: keeping it gathered saves an all-gather.
        fully_shard(block, reshard_after_forward=index < last, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: see above
            # With no division left, a plain SUM: gloo (CPU) has no PREMUL_SUM, which FSDP picks otherwise.
            module.set_force_sum_reduction_for_comms(True)


def _selective_save_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: every matmul (plain, with bias, float8), attention
    (SDPA's kernels, FlexAttention), the tensor-parallel reduce-scatter (recomputing it would repeat a collective)
    and max (float8's amax, which sets the scale). Everything else (norms, RoPE, SiLU, products) is recomputed.

    All matmuls, not torchtitan's every other one: backward then recomputes only cheap elementwise ops instead of
    about half the forward matmuls (estimated ~15 % of a step's FLOPs, none of them counted by MFU), which is what
    the speed target needs. The price is memory: Llama 3 8B keeps ~86 KB per token per block in bf16 (~43 K
    values) against ~47 KB; where that does not fit (long sequences on big models), ``full`` keeps only each
    block's input.
    """
    import torch._higher_order_ops as hops

    aten = torch.ops.aten
    return {
        aten.mm.default,
        aten.addmm.default,
        aten._scaled_mm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_fused_attention_overrideable.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
        aten.max.default,
        hops.flex_attention,
    }


def _selective_context():
    """A context_fn for torch.utils.checkpoint: keep the outputs of ``_selective_save_ops``, recompute the rest.
    The policy is stateless, so a compiled block traces it once for every layer."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _selective_save_ops()

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Wrap every block for activation checkpointing: ``full`` recomputes the whole block in backward,
    ``selective`` keeps matmul and attention outputs and recomputes the cheap ops (op-level, as torchtitan's
    "selective op" mode), ``none`` leaves the blocks alone. Apply after tensor parallelism, before compile."""
    from .compat import checkpoint_wrapper

    if mode not in ("none", "selective", "full"):
        raise ValueError(f"activation checkpointing mode {mode!r}: expected none, selective or full")
    if mode == "none":
        return
    # Full mode passes no context_fn at all: dynamo cannot trace checkpoint's default noop_context_fn when given
    # explicitly (torch 2.13: "checkpoint not implemented for SkipFunctionVariable context_fn").
    for index, block in enumerate(model.layers):
        # RNG state is not preserved: the blocks have no dropout, and stashing it costs a device sync per block.
        if mode == "selective":
            block = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_selective_context)
        else:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers[index] = block


def apply_compile(model: Transformer) -> None:
    """Compile block by block, as torchtitan does. Blocks differ only by their parameters, which dynamo treats as
    inputs, and get their document mask as an input built outside them, so layer 0's compilation serves every
    layer (tests/test_gpu_paths.py checks: no graph break, no recompile). ``fullgraph``: a graph break is a bug."""
    for index, block in enumerate(model.layers):
        model.layers[index] = cast(nn.Module, torch.compile(block, fullgraph=True))


def _float8_refusal(topo: Topology) -> str | None:
    """Why float8 training cannot run here, or None."""
    if topo.device.type != "cuda":
        return "needs CUDA GPUs (this run trains on CPU)"
    capability = torch.cuda.get_device_capability(topo.device)
    if capability < (8, 9):
        found = f"{torch.cuda.get_device_name(topo.device)} has {capability[0]}.{capability[1]}"
        return f"needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); {found}"
    if topo.tp_size > 1:
        return "is not supported with tensorParallel > 1 yet (float8 tensor-parallel styles are not wired)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "needs torchao: pip install 'stagerun[float8]'"
    return None


def _float8_eligible(module: nn.Module, fqn: str) -> bool:
    """The blocks' linear layers whose dims float8 matmuls accept (multiples of 16); never the output head,
    whose logits feed the loss at full precision (torchtitan leaves it out too)."""
    if not fqn.startswith("layers.") or not isinstance(module, nn.Linear):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: Transformer, topo: Topology) -> None:
    """float8 matmuls in the blocks' linear layers (torchao, tensorwise dynamic scaling). With FSDP sharding the
    weights are all-gathered in float8 (half the bytes of bf16). Apply on the meta-device model, before activation
    checkpointing, compile and FSDP. Refuses, naming spec.training.float8, where it cannot run."""
    refusal = _float8_refusal(topo)
    if refusal is not None:
        raise RuntimeError(f"spec.training.float8: float8 training {refusal}; or set spec.training.float8: false")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=topo.layout.dp_shard > 1)
    convert_to_float8_training(model, config=config, module_filter_fn=_float8_eligible)


def all_reduce_sum(values: list[float], topo: Topology) -> list[float]:
    return topo.sum_over_loss(values)


def any_rank(flag: bool, topo: Topology) -> bool:
    return topo.any_rank(flag)


def shutdown() -> None:
    """Tear down the process group. Callers drop their model/optimizer first: an FSDP model still alive at
    interpreter exit sometimes aborts gloo's teardown ("terminate called without an active exception")."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
