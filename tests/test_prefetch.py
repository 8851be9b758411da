"""Background prefetch (stagerun.trainer.prefetch) inside the real step loop: the batches a run trains on, and what
its checkpoints store, are the same with and without prefetch, across phase boundaries, a manifest reload that
changes the next phase's data, and a resume; errors of the background draw surface at the step that needs it.

The loop runs in-process with a stand-in train_step (tests/test_trainer_extensions.py's Harness) on the session's
tiny shards; the checksums are the loader's batches as StepBatch counted them.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer_extensions import (  # noqa: F401 - handlers: a fixture
    CHECKPOINT_STEPS,
    Harness,
    handlers,
    link_prepared,
    tiny_manifest,
)

from stagerun.trainer.callback_api import Callback
from stagerun.trainer.data.inputs import DataError
from stagerun.trainer.telemetry import read_metrics

pytestmark = pytest.mark.usefixtures("handlers")


def run_dir_for(tmp_path, run_dir, name: str):
    """Another run dir on the same shards (the run_dir fixture's links)."""
    folder = tmp_path / name
    folder.mkdir()
    for link in ("tokenizer.json", "data"):
        (folder / link).symlink_to((run_dir / link).resolve())
    return folder


def draw_threads(harness: Harness) -> list[str]:
    """Wraps the loader's next_step to record the thread of each draw."""
    threads: list[str] = []
    loader = harness.trainer.loader
    draw = loader.next_step

    def recording(**kwargs):
        threads.append(threading.current_thread().name)
        return draw(**kwargs)

    loader.next_step = recording
    return threads


def saved_loader_states(harness: Harness) -> dict[int, dict]:
    committed = harness.trainer.manager.committed()
    return {info.step: json.loads((Path(info.path) / "meta.json").read_text())["loader"] for info in committed}


def both_ways(tmp_path, run_dir, monkeypatch, manifest, *callbacks: Callback) -> tuple[Harness, Harness]:
    """The same run with prefetch (in run_dir) and without (in a second run dir)."""
    results = []
    for prefetch, folder in ((True, run_dir), (False, run_dir_for(tmp_path, run_dir, "sync"))):
        harness = Harness(folder, manifest, monkeypatch, prefetch=prefetch)
        harness.trainer.callbacks.extend(callbacks)
        harness.threads = draw_threads(harness)
        assert harness.fit().state == "complete"
        results.append(harness)
    return results[0], results[1]


def test_prefetched_batches_and_checkpoints_match_synchronous_draws(run_dir, tmp_path, monkeypatch):
    ahead, inline = both_ways(tmp_path, run_dir, monkeypatch, tiny_manifest(tmp_path))
    assert list(ahead.checksums) == list(range(1, 23))
    assert ahead.checksums == inline.checksums  # through both phase boundaries and the anneal's new weights
    # Every draw after the first happened in the background thread (one per step: none skipped, none repeated).
    assert ahead.threads[0] == "MainThread" and len(ahead.threads) == 22
    assert all(name.startswith("prefetch") for name in ahead.threads[1:])
    assert set(inline.threads) == {"MainThread"}
    assert ahead.trainer.prefetcher.discarded == 0
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(tmp_path / "sync" / "metrics.jsonl")
    assert [m["tokensPerSource"] for m in ours] == [m["tokensPerSource"] for m in theirs]
    # A checkpoint stores the loader as it was after its own step, not after the batch drawn ahead.
    states = saved_loader_states(ahead)
    assert list(states) == CHECKPOINT_STEPS and states == saved_loader_states(inline)


class EditLaterPhase(Callback):
    """Rewrites the manifest on disk during step 5: the `long` phase (next after core) takes other weights."""

    def __init__(self, path) -> None:
        self.path = path

    def on_step(self, record) -> None:
        if record.step == 5:
            manifest = yaml.safe_load(self.path.read_text())
            manifest["spec"]["phases"][1]["data"] = {"weights": {"docs": 0.95, "code": 0.05}}
            self.path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def test_a_manifest_reload_drops_the_batch_drawn_for_the_old_plan(run_dir, tmp_path, monkeypatch):
    manifest = tiny_manifest(tmp_path)
    original = manifest.read_text()
    ahead, inline = both_ways(tmp_path, run_dir, monkeypatch, manifest, EditLaterPhase(manifest))
    # Step 17's batch was drawn with the old weights while step 16 ran; the reload at core's end dropped it and
    # the loader, put back, drew it again with the new ones.
    assert ahead.trainer.prefetcher.discarded == 1 and len(ahead.threads) == 23
    assert ahead.checksums == inline.checksums
    assert saved_loader_states(ahead) == saved_loader_states(inline)
    metrics = {m["step"]: m for m in read_metrics(run_dir / "metrics.jsonl")}
    drawn = {k: metrics[20]["tokensPerSource"][k] - metrics[16]["tokensPerSource"][k] for k in ("docs", "code")}
    assert drawn["docs"] > 10 * drawn["code"]  # the long phase used the edited weights
    manifest.write_text(original)
    unedited = Harness(run_dir_for(tmp_path, run_dir, "unedited"), manifest, monkeypatch)
    unedited.fit()
    assert [unedited.checksums[s] for s in range(1, 17)] == [ahead.checksums[s] for s in range(1, 17)]
    assert unedited.checksums[17] != ahead.checksums[17]  # the edit really changed the data


def test_resume_from_a_checkpoint_taken_while_a_batch_was_prefetched(run_dir, tmp_path, monkeypatch):
    straight = Harness(run_dir, tiny_manifest(tmp_path), monkeypatch)
    straight.fit()
    resumed_dir = run_dir_for(tmp_path, run_dir, "resumed")
    shutil.copytree(run_dir / "checkpoints", resumed_dir / "checkpoints")
    for later in CHECKPOINT_STEPS[CHECKPOINT_STEPS.index(10) + 1 :]:
        shutil.rmtree(resumed_dir / "checkpoints" / f"step-{later:08d}")
    resumed = Harness(resumed_dir, tiny_manifest(tmp_path), monkeypatch)
    assert resumed.fit(resume=True).state == "complete"
    assert list(resumed.checksums) == list(range(11, 23))
    assert resumed.checksums == {s: straight.checksums[s] for s in range(11, 23)}


@pytest.mark.parametrize(
    "error", [DataError("shard docs/00003.bin is corrupted: bad magic"), OSError("transient read error")]
)
def test_an_error_of_the_background_draw_surfaces_at_its_step(run_dir, tmp_path, monkeypatch, error):
    harness = Harness(run_dir, tiny_manifest(tmp_path), monkeypatch)
    loader = harness.trainer.loader
    draw, where = loader.next_step, []

    def failing(**kwargs):
        if len(where) == 4:  # step 5's draw, made in the background while step 4 runs
            where.append(threading.current_thread().name)
            raise error
        where.append(threading.current_thread().name)
        return draw(**kwargs)

    loader.next_step = failing
    with pytest.raises(type(error), match=str(error)) as raised:
        harness.fit()
    assert raised.value is error and where[4].startswith("prefetch")
    assert list(harness.checksums) == [1, 2, 3, 4]  # steps up to the one that needed the batch
    assert [c.step for c in harness.trainer.manager.committed()] == [4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefetch_copies_on_a_side_stream_and_matches_host_draws(run_dir, tmp_path):
    from stagerun.core.plan import step_plan
    from stagerun.core.spec import load_run
    from stagerun.trainer.prefetch import Prefetcher
    from stagerun.trainer.train import open_loader

    link_prepared(run_dir)
    run = load_run(tiny_manifest(tmp_path))
    kwargs = {"dp_rank": 0, "dp_size": 1, "doc_masking": True}
    gpu = Prefetcher(open_loader(run, run_dir), device=torch.device("cuda"), **kwargs)
    host = Prefetcher(open_loader(run, run_dir), device=torch.device("cpu"), enabled=False, **kwargs)
    tokens = 0
    for step in range(6):
        plan = step_plan(run, tokens, step)
        batch = gpu.take(plan)
        gpu.prefetch(step_plan(run, plan.tokens_after, step + 1))  # overlaps with the reads below
        expected = host.take(plan)
        for got, want in zip(batch.micro_batches, expected.micro_batches, strict=True):
            assert got.inputs.is_cuda and got.inputs.device == torch.device("cuda", torch.cuda.current_device())
            # Read on the compute stream: take() made it wait for the side stream's copies.
            assert torch.equal(got.inputs.cpu(), want.inputs) and torch.equal(got.doc_ids.cpu(), want.doc_ids)
        assert batch.loader_state == expected.loader_state and batch.checksum == expected.checksum
        tokens = plan.tokens_after
    gpu.close()
