"""Declarative fields: dataclass trees that read (and write back) Kubernetes-style manifests.

Every spec class is a frozen dataclass whose fields carry their manifest documentation and constraints in
``dataclasses.field(metadata=...)``. One generic reader turns YAML data into those classes, collecting *every*
problem with its field path instead of stopping at the first; the same metadata later generates the CRD schema and
the reference docs, so each concept is described once.

Manifest keys are the camelCase form of the attribute names (``seq_len`` -> ``seqLen``), as in Kubernetes.

A list field with ``map_keys`` is a Kubernetes list-map (phases by name, env vars by name): the reader refuses two
items with the same key, as the apiserver does for the CRD's ``x-kubernetes-list-type: map``. A class may name
fields that belong elsewhere in ``_fields_set_elsewhere`` (``{"nodeSelector": "spec.scheduling.nodeSelector"}``),
so an unknown-field problem says where to write them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from .limits import INT64_MAX, bound_of, format_bound
from .quantities import QuantityError, parse_count, parse_duration, parse_float, parse_resource_quantity

COUNT = "count"  # an integer that may be written with a suffix: 2T, 252M, 4Mi
DURATION = "duration"  # whole seconds, written as 900 or "15m", "1h30m"
QUANTITY = "quantity"  # a Kubernetes resource quantity (1, "500m", "64Gi"), kept as the string a pod spec carries


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where, what, and how to fix it."""

    path: str
    message: str
    fix: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        return printable(f"{text} (fix: {self.fix})" if self.fix else text)


def printable(text: str) -> str:
    """``text`` with invisible and unprintable characters escaped (a zero-width space, a right-to-left override, a
    lone surrogate from a YAML "\\ud800" escape): a message must show what the manifest holds, and a lone
    surrogate would make printing it fail."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\u{ord(c):04x}" for c in text)


class SpecError(ValueError):
    """A manifest with one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {printable(source)}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


def spec_field(
    default: Any = MISSING,
    *,
    doc: str,
    kind: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    default_factory: Any = MISSING,
    map_keys: tuple[str, ...] | None = None,
) -> Any:
    """A manifest field with its documentation and the constraints the schema can state.

    ``map_keys``: a list whose items are unique by these (required, string) fields: a Kubernetes list-map.
    """
    metadata = {
        "doc": doc,
        "kind": kind,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "map_keys": map_keys,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def camel(name: str) -> str:
    """``seq_len`` -> ``seqLen``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _snake(key: str) -> str:
    """``mountPath`` -> ``mount_path`` (the inverse of :func:`camel`)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def explicit_fields(obj: Any) -> frozenset[str]:
    """The attribute names that the manifest set explicitly (as opposed to defaults)."""
    return getattr(obj, "_explicit", frozenset())


def is_required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


class Reader:
    """Reads raw YAML data into spec dataclasses, collecting problems rather than raising on the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str, fix: str | None = None) -> None:
        self.problems.append(Problem(path, message, fix))

    def read(self, cls: type, raw: Any, path: str) -> Any:
        """An instance of dataclass ``cls`` from ``raw``; ``None`` (after recording problems) when unreadable."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping, got {_describe(raw)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {camel(f.name): f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
        elsewhere = getattr(cls, "_fields_set_elsewhere", {})
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                fix = f"did you mean '{close[0]}'?" if close else f"allowed fields: {', '.join(sorted(fields))}"
                if key in elsewhere:
                    fix = f"set it as {elsewhere[key]}"
                self.problem(f"{path}.{key}", "unknown field", fix)
        values: dict[str, Any] = {}
        explicit: set[str] = set()
        ok = True
        for key, f in fields.items():
            if key not in raw or raw[key] is None:
                if is_required(f):
                    self.problem(
                        f"{path}.{key}", "required field is missing", f"add {key}: {f.metadata.get('doc', '')}"
                    )
                    ok = False
                continue
            value = self.value(hints[f.name], raw[key], f"{path}.{key}", f.metadata)
            if value is not _INVALID and not self._within_bound(cls.__name__, f, value, raw[key], f"{path}.{key}"):
                value = _INVALID
            if value is _INVALID:
                ok = False
                continue
            values[f.name] = value
            explicit.add(f.name)
        if not ok:
            return None
        instance = cls(**values)
        object.__setattr__(instance, "_explicit", frozenset(explicit))
        return instance

    def value(self, tp: Any, raw: Any, path: str, metadata: Any = None) -> Any:
        metadata = metadata or {}
        tp, _ = _strip_optional(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            result = self.read(tp, raw, path)
            return _INVALID if result is None else result
        if origin is Literal:
            allowed = typing.get_args(tp)
            if raw not in allowed:
                close = difflib.get_close_matches(str(raw), [str(a) for a in allowed], n=1)
                fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(map(str, allowed))}"
                self.problem(path, f"must be one of {', '.join(map(str, allowed))}, got {raw!r}", fix)
                return _INVALID
            return raw
        if origin in (list, tuple):
            if not isinstance(raw, list):
                self.problem(path, f"expected a list, got {_describe(raw)}")
                return _INVALID
            (item_tp, *_) = typing.get_args(tp)
            items = [self.value(item_tp, item, f"{path}[{i}]", metadata) for i, item in enumerate(raw)]
            if any(i is _INVALID for i in items):
                return _INVALID
            if metadata.get("map_keys") and not self._check_map_keys(items, metadata["map_keys"], path):
                return _INVALID
            return tuple(items)
        if origin is dict:
            if not isinstance(raw, dict):
                self.problem(path, f"expected a mapping, got {_describe(raw)}")
                return _INVALID
            _, item_tp = typing.get_args(tp)
            mapping = {}
            for key, item in raw.items():
                if not isinstance(key, str):
                    self.problem(f"{path}.{key}", f"keys must be strings, got {_describe(key)}")
                    return _INVALID
                mapping[key] = self.value(item_tp, item, f"{path}.{key}", metadata)
            return _INVALID if any(i is _INVALID for i in mapping.values()) else mapping
        return self.scalar(tp, raw, path, metadata)

    def _within_bound(self, class_name: str, f: dataclasses.Field, value: Any, raw: Any, path: str) -> bool:
        """Whether a number stays below its sanity bound (limits.py): past it, it is a typo, never a recipe."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        bound = bound_of(class_name, f.name, f.metadata.get("kind"))
        if bound is None or value <= bound.maximum:
            return True
        self.problem(
            path,
            f"{raw!r} is beyond any real run: at most {format_bound(bound.maximum)} ({bound.why})",
            "check the value for a typo or a missing suffix",
        )
        return False

    def _check_map_keys(self, items: list, keys: tuple[str, ...], path: str) -> bool:
        """Records a problem for each list-map item that repeats an earlier item's keys; False only when a
        free-form item lacks its keys. Duplicates keep the list readable, so the checks after reading still
        report their own problems."""
        seen: dict[tuple, int] = {}
        complete = True
        for index, item in enumerate(items):
            if isinstance(item, dict):  # a free-form Kubernetes item (a volume): its key fields are checked here
                values = tuple(item.get(key) for key in keys)
                missing = [(k, v) for k, v in zip(keys, values, strict=True) if not isinstance(v, str) or not v]
                for key, value in missing:
                    what = "required field is missing" if value is None else f"expected a name, got {_describe(value)}"
                    self.problem(f"{path}[{index}].{key}", what, f"give each item a {key}")
                if missing:
                    complete = False
                    continue
            else:  # a spec dataclass: its key fields are required, so the reader has them
                values = tuple(getattr(item, _snake(key)) for key in keys)
            if values in seen:
                shown = ", ".join(f"{key} {value!r}" for key, value in zip(keys, values, strict=True))
                self.problem(
                    f"{path}[{index}].{keys[0]}",
                    f"duplicate {shown}: {path.lstrip('.')}[{seen[values]}] has it too",
                    f"give each item a unique {'/'.join(keys)}",
                )
            else:
                seen[values] = index
        return complete

    def scalar(self, tp: Any, raw: Any, path: str, metadata: Any) -> Any:
        kind = metadata.get("kind")
        if tp is Any:  # free-form (e.g. an operator-written status): taken as it is
            return raw
        try:
            if tp is bool:
                if not isinstance(raw, bool):
                    raise QuantityError(f"expected true or false, got {_describe(raw)}")
                value: Any = raw
            elif tp is int and kind == COUNT:
                value = parse_count(raw)
            elif tp is int and kind == DURATION:
                value = parse_duration(raw)
            elif tp is str and kind == QUANTITY:
                value = parse_resource_quantity(raw)
            elif tp is int:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise QuantityError(f"expected an integer, got {_describe(raw)}")
                if abs(raw) > INT64_MAX:  # Kubernetes and torch carry integers as int64
                    raise QuantityError(f"{raw!r} does not fit in a 64-bit integer")
                value = raw
            elif tp is float:
                value = parse_float(raw)
            elif tp is str:
                if not isinstance(raw, str):
                    raise QuantityError(f"expected a string, got {_describe(raw)}")
                value = raw
            else:  # pragma: no cover - a spec class used a type this reader does not know
                raise TypeError(f"unsupported field type {tp!r} at {path}")
        except QuantityError as exc:
            self.problem(path, str(exc))
            return _INVALID
        low, high = metadata.get("minimum"), metadata.get("maximum")
        if low is not None and (value <= low if metadata.get("exclusive_minimum") else value < low):
            relation = "greater than" if metadata.get("exclusive_minimum") else "at least"
            self.problem(path, f"must be {relation} {low}, got {raw!r}")
            return _INVALID
        if high is not None and value > high:
            self.problem(path, f"must be at most {high}, got {raw!r}")
            return _INVALID
        return value


_INVALID = object()


def _describe(raw: Any) -> str:
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    if isinstance(raw, (dict, list)):
        return f"a {'mapping' if isinstance(raw, dict) else 'list'}"
    return f"{type(raw).__name__} {raw!r}"


def to_manifest(obj: Any, *, only_explicit: bool = False) -> Any:
    """The manifest (camelCase dict) form of a spec object; the inverse of ``Reader.read``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        chosen = explicit_fields(obj) if only_explicit else None
        for f in dataclasses.fields(obj):
            if f.name.startswith("_") or (chosen is not None and f.name not in chosen):
                continue
            value = getattr(obj, f.name)
            if value is None:
                continue
            out[camel(f.name)] = to_manifest(value, only_explicit=only_explicit)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_manifest(v, only_explicit=only_explicit) for v in obj]
    if isinstance(obj, dict):
        return {k: to_manifest(v, only_explicit=only_explicit) for k, v in obj.items()}
    return obj
