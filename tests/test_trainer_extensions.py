"""The Trainer's step loop and its extensions.

STAGERUN_CALLBACKS: factories named by import path add callbacks and checkpoint hooks to a Trainer. The loop, run
in-process with a stand-in train_step: values read from the device only on log, checkpoint and phase-end steps;
the stop agreement's schedule; no checkpoint of a diverged step; the GC schedule.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_run, write_manifest

from stagerun.trainer.callback_api import Callback, load_extensions
from stagerun.trainer.callbacks import GcSchedule
from stagerun.trainer.telemetry import read_metrics
from stagerun.trainer.trainer import STOP_CHECK_STEPS


@pytest.fixture
def extension_module(tmp_path, monkeypatch):
    (tmp_path / "my_extension.py").write_text(
        textwrap.dedent(
            """
            from stagerun.trainer.trainer import Callback

            class Marker(Callback):
                pass

            def hook(step):
                pass

            def install(trainer):
                trainer.seen_by_factory = True
                return [Marker(), hook]

            def nothing(trainer):
                return None

            def wrong(trainer):
                return [42]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_extension"
    sys.modules.pop("my_extension", None)


def _trainer():
    return SimpleNamespace(callbacks=[], manager=SimpleNamespace(before_commit=[]))


def test_callbacks_and_hooks_are_installed(extension_module):
    trainer = _trainer()
    load_extensions(trainer, f" {extension_module}:install , {extension_module}:nothing")
    assert trainer.seen_by_factory
    assert [type(c).__name__ for c in trainer.callbacks] == ["Marker"]
    assert isinstance(trainer.callbacks[0], Callback)
    assert [h.__name__ for h in trainer.manager.before_commit] == ["hook"]


def test_the_environment_names_the_factories(extension_module, monkeypatch):
    monkeypatch.setenv("STAGERUN_CALLBACKS", f"{extension_module}:install")
    trainer = _trainer()
    load_extensions(trainer)
    assert len(trainer.callbacks) == 1 and len(trainer.manager.before_commit) == 1


def test_nothing_set_installs_nothing(monkeypatch):
    monkeypatch.delenv("STAGERUN_CALLBACKS", raising=False)
    trainer = _trainer()
    load_extensions(trainer)
    assert trainer.callbacks == [] and trainer.manager.before_commit == []


@pytest.mark.parametrize("entry", ["no_colon", ":factory", "module:"])
def test_a_malformed_entry_names_the_variable(entry):
    with pytest.raises(ValueError, match="STAGERUN_CALLBACKS: .* is not package.module:factory"):
        load_extensions(_trainer(), entry)


def test_a_factory_returning_something_else_is_refused(extension_module):
    with pytest.raises(TypeError, match="neither a Callback nor a callable"):
        load_extensions(_trainer(), f"{extension_module}:wrong")


# ------------------------------------------------------------------------------------------- the step loop in-process
# The real Trainer, loader (the session's tiny shards), plan, callbacks and CheckpointManager in this process; only
# train_step is a stand-in that records the batch it got and returns scripted values, counting every read of them
# (a read is what would be a host<->device sync on a GPU).


class FakeResult:
    """A StepResult whose every value read is counted; the loss is scripted per step."""

    def __init__(self, loss: float, checksum: float, reads: list[int], step: int) -> None:
        self._loss, self._checksum, self._reads, self._step = loss, checksum, reads, step
        self._read = False

    def _value(self, value: float) -> float:
        if not self._read:  # resolve() reads all values in one sync and caches them
            self._read = True
            self._reads.append(self._step)
        return value

    loss = property(lambda self: self._value(self._loss))
    z_loss = property(lambda self: self._value(0.0))
    max_z_loss = property(lambda self: self._value(0.0))
    distill_loss = property(lambda self: self._value(0.0))
    grad_norm = property(lambda self: self._value(1.0))
    batch_checksum = property(lambda self: self._value(self._checksum))


def link_prepared(run_dir: Path) -> None:
    """The run_dir fixture links the shared data but not its index, which open_loader reads."""
    if not (run_dir / "prepared.json").exists():
        (run_dir / "prepared.json").symlink_to(Path(os.readlink(run_dir / "data")).parent / "prepared.json")


class _StandInModel(torch.nn.Linear):
    """Stands in for the Transformer (the step is faked): the trainer sets each phase's RoPE on it."""

    def __init__(self):
        super().__init__(2, 2)
        self.ropes: list = []

    def set_rope(self, rope) -> bool:
        self.ropes.append(rope)
        return False


class Harness:
    """Runs the tiny manifest's whole step loop in this process (dp 1, CPU) and records what each step saw."""

    def __init__(
        self, run_dir: Path, manifest: Path, monkeypatch, *, loss=lambda step: 2.0, exporter=None, **trainer_kwargs
    ):
        from stagerun.core.spec import load_run
        from stagerun.trainer.callbacks import standard_callbacks
        from stagerun.trainer.checkpoint import CheckpointManager
        from stagerun.trainer.distill import Teachers
        from stagerun.trainer.train import open_loader
        from stagerun.trainer.trainer import Trainer

        self.run = load_run(manifest)
        link_prepared(run_dir)
        self.checksums: dict[int, float] = {}  # step -> checksum of the batch train_step got
        self.reads: list[int] = []  # steps whose values were read
        self.agreements: list[int] = []  # steps after which the ranks agreed on a stop
        model = _StandInModel()
        topo = SimpleNamespace(
            device=torch.device("cpu"),
            rank=0,
            world_size=1,
            is_main=True,
            dp_rank=0,
            dp_size=1,
            any_rank=self._agree,
            context_shard=None,  # no context parallelism
        )
        self.trainer = Trainer(
            run=self.run,
            topo=topo,
            model=model,
            optimizer=torch.optim.AdamW(model.parameters()),
            loader=open_loader(self.run, run_dir),
            teachers=Teachers(self.run.model, None),
            manager=CheckpointManager(run_dir / "checkpoints", keep=100),
            **trainer_kwargs,
        )
        self.exporter = exporter(self.run) if exporter else Callback()
        self.trainer.callbacks.extend(standard_callbacks(self.trainer, run_dir, self.exporter, manifest, None))

        def fake_step(model, optimizer, batch, **kwargs):
            step = self.trainer.step + 1
            self.checksums[step] = batch.checksum
            return FakeResult(loss(step), batch.checksum, self.reads, step)

        monkeypatch.setattr("stagerun.trainer.trainer.train_step", fake_step)

    def _agree(self, flag: bool) -> bool:
        self.agreements.append(self.trainer.step)
        return flag

    def fit(self, resume: bool = False):
        if resume:
            self.trainer.resume(self.trainer.manager.latest())
        return self.trainer.fit()


@pytest.fixture
def handlers():
    """Trainer.fit installs SIGTERM/SIGINT handlers: give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def tiny_manifest(tmp_path: Path, checkpoint: dict | None = None, **training) -> Path:
    manifest = tiny_run()
    manifest["spec"]["training"].update(training)
    manifest["spec"]["checkpoint"].update(checkpoint or {})
    return write_manifest(tmp_path / "tiny.yaml", manifest)


# The tiny run: steps 1-8 of 1Ki tokens, 9-16 of 2Ki (core), 17-20 (long), 21-22 (anneal); a checkpoint every 4Ki
# tokens: after steps 4, 8, 10, 12, 14, 16, 18, 20, 22 (phases end at 16, 20, 22).
CHECKPOINT_STEPS = [4, 8, 10, 12, 14, 16, 18, 20, 22]


def exporter_on_a_free_port(run):
    from stagerun.trainer.exporter import Exporter

    return Exporter(run, 0, 0, 1, "cpu", 0, training=True, progress=True)


def test_values_are_read_only_on_log_checkpoint_and_phase_end_steps(run_dir, tmp_path, monkeypatch, handlers):
    manifest = tiny_manifest(tmp_path, logEverySteps=3)
    harness = Harness(run_dir, manifest, monkeypatch, exporter=exporter_on_a_free_port)
    published: list[tuple[int, float | None]] = []  # (step, loss) of each /progress update
    publish = harness.exporter.server.publish
    monkeypatch.setattr(harness.exporter.server, "publish", lambda p: published.append((p.step, p.loss)) or publish(p))
    metric_steps: list[int] = []
    monkeypatch.setattr(harness.exporter.metrics, "step", lambda **values: metric_steps.append(values["step"]))
    status = harness.fit()
    assert status.state == "complete" and status.step == 22
    logged = sorted({*range(3, 23, 3), *CHECKPOINT_STEPS})
    assert harness.reads == logged  # one read per such step, none elsewhere
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == logged
    assert all(m["loss"] == 2.0 and m["batchChecksum"] == harness.checksums[m["step"]] for m in metrics)
    # Timings cover the steps since the previous line: the tokens of all of them, in tokens/s.
    assert all(m["tokensPerSecond"] > 0 and m["stepSeconds"] > 0 for m in metrics)
    # The stop agreement rides on those steps, and otherwise runs every STOP_CHECK_STEPS steps.
    assert harness.agreements == sorted({*logged, *range(STOP_CHECK_STEPS, 23, STOP_CHECK_STEPS)})
    # /progress moves every step and keeps the last loss in between; /metrics takes whole snapshots on those steps.
    steps = [step for step, _ in published if step]
    assert steps == sorted(steps) and set(range(1, 23)) <= set(steps)
    assert all(loss == (2.0 if step >= logged[0] else None) for step, loss in published if step)
    assert metric_steps == logged


@pytest.mark.parametrize("async_save", [False, True])
def test_sigterm_checkpoints_within_stop_check_steps(run_dir, tmp_path, monkeypatch, handlers, async_save):
    class Terminate(Callback):
        def on_step(self, record):
            if record.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    checkpoint = {"everyTokens": "1Mi", "asyncSave": async_save}
    no_sync = tiny_manifest(tmp_path, checkpoint, logEverySteps=100)  # nothing reads values before step 16
    harness = Harness(run_dir, no_sync, monkeypatch)
    harness.trainer.callbacks.insert(0, Terminate())
    status = harness.fit()
    # Asked during step 1; agreed at the next scheduled agreement, which then checkpoints and stops.
    assert status.state == "stopped" and status.step == STOP_CHECK_STEPS
    assert harness.agreements == [STOP_CHECK_STEPS] and harness.reads == [STOP_CHECK_STEPS]
    assert [c.step for c in harness.trainer.manager.committed()] == [STOP_CHECK_STEPS]
    assert status.checkpoint == harness.trainer.manager.latest().path  # an async save commits before the end


def test_a_diverged_step_is_never_checkpointed(run_dir, tmp_path, monkeypatch, handlers):
    # Loss NaN from step 5 on: step 6 is a log step (logEverySteps 3) and raises before any later save.
    harness = Harness(
        run_dir, tiny_manifest(tmp_path, logEverySteps=3), monkeypatch, loss=lambda s: math.nan if s >= 5 else 2.0
    )
    with pytest.raises(FloatingPointError, match="loss is nan at step 6 .*step-00000004"):
        harness.fit()
    assert [c.step for c in harness.trainer.manager.committed()] == [4]


def test_gc_schedule_collects_every_n_steps_and_restores_gc(run_dir, tmp_path, monkeypatch, handlers):
    collected: list[tuple[int, int]] = []

    class Watch(Callback):
        def on_step(self, record):
            assert not gc.isenabled()  # automatic collection is off while training

    harness = Harness(run_dir, tiny_manifest(tmp_path, gcEverySteps=5), monkeypatch)
    harness.trainer.callbacks.append(Watch())
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append((harness.trainer.step, generation)))
    assert gc.isenabled()
    harness.fit()
    assert gc.isenabled()
    assert collected == [(5, 1), (10, 1), (15, 1), (20, 1)]


def test_gc_every_steps_0_leaves_gc_alone(monkeypatch):
    trainer = SimpleNamespace(run=SimpleNamespace(training=SimpleNamespace(gc_every_steps=0)))
    schedule = GcSchedule()
    monkeypatch.setattr(gc, "collect", lambda generation=2: pytest.fail("collected"))
    schedule.on_start(trainer)
    assert gc.isenabled()
    schedule.on_step(SimpleNamespace(step=50))
    schedule.close()
    assert gc.isenabled()


def test_async_saves_commit_every_checkpoint_and_reach_the_callbacks(run_dir, tmp_path, monkeypatch, handlers):
    committed: list[int] = []

    class Committed(Callback):
        def on_checkpoint(self, checkpoint, save_seconds):
            assert (Path(checkpoint.path) / "COMMITTED").exists() and save_seconds > 0
            committed.append(checkpoint.step)

    manifest = tiny_run()
    manifest["spec"]["checkpoint"].update(asyncSave=True, keep=100)
    harness = Harness(run_dir, write_manifest(tmp_path / "tiny.yaml", manifest), monkeypatch)
    saves: list[int] = []
    save_async = harness.trainer.manager.save_async
    monkeypatch.setattr(
        harness.trainer.manager, "save_async", lambda step, *a, **k: saves.append(step) or save_async(step, *a, **k)
    )
    harness.trainer.callbacks.append(Committed())
    status = harness.fit()
    assert saves == CHECKPOINT_STEPS and committed == CHECKPOINT_STEPS  # each exactly once, in order
    assert [c.step for c in harness.trainer.manager.committed()] == CHECKPOINT_STEPS
    assert status.checkpoint == harness.trainer.manager.latest().path  # the last one committed before the end
