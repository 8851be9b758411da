"""The CRD's CEL admission rules (``x-kubernetes-validations`` on the root object): what the apiserver refuses at
`kubectl apply` beyond the schema's types and patterns, stated from the same constants as the operator's own checks.

- ``metadata.name`` must be able to name the run's children (``stagerun.core.spec.validate.kubernetes_problems``).
- Once the run has started, no edit may change the fields that ``stagerun.core.spec.changes.IMMUTABLE_ONCE_STARTED``
  lists (model, tokenizer, data sources and seed, training settings, checkpoint path). Edits of phases stay the
  operator's to judge (condition ``SpecAccepted=False``, reason ``ImmutableFieldChanged``): whether one is allowed
  depends on the phase the run is in and on what the phases inherit, which a rule over the raw manifest cannot
  resolve.

A started run is one whose status says ``attempt > 0``. Rules on ``spec`` cannot see status, but a rule on the root
object sees the stored status as ``oldSelf.status``, and an update of the main resource cannot change it (with the
status subresource the apiserver keeps the stored status), so a user cannot lift the rule by editing status.
Transition rules (``oldSelf``) are not evaluated on create, so a new run is never refused by them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from stagerun.core.spec.changes import IMMUTABLE_ONCE_STARTED
from stagerun.core.spec.fields import camel, is_required
from stagerun.core.spec.run import TrainingRun
from stagerun.core.spec.validate import KUBERNETES_MAX_RUN_NAME, KUBERNETES_RUN_NAME


def run_name_rule() -> dict:
    """The name also names the children: a Service (a DNS-1035 label) and pods ``<name>-a<attempt>-<index>``."""
    return {
        "rule": f"self.metadata.name.matches('{KUBERNETES_RUN_NAME.pattern}') && "
        f"size(self.metadata.name) <= {KUBERNETES_MAX_RUN_NAME}",
        "message": f"metadata.name must start with a letter and have at most {KUBERNETES_MAX_RUN_NAME} "
        "characters: it names the run's Service (a DNS-1035 label) and pods (<name>-a<attempt>-<index>)",
    }


# The operator's own test for a started run (operator/handlers.py accepted_run: status.attempt > 0).
STARTED = "has(oldSelf.status) && has(oldSelf.status.attempt) && oldSelf.status.attempt > 0"


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def _unchanged(path: str) -> str:
    """CEL: the field at ``path`` (``spec.data.seed``) is the same in ``self`` and ``oldSelf``. Optional fields
    are compared with their default when unset, or by presence when they have none (CEL fails on absent fields)."""
    cls, guards, field = TrainingRun, [], None
    parts = path.split(".")
    for depth, key in enumerate(parts):
        field = next(f for f in dataclasses.fields(cls) if camel(f.name) == key)
        if not is_required(field):
            guards.append(".".join(parts[: depth + 1]))
        cls = _unwrap(typing.get_type_hints(cls)[field.name])
    assert field is not None
    present = lambda root: " && ".join(f"has({root}.{g})" for g in guards)  # noqa: E731
    if not guards:
        return f"self.{path} == oldSelf.{path}"
    if isinstance(field.default, (bool, int, float, str)):
        value = lambda root: f"({present(root)} ? {root}.{path} : {_cel_literal(field.default)})"  # noqa: E731
        return f"{value('self')} == {value('oldSelf')}"
    return f"({present('self')}) == ({present('oldSelf')}) && (!({present('self')}) || self.{path} == oldSelf.{path})"


def immutability_rules() -> list[dict]:
    """One transition rule per field no edit may change once the run has started (changes.IMMUTABLE_ONCE_STARTED)."""
    return [
        {
            "rule": f"!({STARTED}) || ({_unchanged(path)})",
            "message": f"{path} cannot change once the run has started (status.attempt > 0): its checkpoints "
            "depend on it. Revert the edit, or create a new run",
            "fieldPath": f".{path}",
            "reason": "FieldValueForbidden",
        }
        for path in IMMUTABLE_ONCE_STARTED
    ]


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
