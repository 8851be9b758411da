"""`stagerun validate` on a corpus of hostile manifests (tests/hostile_manifests/): each is refused, with the field or
the text its `# expect:` header names, and never with a Python traceback.

Each file is one small manifest with one defect: wrong types, unknown fields, out-of-range and absurd numbers, NaN
and infinity, negative budgets, empty phases, bad units, non-ASCII digits, Kubernetes values the apiserver would
refuse, unicode oddities, YAML alias bombs, tabs, several documents. Every file goes through the CLI in-process
(trainer.cli.main); a sample goes through a real `stagerun validate` subprocess as a user runs it; `stagerun plan`
and `stagerun run` refuse every file the same way.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from stagerun.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "hostile_manifests"
FILES = sorted(CORPUS.glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CATEGORIES = ("type", "unknown", "range", "negative", "nan", "inf", "empty", "unit", "digits", "huge", "k8s")
CATEGORIES += ("unicode", "yaml", "encoding")


def _expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: the first line must be '# expect: <field or text>'"
    return first.removeprefix("# expect: ")


def _validate_in_process(path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_corpus_is_large_and_covers_every_kind_of_defect():
    assert len(FILES) >= 80
    kinds = {path.name.split("-", 1)[0] for path in FILES}
    assert kinds == set(CATEGORIES), "a file name starts with its kind of defect"
    for path in FILES:
        assert _expected(path)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_hostile_manifest_is_refused_naming_its_field(path, capsys):
    started = time.monotonic()
    code, output = _validate_in_process(path, capsys)
    assert code != 0, output
    assert "Traceback" not in output
    assert _expected(path) in output, output
    assert time.monotonic() - started < 5, "refusing a manifest must not take long (alias bombs, huge numbers)"


@pytest.mark.parametrize("name", ["yaml-billion-laughs", "yaml-billion-laughs-in-status", "yaml-deep-nesting"])
def test_bombs_are_refused_fast_in_bounded_memory(name, capsys):
    tracemalloc.start()
    started = time.monotonic()
    try:
        code, output = _validate_in_process(CORPUS / f"{name}.yaml", capsys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 1 and _expected(CORPUS / f"{name}.yaml") in output
    assert time.monotonic() - started < 2
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated to refuse a 1 KB file"


def test_a_file_past_the_size_limit_is_refused_before_it_is_parsed(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("status:\n" + "  k: v\n" * (700 * 1024))  # 4.9 MB: past what Kubernetes stores
    code, output = _validate_in_process(path, capsys)
    assert code == 1 and "larger than 3 MiB" in output and "Traceback" not in output


def test_annotations_past_the_apiservers_256_kib_are_refused(tmp_path, capsys):
    import yaml

    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["annotations"] = {"blob": "x" * 300 * 1024}  # too big to keep in the corpus
    path = tmp_path / "annotations.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, output = _validate_in_process(path, capsys)
    assert code == 1 and "metadata.annotations: annotations take" in output and "at most 262144" in output


# One file of each kind, as a user runs the command: a real process, its exit code and its whole output.
SAMPLE = [next(p for p in FILES if p.name.startswith(f"{kind}-")) for kind in CATEGORIES]
SAMPLE += [CORPUS / "yaml-billion-laughs.yaml", CORPUS / "unicode-lone-surrogate.yaml"]


@pytest.mark.parametrize("path", SAMPLE, ids=[p.stem for p in SAMPLE])
def test_the_stagerun_command_refuses_a_sample_without_a_traceback(path):
    def limit_memory():  # a bomb that expanded would hit this instead of the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    result = subprocess.run(
        [sys.executable, "-m", "stagerun.trainer.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        preexec_fn=limit_memory,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert _expected(path) in output
    assert output.startswith("error: ")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_still_validates(path, capsys):
    code, output = _validate_in_process(path, capsys)
    assert code == 0, output
    assert "valid TrainingRun" in output


def test_nproc_below_one_is_refused_by_validate(capsys):
    code = main(["validate", str(EXAMPLES[0]), "--nproc", "0"])
    assert code == 2 and "--nproc 0" in capsys.readouterr().err


def test_a_bug_still_shows_its_traceback(monkeypatch):
    # Only user errors (SpecError) are turned into messages: a failure inside stagerun must stay visible.
    import stagerun.trainer.cli as cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "load_run", broken)
    with pytest.raises(KeyError):
        main(["validate", str(EXAMPLES[0])])


@pytest.mark.parametrize("command", ["plan", "run"])
def test_plan_and_run_refuse_every_hostile_manifest_as_validate_does(command, tmp_path, monkeypatch, capsys):
    # `stagerun plan` and `stagerun run` read a manifest through the same reader as `validate`: each file is refused
    # with the same field named, without a traceback, before anything is written or started.
    monkeypatch.chdir(tmp_path)
    refused = []
    for path in FILES:
        code = main([command, str(path)])
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert code != 0 and "Traceback" not in output and _expected(path) in output, f"{path.name}: {output}"
        refused.append(path.name)
    assert len(refused) == len(FILES) and not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
