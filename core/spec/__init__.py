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
    dropped a second `seqLen`, or a data source declared twice under one name (YAML 1.2 forbids duplicates).
    It also stops at the hundredth nested '[' or '{': PyYAML's scanner takes time quadratic in that depth (10,000
    levels, 20 KB of brackets, took 8 s before the recursion limit stopped it); a TrainingRun nests about ten."""

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_NESTING:
            raise _NotAManifest(f"line {self.get_mark().line + 1}: nests too deeply to be a TrainingRun")
        super().fetch_flow_collection_start(TokenClass)


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


def _with_position(construct):
    """PyYAML's scalar constructors fail with bare Python errors on values their tag does not fit: ValueError for a
    date 2024-13-45, an integer of 5000 digits or `!!float abc`, KeyError for `!!bool eight`, AttributeError for
    `!!timestamp soon`, IndexError for an empty `!!int`. Each is a property of the node alone, so it becomes a
    YAML error with its line and column."""

    def guarded(loader: _ManifestLoader, node: yaml.Node):
        try:
            return construct(loader, node)
        except (ValueError, KeyError, AttributeError, IndexError) as exc:
            text = str(node.value)
            shown = text if len(text) <= 40 else f"{text[:40]}..."
            reason = f": {exc}" if isinstance(exc, ValueError) else f" as {node.tag.rpartition(':')[2]}"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown!r}{reason}", node.start_mark
            ) from None

    return guarded


for _tag in ("int", "float", "bool", "timestamp"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    _ManifestLoader.add_constructor(_tag, _with_position(yaml.SafeLoader.yaml_constructors[_tag]))

MAX_NESTING = 100
# A TrainingRun is a few KB. The apiserver refuses objects past etcd's 1.5 MiB request limit, so a larger file is
# not a manifest; reading it whole first would spend memory on whatever it is.
MAX_MANIFEST_BYTES = 3 * 2**20
# Values a manifest may hold once its YAML aliases are expanded: a run with a thousand phases has ~30,000, while
# ten levels of ten aliases ("billion laughs") are 10^10 and would hang every reader after the parser.
MAX_EXPANDED_VALUES = 100_000


def _expanded_values(node: yaml.Node) -> int:
    """How many values ``node`` stands for with every alias expanded, counted once per node (linear time); raises
    _NotAManifest for an alias that contains itself (PyYAML would build a recursive structure for it)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _NotAManifest(f"line {current.start_mark.line + 1}: an alias refers to the node that contains it")
        open_nodes.add(key)
        children: list = []
        if isinstance(current, yaml.SequenceNode):
            children = current.value
        elif isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def _load_documents(text: str) -> list:
    loader = _ManifestLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node said a document follows
                break
            expanded = _expanded_values(node)
            if expanded > MAX_EXPANDED_VALUES:
                raise _NotAManifest(
                    f"expands to {expanded:.3g} values through its YAML aliases (anchors '&' and '*'), at most "
                    f"{MAX_EXPANDED_VALUES}: a 'billion laughs' file, not a TrainingRun"
                )
            documents.append(loader.construct_document(node))
        return [d for d in documents if d is not None]
    finally:
        loader.dispose()


class _NotAManifest(ValueError):
    """YAML that parses but cannot be a TrainingRun (an alias bomb, a self-containing alias)."""


def read_manifest(source: str | Path) -> dict:
    """The YAML document of a manifest file, with a clear error for unreadable files."""
    path = Path(source)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as exc:
        raise SpecError([Problem(str(path), f"cannot read the file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        if len(data) <= MAX_MANIFEST_BYTES or exc.start < MAX_MANIFEST_BYTES - 4:
            raise SpecError([Problem(str(path), f"is not UTF-8 text (byte {exc.start}): save it as UTF-8")]) from None
        text = ""  # a multi-byte character cut at the limit: the size problem below is the one to report
    if len(data) > MAX_MANIFEST_BYTES:
        message = f"is larger than {MAX_MANIFEST_BYTES // 2**20} MiB: not a TrainingRun (Kubernetes stores objects up "
        raise SpecError([Problem(str(path), message + "to 1.5 MiB)")])
    try:
        documents = _load_documents(text)
    except (_DuplicateKey, _NotAManifest) as exc:
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
