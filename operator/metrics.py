"""The operator's own Prometheus metrics (served with ``stagerun operator --metrics-port``).

Labels are bounded: ``state`` (the nine run states), ``reason`` (the failure reasons of state.py), ``kind``.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .status import FAILED, PENDING, QUEUED, RESTARTING, RUNNING, STARTING, SUCCEEDED, SUSPENDED, SUSPENDING

STATES = (PENDING, QUEUED, STARTING, RUNNING, RESTARTING, SUSPENDING, SUSPENDED, SUCCEEDED, FAILED)
REGISTRY = CollectorRegistry(auto_describe=True)

RESTARTS = Counter(
    "stagerun_operator_restarts", "gang restarts scheduled, by failure reason", ["reason"], registry=REGISTRY
)
PHASE_TRANSITIONS = Counter(
    "stagerun_operator_phase_transitions",
    "phases started, in the same gang or by a relaunch",
    ["kind"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "stagerun_operator_reconcile_errors", "reconciles that raised (retried by kopf)", registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "stagerun_operator_reconcile_duration_seconds",
    "time to reconcile one TrainingRun",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
for kind in ("in_gang", "relaunch"):
    PHASE_TRANSITIONS.labels(kind)  # present at 0 from the start, so rate() has a series to work on


class _RunStates:
    """TrainingRuns by state, from the last reconcile of each (refilled by the timers after an operator restart)."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, namespace: str, name: str, state: str | None) -> None:
        with self._lock:
            if state is None:
                self._states.pop((namespace, name), None)
            else:
                self._states[(namespace, name)] = state

    def collect(self):
        with self._lock:
            states = list(self._states.values())
        family = GaugeMetricFamily("stagerun_operator_runs", "TrainingRuns by state", labels=["state"])
        for state in STATES:
            family.add_metric([state], states.count(state))
        yield family


RUNS = _RunStates()
REGISTRY.register(RUNS)


def record_decision(events) -> None:
    """Count what a reconcile decided, from its Events (one source of truth for what happened)."""
    for event in events:
        if event.reason == "PhaseStarted":
            PHASE_TRANSITIONS.labels("relaunch" if "relaunching" in event.message else "in_gang").inc()


_serving: set[int] = set()


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Start the metrics endpoint once per port (kopf may run startup handlers again after a failure)."""
    if port not in _serving:
        start_http_server(port, addr=address, registry=REGISTRY)
        _serving.add(port)
