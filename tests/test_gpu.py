"""GPU paths (NCCL, bf16, compiled FlexAttention). Skipped without CUDA; run with `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import run_tiny, tiny_run, write_manifest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_flex_document_masking_matches_the_explicit_mask_on_cuda():
    from stagerun.core.spec import ModelSpec
    from stagerun.core.spec.presets import resolve_model
    from stagerun.trainer.model import DocumentMask, Transformer, init_weights

    spec = resolve_model(ModelSpec(preset="tiny"))
    model = Transformer(spec).cuda()
    init_weights(model, 0)
    tokens = torch.randint(0, spec.vocab_size, (2, 256), device="cuda")
    doc_ids = torch.cumsum((torch.rand(2, 256, device="cuda") < 0.02).int(), dim=1)
    for layer in model.layers:
        layer.attention.use_flex = True
    flex = model(tokens, doc_ids)
    for layer in model.layers:
        layer.attention.use_flex = False
    explicit = model(tokens, doc_ids)
    torch.testing.assert_close(flex, explicit, rtol=1e-4, atol=1e-4)
    assert isinstance(DocumentMask(doc_ids).block(), object)


def test_tiny_run_on_one_gpu_with_nccl_and_bf16(run_dir, tmp_path):
    from stagerun.trainer.telemetry import read_metrics

    manifest = tiny_run(resources={"gpusPerNode": 1})
    result = run_tiny(write_manifest(tmp_path / "tiny.yaml", manifest), run_dir)
    assert result.returncode == 0, result.stdout[-4000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
