"""Which manifest the operator runs: reading a TrainingRun body into a checked run.

Which edits a live run may take is decided by ``stagerun.core.spec.changes`` (shared with the trainer).
"""

from __future__ import annotations

from stagerun.core.spec import Problem, ResolvedRun, SpecError, kubernetes_problems, resolve_run


def manifest_of(body: dict) -> dict:
    """The manifest as a user would write it: what `stagerun validate` would read."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
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
