"""``spec.model.init: {from: checkpoint, path}``: a run starts from another stagerun run's weights (issue 17 item 5).

In-process: a real committed DCP checkpoint loads from its root or its step folder, weights only, with the
architecture check teachers have; a checkpoint written before a model field existed still matches. End to end: a
real tiny run (qkNorm, per-document positions), then a second run on another world size initialised from it, whose
first-step loss is the trained model's loss on that batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_tiny, stagerun, tiny_run, write_manifest

from stagerun.core.spec import to_manifest
from stagerun.core.spec.model import ModelInitSpec, ModelSpec, architecture_fields
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
from stagerun.trainer.model import Transformer, init_weights
from stagerun.trainer.model.initial_weights import InitCheckpointError, check_initial_weights, load_initial_weights
from stagerun.trainer.telemetry import read_metrics


def tiny(**changes) -> ModelSpec:
    return resolve_model(ModelSpec(preset="tiny", **changes))


def with_init(spec: ModelSpec, path: str) -> ModelSpec:
    return spec.replace(init=ModelInitSpec(from_="checkpoint", path=path))


def save(model: Transformer, root: Path, step: int, model_fields: dict) -> str:
    """A committed checkpoint as train.py writes it: model *and* optimizer state, loader state in meta.json."""
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # real optimizer state, which the init must not read
    meta = {"tokens": 4096 * step, "phase_index": 0, "model": model_fields, "loader": {"cursor": 123}}
    manager = CheckpointManager(str(root), keep=10)
    state = {"train": ModelOptimizerState(model, optimizer)}
    return manager.save(step, state, meta, phase_boundary=True).path


def test_weights_load_from_a_root_or_a_step_folder_and_nothing_else(tmp_path):
    spec = tiny(qk_norm=True)
    first, second = Transformer(spec), Transformer(spec)
    init_weights(first, 1)
    init_weights(second, 2)
    step3 = save(first, tmp_path / "ckpt", 3, architecture_fields(spec))
    save(second, tmp_path / "ckpt", 7, architecture_fields(spec))
    for path, source in ((str(tmp_path / "ckpt"), second), (step3, first)):  # the root means its newest commit
        model = Transformer(spec)
        init_weights(model, 99)
        check_initial_weights(with_init(spec, path))
        load_initial_weights(model, with_init(spec, path))
        for (name, loaded), expected in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(loaded, expected), (path, name)


def test_a_checkpoint_from_before_a_field_existed_still_matches(tmp_path):
    spec = tiny()
    model = Transformer(spec)
    init_weights(model, 1)
    old_fields = {k: v for k, v in to_manifest(spec).items() if k not in ("init", "qkNorm", "positionIds")}
    save(model, tmp_path / "old", 4, old_fields)
    check_initial_weights(with_init(spec, str(tmp_path / "old")))
    # The same checkpoint is refused for a spec that turns the new field on: it was trained without it.
    with pytest.raises(InitCheckpointError, match=r"spec\.model\.init\.path: .*fields that differ: qkNorm"):
        check_initial_weights(with_init(tiny(qk_norm=True), str(tmp_path / "old")))


def test_refusals_name_the_field(tmp_path):
    spec = tiny()
    model = Transformer(spec)
    init_weights(model, 1)
    save(model, tmp_path / "ckpt", 4, architecture_fields(spec))
    other = tiny(kv_heads=4, ffn_hidden=128)
    with pytest.raises(InitCheckpointError) as caught:
        load_initial_weights(Transformer(other), with_init(other, str(tmp_path / "ckpt")))
    message = str(caught.value)
    assert "spec.model.init.path" in message and "ffnHidden, kvHeads" in message
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "ckpt" / "step-00000005"):
        with pytest.raises(InitCheckpointError, match=r"spec\.model\.init\.path: no committed checkpoint"):
            check_initial_weights(with_init(spec, str(missing)))


# ------------------------------------------------------------------------------------------ real runs


def _phase(tokens: str, lr: dict) -> dict:
    batch = {"ramp": [{"tokens": 0, "size": "1Ki"}]}
    return {"name": "core", "tokens": tokens, "seqLen": 64, "microBatchSize": 4, "batch": batch, "lr": lr}


def _run_dir(shared_data: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (folder / "data").symlink_to(shared_data / "data")
    return folder


def test_a_run_initialised_from_another_runs_checkpoint_starts_at_its_loss(shared_data, tmp_path):
    from stagerun.core.plan import step_plan
    from stagerun.core.spec import resolve_run
    from stagerun.trainer.train import open_loader

    model_fields = {"preset": "tiny", "qkNorm": True, "positionIds": "perDocument"}
    # 1. Run A: 4 steps on one process; its phase-end checkpoint holds model, optimizer and loader state.
    original = tiny_run(
        model=model_fields,
        phases=[_phase("4Ki", {"schedule": "constant", "peak": 1e-2})],
        resources={"processesPerNode": 1},
    )
    run_a = _run_dir(shared_data, tmp_path / "a")
    result = run_tiny(write_manifest(tmp_path / "a.yaml", original), run_a)
    assert result.returncode == 0, result.stdout[-3000:]
    metrics_a = read_metrics(run_a / "metrics.jsonl")
    assert [m["step"] for m in metrics_a] == [1, 2, 3, 4]

    # 2. Run B on two FSDP ranks (DCP reshards), initialised from A's checkpoint root, one step of new data order.
    continued = tiny_run(
        model={**model_fields, "init": {"from": "checkpoint", "path": str(run_a / "checkpoints")}},
        phases=[_phase("1Ki", {"schedule": "constant", "peak": 1e-3})],
        resources={"processesPerNode": 2},
    )
    run_b = _run_dir(shared_data, tmp_path / "b")
    result = run_tiny(write_manifest(tmp_path / "b.yaml", continued), run_b)
    assert result.returncode == 0, result.stdout[-3000:]
    (first,) = read_metrics(run_b / "metrics.jsonl")
    assert first["step"] == 1 and first["tokens"] == 1024  # its own counters: A's step and tokens are not read

    # A's trained model, loaded here from its checkpoint, on B's first batch (B's loader starts at 0: weights only).
    run_cont = resolve_run(continued)
    trained = Transformer(resolve_run(original).model).eval()
    manager = CheckpointManager(str(run_a / "checkpoints"), keep=1)
    manager.load(manager.latest(), {"train": ModelOptimizerState(trained, None)})
    plan = step_plan(run_cont, 0, 0)
    micro_batches = open_loader(run_cont, run_b).next_step(
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
        for mb in micro_batches:  # docMasking: true; the model derives the per-document positions from doc_ids
            logits = trained(torch.from_numpy(mb.inputs), torch.from_numpy(mb.doc_ids))
            targets = torch.from_numpy(mb.targets)
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    assert first["loss"] == pytest.approx(total / count, abs=1e-4)
    # Not by accident: A's first step read the same batch from the random init, far from the trained loss.
    assert metrics_a[0]["batchChecksum"] == first["batchChecksum"]
    assert abs(metrics_a[0]["loss"] - first["loss"]) > 0.1, (metrics_a[0]["loss"], first["loss"])

    # 3. Another architecture is refused before any worker starts, naming the field and the differing fields.
    wrong = tiny_run(
        model={"preset": "tiny", "init": {"from": "checkpoint", "path": str(run_a / "checkpoints")}},
        phases=continued["spec"]["phases"],
    )
    result = stagerun("run", str(write_manifest(tmp_path / "c.yaml", wrong)), "--run-dir", str(tmp_path / "c"))
    assert result.returncode != 0
    assert "spec.model.init.path" in result.stdout and "positionIds, qkNorm" in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout
