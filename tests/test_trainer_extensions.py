"""STAGERUN_CALLBACKS: factories named by import path add callbacks and checkpoint hooks to a Trainer."""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import pytest

from stagerun.trainer.trainer import Callback, load_extensions


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
