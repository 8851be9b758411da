"""The TrainingRun spec: read a manifest, check it, resolve it. Pure Python (no torch), shared with the operator.

run = load_run("examples/quickstart.yaml")          # ResolvedRun, or SpecError listing every problem
problems = validate_manifest(raw_dict, world_size=2)  # [] when valid
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .fields import Problem, Reader, SpecError, explicit_fields, to_manifest
from .model import ModelSpec
from .presets import PRESETS, resolve_model
from .quantities import format_count, parse_count, parse_float
from .resolve import ResolvedLR, ResolvedPhase, ResolvedRun, resolve_phases
from .run import API_VERSION, KIND, TrainingRun
from .validate import (
    check_model,
    check_model_fields,
    check_phase_topology,
    check_run,
    check_tokenizer_vocab,
    check_training_devices,
    data_parallel_degree,
    kubernetes_problems,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "PRESETS",
    "ModelSpec",
    "Problem",
    "ResolvedLR",
    "ResolvedPhase",
    "ResolvedRun",
    "SpecError",
    "TrainingRun",
    "data_parallel_degree",
    "explicit_fields",
    "format_count",
    "kubernetes_problems",
    "load_run",
    "parse_count",
    "parse_float",
    "read_manifest",
    "resolve_run",
    "to_manifest",
    "validate_manifest",
]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, mark: yaml.Mark, first: yaml.Mark) -> None:
        super().__init__(
            f"line {mark.line + 1}, column {mark.column + 1}: the key {key!r} is given a second time (first on line "
            f"{first.line + 1}); YAML keeps only the last, so delete the one you did not mean"
        )


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one, which silently
    dropped a second `seqLen`, or a data source declared twice under one name (YAML 1.2 forbids duplicates)."""


def _mapping_without_duplicates(loader: _ManifestLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[object, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by the mapping's own keys
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            continue  # an unhashable key: the default constructor below says what is wrong with it
        if key in first:
            raise _DuplicateKey(key, key_node.start_mark, first[key])
        first[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_ManifestLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_manifest(source: str | Path) -> dict:
    """The YAML document of a manifest file, with a clear error for unreadable files."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([Problem(str(path), f"cannot read the file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(str(path), f"is not UTF-8 text (byte {exc.start}): save it as UTF-8")]) from None
    try:
        documents = [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    except _DuplicateKey as exc:
        raise SpecError([Problem(str(path), str(exc))]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(str(path), f"is not valid YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError([Problem(str(path), "nests too deeply to be a TrainingRun")]) from None
    if len(documents) != 1:
        raise SpecError([Problem(str(path), f"holds {len(documents)} YAML documents, expected one TrainingRun")])
    return documents[0]


def resolve_run(raw: dict[str, Any], *, world_size: int | None = None, source: str | None = None) -> ResolvedRun:
    """Parse, check and resolve a manifest dict; raises SpecError listing every problem found.

    ``world_size`` overrides the world size derived from ``spec.resources`` (``stagerun run --nproc N``).
    """
    reader = Reader()
    if not isinstance(raw, dict):
        raise SpecError([Problem("(document)", "expected a TrainingRun mapping")], source)
    run = _read(reader, raw)
    problems = reader.problems
    if run is None:
        raise SpecError(problems, source)
    check_run(run, problems)
    if not check_model_fields(run.spec.model, problems):
        raise SpecError(problems, source)
    model = resolve_model(run.spec.model)
    check_model(model, run.spec.model, problems)
    check_tokenizer_vocab(run, model, problems)
    phases = resolve_phases(run, model, problems, world_size) if run.spec.phases else None
    if phases:
        for phase in phases:
            check_phase_topology(phase, run.spec.phases[phase.index], model, problems)
        check_training_devices(run.spec.training, phases, problems)
    if problems or not phases:
        # A shared field (spec.parallelism) is checked once per phase that inherits it: report each problem once.
        unique = list(dict.fromkeys(problems))
        raise SpecError(unique or [Problem("spec.phases", "no phase could be resolved")], source)
    spec = run.spec
    return ResolvedRun(
        name=run.metadata.name,
        namespace=run.metadata.namespace,
        model=model,
        tokenizer=spec.tokenizer,
        sources=dict(spec.data.sources),
        data_seed=spec.data.seed,
        phases=phases,
        checkpoint=spec.checkpoint,
        training=spec.training,
        manifest=run,
    )


def _read(reader: Reader, raw: dict) -> TrainingRun | None:
    # Top-level keys are paths without a leading dot ("spec.phases[0]", "apiVersion").
    result = reader.read(TrainingRun, raw, "")
    reader.problems[:] = [Problem(p.path.lstrip("."), p.message, p.fix) for p in reader.problems]
    return result


def load_run(source: str | Path, *, world_size: int | None = None) -> ResolvedRun:
    """Read, check and resolve a manifest file."""
    return resolve_run(read_manifest(source), world_size=world_size, source=str(source))


def validate_manifest(raw: dict[str, Any], *, world_size: int | None = None) -> list[Problem]:
    """Every problem of a manifest dict ([] when it is valid)."""
    try:
        resolve_run(raw, world_size=world_size)
    except SpecError as exc:
        return exc.problems
    return []
