"""Loading the real operator for a test: its handlers registered into a fresh kopf registry, with test settings."""

from __future__ import annotations

import importlib

import kopf


def fresh_operator(monkeypatch, settings: dict[str, str]) -> tuple[kopf.OperatorRegistry, object]:
    """(registry, handlers module): the operator's handlers re-registered into a new registry (so no other test's
    handlers run beside them) after ``settings`` (``STAGERUN_*`` environment variables) are in place, and the
    operator's cached API client dropped (every emulated API listens on a new port)."""
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("stagerun.operator.kube._api", None)
    registry, previous = kopf.OperatorRegistry(), kopf.get_default_registry()
    kopf.set_default_registry(registry)
    try:
        from stagerun.operator import handlers

        importlib.reload(handlers)  # the decorators register into `registry`; module constants re-read the env
    finally:
        kopf.set_default_registry(previous)
    return registry, handlers
