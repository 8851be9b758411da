"""Shared fixtures: a tiny TrainingRun and its data, prepared once per session and shared by the run tests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["cluster.fixtures"]  # the real control plane (tests/cluster/), importable as tests/ is on sys.path
SAMPLE_BYTES = 1_000_000  # text per builtin source: enough for a few epochs of the tiny runs, tokenized in seconds

TINY_RUN = {
    "apiVersion": "stagerun.io/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"preset": "tiny"},
        "tokenizer": {"train": {"vocabSize": 512, "maxBytes": "1M"}},
        "data": {
            "sources": {
                "docs": {"path": "builtin:python-docs", "weight": 0.6},
                "code": {"path": "builtin:python-code", "weight": 0.4},
            }
        },
        "phases": [
            {
                "name": "core",
                "tokens": "24Ki",
                "seqLen": 64,
                "microBatchSize": 4,
                "batch": {"ramp": [{"tokens": 0, "size": "1Ki"}, {"tokens": "8Ki", "size": "2Ki"}]},
                "lr": {"schedule": "cosine", "peak": 3e-3, "to": 1e-3, "warmupTokens": "2Ki"},
            },
            {"name": "long", "tokens": "8Ki", "seqLen": 128, "microBatchSize": 2},
            {
                "name": "anneal",
                "tokens": "4Ki",
                "data": {"weights": {"docs": 0.2, "code": 0.8}},
                "lr": {"schedule": "linear", "to": 0},
            },
        ],
        "resources": {"processesPerNode": 2},
        "checkpoint": {"everyTokens": "4Ki", "keep": 2},
        "training": {"docMasking": True},
    },
}


def tiny_run(**spec_changes) -> dict:
    manifest = copy.deepcopy(TINY_RUN)
    manifest["spec"].update(copy.deepcopy(spec_changes))
    return manifest


def write_manifest(path: Path, manifest: dict) -> Path:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """The tiny run's tokenizer and token shards, made once (tests symlink them into their own run dirs)."""
    from stagerun.core.spec import resolve_run
    from stagerun.trainer.runner import prepare

    folder = tmp_path_factory.mktemp("shared-data")
    prepare(resolve_run(TINY_RUN), folder, max_source_bytes=SAMPLE_BYTES)
    return folder


@pytest.fixture
def run_dir(shared_data, tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(shared_data / "tokenizer.json")
    (folder / "data").symlink_to(shared_data / "data")
    return folder


def stagerun(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run the real `stagerun` CLI in a subprocess; returns the CompletedProcess (stdout+stderr in .stdout)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "stagerun.trainer.cli", *args],
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_tiny(manifest_path: Path, run_dir: Path, *extra: str, env: dict | None = None, timeout: float = 300):
    return stagerun(
        "run",
        str(manifest_path),
        "--run-dir",
        str(run_dir),
        "--max-source-bytes",
        str(SAMPLE_BYTES),
        *extra,
        env=env,
        timeout=timeout,
    )
