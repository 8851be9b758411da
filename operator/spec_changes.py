"""Which manifest the operator runs: reading a TrainingRun body, and accepting or refusing edits to a live run.

A live run's past and current phases, model, tokenizer, data sources, training settings and checkpoint path cannot
change under it (its checkpoints and data position depend on them); later phases, suspend, restart budget, hang
timeout, scheduling and image can, and take effect at the next phase or attempt.
"""

from __future__ import annotations

from stagerun.trainer.spec import Problem, ResolvedRun, SpecError, kubernetes_problems, resolve_run
from stagerun.trainer.spec.changes import immutable_changes  # noqa: F401  (re-exported for the handlers)


def manifest_of(body: dict) -> dict:
    """The manifest as a user would write it: what `stagerun validate` would read."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec", {}),
    }


def parse(manifest: dict) -> tuple[ResolvedRun | None, list[Problem]]:
    try:
        run = resolve_run(manifest)
    except SpecError as exc:
        return None, exc.problems
    problems = kubernetes_problems(run.manifest)
    return (None, problems) if problems else (run, [])
