"""Generates docs/manifest-reference.md from the spec classes, so the field reference can never drift from the code.

    python -m stagerun.core.spec.reference > docs/manifest-reference.md
(tests/test_docs.py fails when the committed file is stale.)
"""

from __future__ import annotations

import dataclasses
import typing

from .fields import COUNT, QUANTITY, camel, is_required
from .presets import MODEL_DEFAULTS
from .run import TrainingRun

HEADER = """# TrainingRun field reference

Generated from the spec classes by `python -m stagerun.core.spec.reference` — do not edit by hand.
Counts accept suffixes: K, M, B (or G), T are powers of 1000; Ki, Mi, Gi, Ti powers of 1024 (`4Mi` = 4,194,304).
Phase fields left unset inherit from the previous phase (see [manifest.md](manifest.md)).
"""


def _type_text(tp, meta) -> str:
    tp, _ = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    if origin in (list, tuple):
        return f"list of {_type_text(typing.get_args(tp)[0], meta)}"
    if origin is dict:
        return f"map of {_type_text(typing.get_args(tp)[1], meta)}"
    if tp is int and meta.get("kind") == COUNT:
        return "count"
    if tp is str and meta.get("kind") == QUANTITY:
        return "Kubernetes quantity"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, "any")


def _unwrap(tp):
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _nested(tp) -> list[type]:
    tp, _ = _unwrap(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [t for arg in typing.get_args(tp) for t in _nested(arg)]


def _default_text(f: dataclasses.Field) -> str:
    if f.name in MODEL_DEFAULTS and f.default is None:
        return f"`{MODEL_DEFAULTS[f.name]}` unless the preset sets it"
    if is_required(f):
        return "required"
    if f.default_factory is not dataclasses.MISSING:
        return ""
    return "" if f.default is None else f"`{f.default}`"


def render() -> str:
    sections: list[str] = []
    queue: list[type] = [TrainingRun]
    seen: set[type] = set()
    while queue:
        cls = queue.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        lines = [f"## {cls.__name__}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            meta = f.metadata
            cells = (f"`{camel(f.name)}`", _type_text(hints[f.name], meta), _default_text(f), meta.get("doc", ""))
            lines.append(f"| {' | '.join(cells)} |")
            queue.extend(_nested(hints[f.name]))
        sections.append("\n".join(lines))
    return HEADER + "\n" + "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    print(render(), end="")
