"""Docs that are generated or quoted from the code stay in step with it."""

from __future__ import annotations

import re
from pathlib import Path

from stagerun.core.spec.reference import render

ROOT = Path(__file__).resolve().parents[1]


def test_field_reference_is_current():
    committed = (ROOT / "docs" / "manifest-reference.md").read_text()
    assert committed == render(), (
        "docs/manifest-reference.md is stale: python -m stagerun.core.spec.reference > docs/manifest-reference.md"
    )


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install torch==2\.13\.0 && .+?)\n```", readme)
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    assert "stagerun run examples/quickstart.yaml" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == install_and_test


def test_every_documented_field_exists():
    """Field names quoted in docs/manifest.md's inheritance table are real manifest fields."""
    reference = (ROOT / "docs" / "manifest-reference.md").read_text()
    doc = (ROOT / "docs" / "manifest.md").read_text()
    table = doc[doc.index("| field | first phase") : doc.index("**Batch.**")]
    for name in re.findall(r"`([a-zA-Z.]+)`", table):
        assert f"`{name.split('.')[-1]}`" in reference, name


def test_every_metric_is_documented():
    from stagerun.trainer.metrics import EVAL_GAUGES, GPU_GAUGES, POST_TRAINING_GAUGES, SOURCE_GAUGE, STEP_GAUGES

    doc = (ROOT / "docs" / "observability.md").read_text()
    for name in [
        *STEP_GAUGES,
        SOURCE_GAUGE[0],
        *GPU_GAUGES,
        *EVAL_GAUGES,
        *POST_TRAINING_GAUGES,
        "stagerun_operator_runs",
        "stagerun_operator_restarts_total",
        "stagerun_operator_phase_transitions_total",
        "stagerun_operator_reconcile_errors_total",
        "stagerun_operator_reconcile_duration_seconds",
    ]:
        assert f"`{name}`" in doc, f"{name} is not in docs/observability.md"


def test_the_second_torch_run_uses_the_floor_of_the_supported_range():
    """tests/lowest_torch.sh (the README's test command ends with it) tests the lowest torch pyproject.toml accepts."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (floor,) = re.findall(r'"torch>=([0-9.]+),<[0-9.]+"', pyproject)
    script = (ROOT / "tests" / "lowest_torch.sh").read_text()
    (tested,) = re.findall(r"^TORCH_FLOOR=([0-9.]+)", script, flags=re.MULTILINE)
    assert tested.startswith(floor + ".") or tested == floor, (tested, floor)
    for line in re.findall(r"^  (tests/\S+\.py)$", script, flags=re.MULTILINE):
        assert (ROOT / line).exists(), f"tests/lowest_torch.sh names {line}, which does not exist"
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest && tests/lowest_torch.sh" in readme
