"""Hugging Face interop (issue 6): export to transformers, start runs from HF weights.

Every supported architecture shape is exported through a real DCP checkpoint and loaded with
``AutoModelForCausalLM.from_pretrained``; logits must agree with the stagerun model. Weights go HF -> stagerun -> HF
bit for bit, a real ``stagerun run`` is exported with the real ``stagerun export`` CLI, and a run initialised from
that export starts at exactly the loss the original model gives on the new run's first batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import ROOT, run_tiny, stagerun, tiny_run, write_manifest  # noqa: E402

from stagerun.core.spec import to_manifest  # noqa: E402
from stagerun.core.spec.model import ModelSpec  # noqa: E402
from stagerun.core.spec.presets import resolve_model  # noqa: E402
from stagerun.core.spec.rope import ResolvedRope, RopeScalingSpec  # noqa: E402
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState  # noqa: E402
from stagerun.trainer.hf.export import ExportError, export_checkpoint, export_model  # noqa: E402
from stagerun.trainer.hf.load import load_hf_weights  # noqa: E402
from stagerun.trainer.hf.mapping import (  # noqa: E402
    HFMismatchError,
    UnsupportedArchitecture,
    hf_config,
    hf_entries,
)
from stagerun.trainer.model import Transformer, init_weights  # noqa: E402
from stagerun.trainer.telemetry import read_metrics  # noqa: E402

VOCAB = 300  # tokenizer size; padded to 320 rows, so 20 padded ids exist
BASE = dict(vocab_size=VOCAB, dim=64, layers=2, heads=4, kv_heads=2, ffn_hidden=96, max_seq_len=256)
SHAPES = {
    # Llama 3-like: GQA ratio 4, untied, theta 500000, eps 1e-6
    "llama-gqa": (dict(heads=8, kv_heads=2, rope_theta=500000.0, norm_eps=1e-6), "LlamaForCausalLM"),
    # AFM-like: tied embeddings; plus q/k/v biases (Llama's attention_bias with a zero o_proj bias)
    "llama-tied-qkv-bias": (dict(tied_embeddings=True, qkv_bias=True), "LlamaForCausalLM"),
    # Baichuan 2 / Index-like: NormHead, untied and tied
    "llama-normhead": (dict(norm_head=True, norm_eps=1e-6), "LlamaForCausalLM"),
    "llama-normhead-tied": (dict(norm_head=True, tied_embeddings=True), "LlamaForCausalLM"),
    # AFM / OLMo 2-like query/key norms (per head, as Qwen3), GQA; and with q/k/v biases, tied
    "qwen3-qk-norm": (dict(qk_norm=True, heads=8, kv_heads=2, norm_eps=1e-6), "Qwen3ForCausalLM"),
    "qwen3-qk-norm-qkv-bias-tied": (dict(qk_norm=True, qkv_bias=True, tied_embeddings=True), "Qwen3ForCausalLM"),
    # StableLM 2-like: partial rotary 0.25 (4 of 16 head dims), LayerNorm with bias, qkv bias, GQA
    "stablelm": (dict(norm="layernorm", norm_bias=True, qkv_bias=True, rotary_fraction=0.25), "StableLmForCausalLM"),
    # LayerNorm without bias (exported as zero biases), tied, half rotary
    "stablelm-nobias-tied": (
        dict(norm="layernorm", norm_bias=False, tied_embeddings=True, rotary_fraction=0.5),
        "StableLmForCausalLM",
    ),
}


def make_spec(**changes) -> ModelSpec:
    return resolve_model(ModelSpec(**{**BASE, **changes}))


def random_model(spec: ModelSpec, seed: int = 0) -> Transformer:
    """The stagerun init, then every norm weight and bias moved off its init value (1 / 0), so a mix-up of norms
    or biases in the mapping cannot go unnoticed."""
    model = Transformer(spec)
    init_weights(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def save_checkpoint(model: Transformer, spec: ModelSpec, root: Path) -> str:
    """A real committed DCP checkpoint, as train.py writes it (app state "train", model fields in meta.json)."""
    manager = CheckpointManager(str(root), keep=1)
    meta = {"tokens": 1024, "phase_index": 0, "model": {k: v for k, v in to_manifest(spec).items() if k != "init"}}
    return manager.save(3, {"train": ModelOptimizerState(model, None)}, meta, phase_boundary=False).path


def load_hf(folder: Path, **kwargs):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), (kind, info[kind])
    return model.eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    import argparse
    import textwrap

    from stagerun.trainer.data.tokenizer import train_tokenizer

    texts = [Path(module.__file__).read_text() for module in (json, argparse, textwrap)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, VOCAB, path)
    return str(path)


# ------------------------------------------------------------------------------------------ export: logits agree


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_through_a_dcp_checkpoint_loads_in_transformers_with_the_same_logits(shape, tmp_path, tokenizer_file):
    changes, architecture = SHAPES[shape]
    spec = make_spec(**changes)
    model = random_model(spec).eval()
    checkpoint = save_checkpoint(model, spec, tmp_path / "ckpt")
    out = tmp_path / "hf"
    result = export_checkpoint(str(tmp_path / "ckpt"), out, tokenizer=tokenizer_file)
    assert result.checkpoint == checkpoint and result.architecture == architecture

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["vocab_size"] == spec.padded_vocab == 320  # padded rows kept
    assert config["tie_word_embeddings"] == (spec.tied_embeddings and not spec.norm_head)  # NormHead unties
    hf = load_hf(out)
    assert type(hf).__name__ == architecture

    # 2 x 200 tokens: far longer than the rotary width (4 or 8 dims), GQA heads repeated in HF's order.
    x = tokens(2, 200)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape == ours.shape == (2, 200, 320)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().max().item() > 0.1  # not trivially small logits

    # bf16 export: the same model within bf16 rounding of the weights.
    out16 = tmp_path / "hf-bf16"
    export_checkpoint(checkpoint, out16, tokenizer=tokenizer_file, dtype="bf16")
    stored = safetensors_torch.load_file(str(out16 / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    hf16 = load_hf(out16, dtype=torch.float32)
    with torch.no_grad():
        assert (ours - hf16(x).logits).abs().max().item() < 5e-2


def test_normhead_is_baked_into_the_exported_head(tmp_path):
    spec = make_spec(norm_head=True, tied_embeddings=True)
    model = random_model(spec)
    export_model(model, spec, tmp_path / "hf")
    stored = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    head = stored["lm_head.weight"]
    assert torch.allclose(head.norm(dim=-1), torch.ones(spec.padded_vocab), atol=1e-6)
    assert torch.equal(stored["model.embed_tokens.weight"], model.tok_embeddings.weight.detach())
    assert not torch.allclose(head, stored["model.embed_tokens.weight"])


def test_tokenizer_loads_with_autotokenizer_and_round_trips(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    spec = make_spec()
    export_model(random_model(spec), spec, tmp_path / "hf", tokenizer=tokenizer_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    raw = Tokenizer.from_file(tokenizer_file)
    texts = ["def f(x):\n    return x ** 2  # square\n", "Ünïcödé 🙂 and  two  spaces\t\ttabs", "12345 + 678", ""]
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert hf_tok.pad_token == "<|pad|>" and hf_tok.pad_token_id == raw.token_to_id("<|pad|>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == hf_tok.eos_token_id and config["pad_token_id"] == hf_tok.pad_token_id


def test_generate_never_produces_padded_vocab_ids(tmp_path, tokenizer_file):
    spec = make_spec()
    model = random_model(spec)
    prompt = tokens(1, 8)
    hidden = []
    hook = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():  # point a padded row (no token maps to it) along the final hidden states: it wins
        model(prompt)
        hook.remove()
        direction = hidden[0].mean(dim=(0, 1))
        model.output.weight[310] = 100 * direction / direction.norm() * model.output.weight.norm(dim=-1).max()
    export_model(model, spec, tmp_path / "hf", tokenizer=tokenizer_file)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(VOCAB, spec.padded_vocab))
    hf = load_hf(tmp_path / "hf")
    with torch.no_grad():
        assert (hf(prompt).logits.argmax(-1) == 310).float().mean() > 0.5  # unsuppressed, 310 would win
        generated = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > 8 and int(generated[0, 8:].max()) < VOCAB


def test_sharded_export_writes_an_index_and_loads(tmp_path):
    spec = make_spec(heads=8, kv_heads=2)
    model = random_model(spec).eval()
    result = export_model(model, spec, tmp_path / "hf", max_shard_size="60KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == {e.hf for e in hf_entries(spec)}
    assert index["metadata"]["total_size"] == result.bytes
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    x = tokens(2, 40)
    with torch.no_grad():
        assert (model(x) - load_hf(tmp_path / "hf")(x).logits).abs().max().item() < 1e-4
    # ... and the sharded folder loads back into stagerun.
    back = Transformer(spec)
    init_weights(back, 99)
    load_hf_weights(back, spec, str(tmp_path / "hf"))
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ import


def hf_random_folder(spec: ModelSpec, folder: Path, seed: int = 0, **config_changes) -> torch.nn.Module:
    """A model made by transformers itself from the export config (its own random init), with norms and biases
    moved off 1 / 0 and a NormHead head normalised (what an export of a NormHead model holds)."""
    config_dict = {**hf_config(spec), **config_changes}
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    zero = {e.hf for e in hf_entries(spec) if e.kind == "zeros"}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 1 and name not in zero:
                param.add_(0.2 * torch.randn_like(param))
        if spec.norm_head:
            source = hf.model.embed_tokens.weight if spec.tied_embeddings else hf.lm_head.weight
            hf.lm_head.weight = torch.nn.Parameter(F.normalize(source.detach().clone(), dim=-1))
    hf.save_pretrained(str(folder))
    return hf.eval()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_hf_to_stagerun_to_hf_is_bit_identical(shape, tmp_path):
    spec = make_spec(**SHAPES[shape][0])
    hf = hf_random_folder(spec, tmp_path / "hf-in")
    model = Transformer(spec)
    init_weights(model, 123)  # a different start: every value must come from the HF files
    load_hf_weights(model, spec, str(tmp_path / "hf-in"))
    export_model(model, spec, tmp_path / "hf-out")
    before = safetensors_torch.load_file(str(tmp_path / "hf-in" / "model.safetensors"))
    after = safetensors_torch.load_file(str(tmp_path / "hf-out" / "model.safetensors"))
    if spec.tied_embeddings and not spec.norm_head:
        before.pop("lm_head.weight", None)  # a tied model may or may not store the shared head
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    x = tokens(2, 64)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_import_from_an_fsspec_url_with_an_unpadded_vocab(tmp_path):
    import fsspec

    spec = make_spec(heads=8, kv_heads=2)  # vocab 300 padded to 320
    hf = hf_random_folder(spec, tmp_path / "hf", vocab_size=VOCAB)  # a release with the exact vocab
    fs = fsspec.filesystem("memory")
    for file in (tmp_path / "hf").iterdir():
        fs.pipe_file(f"/hf-release/{file.name}", file.read_bytes())
    model = Transformer(spec)
    init_weights(model, 5)
    load_hf_weights(model, spec, "memory://hf-release")
    assert torch.count_nonzero(model.tok_embeddings.weight[VOCAB:]) == 0  # padded rows are zero
    assert torch.count_nonzero(model.output.weight[VOCAB:]) == 0
    x = tokens(2, 48)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape[-1] == VOCAB
    assert (ours[..., :VOCAB] - theirs).abs().max().item() < 1e-4
    assert torch.count_nonzero(ours[..., VOCAB:]) == 0


def test_import_mismatches_name_every_field(tmp_path):
    spec = make_spec(heads=8, kv_heads=2)
    hf_random_folder(spec, tmp_path / "hf")
    wrong = make_spec(heads=8, kv_heads=4, ffn_hidden=128, rope_theta=500000.0)
    model = Transformer(wrong)
    with pytest.raises(HFMismatchError) as caught:
        load_hf_weights(model, wrong, str(tmp_path / "hf"))
    message = str(caught.value)
    assert "spec.model.kvHeads: 4 here, but config.json has num_key_value_heads: 2" in message
    assert "spec.model.ffnHidden" in message and "intermediate_size: 96" in message
    assert "spec.model.ropeTheta" in message and "rope_theta: 10000.0" in message
    assert "spec.model.dim" not in message and "spec.model.layers" not in message

    # Options too: LayerNorm vs RMSNorm, tied embeddings, too large a vocab.
    for changes, field_name in (
        (dict(norm="layernorm"), "spec.model.norm"),
        (dict(tied_embeddings=True), "spec.model.tiedEmbeddings"),
        (dict(vocab_size=200), "spec.model.vocabSize"),
    ):
        other = make_spec(heads=8, kv_heads=2, **changes)
        with pytest.raises(HFMismatchError, match=field_name):
            load_hf_weights(Transformer(other), other, str(tmp_path / "hf"))


def test_qk_norm_must_match_the_hf_architecture(tmp_path):
    qwen3, llama = make_spec(qk_norm=True), make_spec()
    hf_random_folder(qwen3, tmp_path / "qwen3")
    hf_random_folder(llama, tmp_path / "llama")
    for spec, folder, found in ((llama, "qwen3", "model_type: 'qwen3'"), (qwen3, "llama", "model_type: 'llama'")):
        with pytest.raises(HFMismatchError, match="spec.model.qkNorm") as caught:
            load_hf_weights(Transformer(spec), spec, str(tmp_path / folder))
        assert found in str(caught.value)
    sliding = tmp_path / "qwen3-sliding"
    hf_random_folder(qwen3, sliding, use_sliding_window=True, sliding_window=16)
    with pytest.raises(HFMismatchError, match="use_sliding_window"):
        load_hf_weights(Transformer(qwen3), qwen3, str(sliding))


def test_nonzero_layernorm_bias_needs_norm_bias(tmp_path):
    spec = make_spec(norm="layernorm", norm_bias=True)
    hf_random_folder(spec, tmp_path / "hf")
    no_bias = make_spec(norm="layernorm", norm_bias=False)
    with pytest.raises(HFMismatchError, match="spec.model.normBias"):
        load_hf_weights(Transformer(no_bias), no_bias, str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------ refusals


def test_alibi_and_rmsnorm_partial_rotary_are_refused_naming_the_field(tmp_path):
    alibi = make_spec(position="alibi")
    with pytest.raises(UnsupportedArchitecture, match=r"spec\.model\.position: alibi"):
        export_model(random_model(alibi), alibi, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before anything is written
    partial = make_spec(rotary_fraction=0.5)
    with pytest.raises(UnsupportedArchitecture, match=r"spec\.model\.rotaryFraction"):
        export_model(random_model(partial), partial, tmp_path / "b")
    layernorm_qk = make_spec(norm="layernorm", qk_norm=True)  # StableLM's qk_layernorm is another function
    with pytest.raises(UnsupportedArchitecture, match=r"spec\.model\.qkNorm: true with norm: layernorm"):
        export_model(random_model(layernorm_qk), layernorm_qk, tmp_path / "d")

    # The CLI says the same, from the checkpoint's meta.json, with exit code 1.
    save_checkpoint(random_model(alibi), alibi, tmp_path / "ckpt")
    result = stagerun("export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c"), timeout=120)
    assert result.returncode == 1, result.stdout
    assert "spec.model.position" in result.stdout and "ALiBi" in result.stdout


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(tmp_path):
    spec = make_spec()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(random_model(spec), spec, tmp_path / "out")
    with pytest.raises(ExportError, match="no committed checkpoint"):
        export_checkpoint(str(tmp_path / "out"), tmp_path / "x")


# ------------------------------------------------------------------------------------------ real runs


def _phase(tokens: str, lr: dict) -> dict:
    return {
        "name": "core",
        "tokens": tokens,
        "seqLen": 64,
        "microBatchSize": 4,
        "batch": {"ramp": [{"tokens": 0, "size": "1Ki"}]},
        "lr": lr,
    }


def _run_dir(shared_data: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (folder / "data").symlink_to(shared_data / "data")
    return folder


def test_real_run_exports_and_a_run_initialised_from_it_starts_at_the_original_models_loss(shared_data, tmp_path):
    from stagerun.core.plan import step_plan
    from stagerun.core.spec import resolve_run
    from stagerun.trainer.train import open_loader

    # 1. Train the tiny preset (Llama-like, GQA, tied) for 4 steps, one process.
    original = tiny_run(
        phases=[_phase("4Ki", {"schedule": "constant", "peak": 1e-2})], resources={"processesPerNode": 1}
    )
    run_a = _run_dir(shared_data, tmp_path / "a")
    result = run_tiny(write_manifest(tmp_path / "a.yaml", original), run_a)
    assert result.returncode == 0, result.stdout[-3000:]
    metrics_a = read_metrics(run_a / "metrics.jsonl")
    assert [m["step"] for m in metrics_a] == [1, 2, 3, 4]

    # 2. `stagerun export` the run dir (newest checkpoint, tokenizer found in the run dir).
    export = stagerun("export", str(run_a), "--out", str(tmp_path / "hf"), timeout=120)
    assert export.returncode == 0, export.stdout
    assert "LlamaForCausalLM" in export.stdout
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= {p.name for p in (tmp_path / "hf").iterdir()}

    # --manifest: the run's own manifest agrees with meta.json; another model's is refused, naming the fields.
    export_checkpoint(str(run_a), tmp_path / "hf-manifest", manifest=tmp_path / "a.yaml")
    other = tiny_run(phases=original["spec"]["phases"])
    other["spec"]["model"] = {"preset": "tiny", "kvHeads": 4}
    with pytest.raises(ExportError, match="kvHeads"):
        export_checkpoint(str(run_a), tmp_path / "hf-other", manifest=write_manifest(tmp_path / "o.yaml", other))

    # The trained model, loaded the way the trainer resumes it, and the exported model agree.
    run = resolve_run(original)
    trained = Transformer(run.model).eval()
    manager = CheckpointManager(str(run_a / "checkpoints"), keep=1)
    manager.load(manager.latest(), {"train": ModelOptimizerState(trained, None)})
    x = tokens(2, 100)
    with torch.no_grad():
        assert (trained(x) - load_hf(tmp_path / "hf")(x).logits).abs().max().item() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).decode([0]) == "<|endoftext|>"

    # 3. A new run (two FSDP ranks: the import writes DTensor shards) starts from the export, for one step.
    continued = tiny_run(
        phases=[_phase("1Ki", {"schedule": "constant", "peak": 1e-3})], resources={"processesPerNode": 2}
    )
    continued["spec"]["model"] = {"preset": "tiny", "init": {"from": "hf", "path": str(tmp_path / "hf")}}
    run_b = _run_dir(shared_data, tmp_path / "b")
    result = run_tiny(write_manifest(tmp_path / "b.yaml", continued), run_b)
    assert result.returncode == 0, result.stdout[-3000:]
    (first,) = read_metrics(run_b / "metrics.jsonl")

    # The original (trained) model's loss on that run's first batch, computed here from its checkpoint.
    run_cont = resolve_run(continued)
    plan = step_plan(run_cont, 0, 0)
    loader = open_loader(run_cont, run_b)
    micro_batches = loader.next_step(
        phase_index=0,
        weights=plan.phase.weights,
        seq_len=plan.seq_len,
        global_sequences=plan.batch_sequences,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=plan.phase.micro_batch_size,
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches:
            logits = trained(torch.from_numpy(mb.inputs), torch.from_numpy(mb.doc_ids))  # docMasking: true
            targets = torch.from_numpy(mb.targets)
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    expected = total / count
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, abs=1e-4)
    # Not by accident: the same run without the HF weights (the random init) is far from it on that batch
    # (run A's first step read that same first batch from the random init).
    assert metrics_a[0]["batchChecksum"] == first["batchChecksum"]
    assert abs(metrics_a[0]["loss"] - first["loss"]) > 0.1, (metrics_a[0]["loss"], first["loss"])


# ------------------------------------------------------------------------------------------ RoPE scaling

# A tiny original window (32) so that T=96 runs past it; head dim 16 at theta 10000 puts one frequency in each
# of llama3's bands (kept, blended, divided by the factor).
SCALINGS = {
    "llama3": RopeScalingSpec(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32
    ),
    "yarn": RopeScalingSpec(type="yarn", factor=4.0, original_max_position=32),
    "linear": RopeScalingSpec(type="linear", factor=3.0),
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_rope_exports_and_imports_with_transformers_logits_beyond_the_original_window(kind, tmp_path):
    spec = make_spec(rope_scaling=SCALINGS[kind])
    model = random_model(spec).eval()
    save_checkpoint(model, spec, tmp_path / "ckpt")
    export_checkpoint(str(tmp_path / "ckpt"), tmp_path / "hf", require_tokenizer=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == config["rope_scaling"]["rope_type"] == kind
    hf = load_hf(tmp_path / "hf")
    x = tokens(2, 96)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        model.set_rope(ResolvedRope(10000.0))  # the same weights, RoPE unscaled
        unscaled = model(x)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - unscaled)[:, 32:].abs().max().item() > 1e-3  # the scaling is what both compute

    # Import: a transformers-made model with that config loads into the scaled spec, and only into it.
    hf_in = hf_random_folder(spec, tmp_path / "hf-in", seed=3)
    loaded = Transformer(spec)
    load_hf_weights(loaded, spec, str(tmp_path / "hf-in"))
    with torch.no_grad():
        assert (loaded(x) - hf_in(x).logits).abs().max().item() < 1e-4
    plain = make_spec()
    with pytest.raises(HFMismatchError) as caught:
        load_hf_weights(Transformer(plain), plain, str(tmp_path / "hf-in"))
    assert f"spec.model.ropeScaling: RoPE base 10000 here, but config.json has base 10000, {kind} x" in str(
        caught.value
    )
    assert "(fix: set ropeScaling: {type: " + kind in str(caught.value)


def test_transformers_4_rope_scaling_and_unknown_types(tmp_path):
    from stagerun.trainer.hf.mapping import check_hf_config

    spec = make_spec(rope_theta=500000.0, rope_scaling=SCALINGS["llama3"])
    legacy = {k: v for k, v in hf_config(spec).items() if k != "rope_parameters"}  # 4.x: rope_scaling + rope_theta
    legacy["rope_scaling"] = {**legacy["rope_scaling"], "type": legacy["rope_scaling"].pop("rope_type")}
    assert check_hf_config(spec, legacy) == []
    dynamic = {**legacy, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    [problem] = check_hf_config(spec, dynamic)
    assert problem.path == "spec.model.init.path" and "rope_type 'dynamic'" in problem.message


def test_docs_page_exists():
    text = (ROOT / "docs" / "huggingface.md").read_text()
    for needle in ("LlamaForCausalLM", "StableLmForCausalLM", "spec.model.position", "stagerun export", "init:"):
        assert needle in text
