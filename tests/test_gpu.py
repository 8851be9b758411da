"""GPU paths (NCCL, bf16, compiled FlexAttention, float8). Skipped without CUDA; on a GPU machine run
`python -m pytest -m gpu tests/test_gpu.py`. Their CPU counterparts are in tests/test_gpu_paths.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import run_tiny, tiny_run, write_manifest
from torch._dynamo.utils import counters

from stagerun.core.layout import ParallelLayout
from stagerun.core.spec import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer import distributed as D
from stagerun.trainer.model import Transformer, init_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_model(seed: int = 0, **changes) -> Transformer:
    model = Transformer(resolve_model(ModelSpec(preset="tiny", **changes))).cuda()
    init_weights(model, seed)
    return model


def packed_batch(seq: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, 512, (2, seq), device="cuda", generator=generator)
    doc_ids = torch.cumsum((torch.rand(2, seq, device="cuda", generator=generator) < 0.02).int(), dim=1)
    return tokens, doc_ids


def loss_and_grads(model: Transformer, tokens: torch.Tensor, doc_ids: torch.Tensor):
    model.zero_grad()
    loss = model(tokens, doc_ids).float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_flex_document_masking_matches_the_explicit_mask_on_cuda(position):
    """On CUDA the rule picks FlexAttention (compiled kernel, GQA without copies); values and gradients agree with
    SDPA on the dense mask (fp32; flex's online softmax reorders sums: 1e-4)."""
    flex, dense = cuda_model(position=position), cuda_model(position=position)
    for layer in dense.layers:
        layer.attention.use_flex = False
    assert flex.layers[0].attention.wants_flex(torch.device("cuda"))
    tokens, doc_ids = packed_batch()
    flex_loss, flex_grads = loss_and_grads(flex, tokens, doc_ids)
    dense_loss, dense_grads = loss_and_grads(dense, tokens, doc_ids)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(flex_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_compiled_flex_blocks_with_selective_checkpointing_are_one_graph_on_cuda():
    """What training on GPUs runs by default: selective AC + compile + FlexAttention document masks, lowered by
    inductor. One graph for every layer and batch, no graph break, and the eager model's loss and gradients."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = cuda_model(), cuda_model()
    D.apply_activation_checkpointing(compiled, "selective")
    D.apply_compile(compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            tokens, doc_ids = packed_batch(seed=seed)
            want_loss, want_grads = loss_and_grads(eager, tokens, doc_ids)
            got_loss, got_grads = loss_and_grads(compiled, tokens, doc_ids)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_init_on_cuda_draws_each_shard_on_the_device_with_the_full_draws_values():
    """Blocks are drawn with CUDA generators on a CUDA model: the same values for any box of a parameter."""
    from stagerun.trainer.model import fill_local_shard

    shape = (3000, 1024)  # 3 blocks of 2^20 elements
    full = torch.empty(shape, device="cuda")
    fill_local_shard(full, shape, (0, 0), 0.02, 5, "layers.0.feed_forward.w1.weight")
    box = torch.empty(1000, 300, device="cuda")
    fill_local_shard(box, shape, (900, 700), 0.02, 5, "layers.0.feed_forward.w1.weight")
    assert torch.equal(box, full[900:1900, 700:1000])
    assert full.std().item() == pytest.approx(0.02, rel=0.01)


def test_tiny_run_on_one_gpu_with_nccl_and_the_gpu_defaults(run_dir, tmp_path):
    """NCCL, and every GPU default on: bf16, compile, selective activation checkpointing, FlexAttention document
    masking (the tiny run sets docMasking), fused AdamW."""
    from stagerun.trainer.telemetry import read_metrics

    manifest = tiny_run(resources={"gpusPerNode": 1})
    result = run_tiny(write_manifest(tmp_path / "tiny.yaml", manifest), run_dir)
    assert result.returncode == 0, result.stdout[-4000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5


_BLOCK_LINEARS = [f"attention.{w}" for w in ("wq", "wk", "wv", "wo")] + [f"feed_forward.w{i}" for i in (1, 2, 3)]


def _float8_ready() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not torch.cuda.is_available() or not _float8_ready(), reason="needs sm89+ and torchao")
def test_float8_converts_the_block_linears_and_trains_close_to_bf16():
    """apply_float8 swaps every block linear for torchao's Float8Linear (the head stays), and a bf16 step's loss
    stays within float8's precision (e4m3: 3 mantissa bits; 5e-2 relative on this loss) of the unconverted model."""
    from torchao.float8.float8_linear import Float8Linear

    # Widths multiples of 16 everywhere, as float8 matmuls need.
    changes = {"dim": 256, "heads": 4, "kv_heads": 4, "ffn_hidden": 512, "tied_embeddings": False}
    reference, model = cuda_model(**changes).bfloat16(), cuda_model(**changes)
    topo = SimpleNamespace(device=torch.device("cuda"), tp_size=1, layout=ParallelLayout())
    D.apply_float8(model, topo)  # type: ignore[arg-type]  # the fields apply_float8 reads
    model = model.bfloat16()
    converted = {fqn for fqn, module in model.named_modules() if isinstance(module, Float8Linear)}
    assert converted == {f"layers.{i}.{name}" for i in range(2) for name in _BLOCK_LINEARS}
    tokens, doc_ids = packed_batch()
    want, _ = loss_and_grads(reference, tokens, doc_ids)
    got, grads = loss_and_grads(model, tokens, doc_ids)
    torch.testing.assert_close(got, want, rtol=5e-2, atol=0)
    assert all(torch.isfinite(g).all() for g in grads)
