"""Where a run's first weights come from when it has no checkpoint of its own: ``spec.model.init``.

- ``{from: hf, path: DIR}``: a Hugging Face model folder (hf/load.py).
- ``{from: checkpoint, path: URL}``: another stagerun run's checkpoint, for continued pretraining and post-training:
  a checkpoint root (its newest committed checkpoint) or one committed ``step-XXXXXXXX`` folder. Only the model's
  weights are read; the optimizer starts fresh and the data position at 0, since the new run has its own phases,
  data and schedule. The checkpoint must hold the architecture ``spec.model`` builds (the check distillation
  teachers have, distill.py), and DCP reshards it to this run's world size and layout.

Without ``init`` the weights are the seeded random init (init.py). A run that resumes from its own checkpoint
reads none of these: the checkpoint supersedes them (train.build_model's ``load_init``).
"""

from __future__ import annotations

import logging

import torch

from stagerun.core import storage
from stagerun.core.spec.fields import Problem, SpecError

log = logging.getLogger("stagerun.trainer")

INIT_PATH = "spec.model.init.path"
_FIX = "point spec.model.init at a run of this architecture, or set spec.model to the fields it was trained with"


class InitCheckpointError(SpecError):
    """``spec.model.init`` names no usable stagerun checkpoint; a rerun cannot fix it (a SpecError: permanent)."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__([Problem(INIT_PATH, message, fix)], "spec.model.init")


class _NotFound(Exception):
    pass


def _checkpoint(spec):
    """(manager, info, meta) of the committed checkpoint ``spec.init.path`` names, its architecture checked."""
    from ..distill import architecture_differences, committed_checkpoint

    path = spec.init.path
    try:
        manager, info = committed_checkpoint(path, INIT_PATH, _NotFound)
    except _NotFound as exc:
        raise InitCheckpointError(
            str(exc).removeprefix(f"{INIT_PATH}: "), "train that run first, or fix the path"
        ) from None
    fs, folder = storage.resolve(info.path)
    meta = storage.read_json(fs, storage.join(folder, "meta.json"))
    changed = architecture_differences(spec, meta)
    if changed is not None:
        raise InitCheckpointError(
            f"checkpoint {info.path} holds another architecture than spec.model (fields that differ: "
            f"{', '.join(changed)}; it has {meta.get('model')})",
            _FIX,
        )
    return manager, info, meta


def check_initial_weights(spec) -> None:
    """Before anything starts (``stagerun run``): ``spec.model.init`` exists and fits ``spec`` (a resolved model).
    Raises a SpecError naming the field; reads config.json or meta.json only, never a tensor."""
    if spec.init is None:
        return
    if spec.init.from_ == "checkpoint":
        _checkpoint(spec)
        return
    from ..hf.load import check_hf_folder

    check_hf_folder(spec, spec.init.path)


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, spec) -> None:
    """Overwrite every parameter of ``model`` (built and parallelised from the resolved ``spec``) with the weights
    ``spec.init`` names. Collective when the model is sharded: every rank calls it."""
    if spec.init.from_ == "hf":
        from ..hf.load import load_hf_weights

        load_hf_weights(model, spec, spec.init.path)
        return
    from ..checkpoint import ModelOptimizerState

    manager, info, _ = _checkpoint(spec)
    # Weights only: DCP reads just the keys asked for, so the optimizer's and the loader's state stay on disk.
    manager.load(info, {"train": ModelOptimizerState(model, None)})
    log.warning("initial weights loaded from %s (step %d, %d tokens)", info.path, info.step, info.tokens)
