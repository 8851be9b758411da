"""The messages between the trainer and the operator (and the local runner), in one place.

Both sides used to spell these as string literals; now each is a dataclass or an enum here, with a JSON round trip
that a test checks. What travels where:

- ``PodEnv``: the environment the operator gives a trainer pod (``stagerun.operator.builders``), read by
  ``stagerun launch`` and the trainer.
- ``RunStatus``: ``<run dir>/status.json``, written by rank 0 when a gang stops, read by the local runner and by
  ``stagerun launch`` (torchrun folds worker exit codes into its own, so an exit code cannot say *why*).
- ``TerminationMessage``: what ``stagerun launch`` writes to the container's termination message and the operator
  reads from the pod status (at most 4096 bytes).
- ``Progress``: rank 0's ``GET /progress`` answer, polled by the operator for status and as the hang heartbeat.
- ``PreparedData``: ``<run dir>/prepared.json``, the data the launcher prepared for the workers to open.

Readers ignore keys they do not know, so an operator one version apart from its trainers still understands them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast


class PodEnv(StrEnum):
    """Environment variables of a trainer pod (values are the variable names)."""

    MANIFEST = "STAGERUN_MANIFEST"  # the mounted TrainingRun manifest (the attempt's ConfigMap)
    RUN_DIR = "STAGERUN_RUN_DIR"  # local working directory: tokenizer, shards, status.json
    ATTEMPT = "STAGERUN_ATTEMPT"
    PHASE_INDEX = "STAGERUN_PHASE_INDEX"  # the phase this gang's Job was shaped for
    NNODES = "STAGERUN_NNODES"
    NPROC_PER_NODE = "STAGERUN_NPROC_PER_NODE"
    SERVICE = "STAGERUN_SERVICE"  # the headless Service that gives pods their rendezvous names
    RDZV_ENDPOINT = "STAGERUN_RDZV_ENDPOINT"
    RDZV_ID = "STAGERUN_RDZV_ID"
    STATUS_PORT = "STAGERUN_STATUS_PORT"  # where /progress and /metrics are served
    NODE_ADDR = "STAGERUN_NODE_ADDR"  # overrides <hostname>.<service> (pods run as local processes in tests)
    TERMINATION_LOG = "STAGERUN_TERMINATION_LOG"  # overrides /dev/termination-log (same)
    SHUTDOWN_SECONDS = "STAGERUN_SHUTDOWN_SECONDS"  # how long torchrun waits for workers after SIGTERM
    MAX_SOURCE_BYTES = "STAGERUN_MAX_SOURCE_BYTES"  # smoke runs: tokenize a sample of each source


class GangState(StrEnum):
    """Why a gang stopped (``RunStatus.state``, ``TerminationMessage.state``) or that it is still going."""

    STARTING = "starting"  # the progress endpoint is up, no step yet
    RUNNING = "running"
    COMPLETE = "complete"  # every phase's budget is spent; the final checkpoint is committed
    RELAUNCH = "relaunch"  # a phase ended and the next one needs another topology; checkpoint committed
    STOPPED = "stopped"  # SIGTERM/SIGINT: checkpoint committed, resume with the same command
    FAILED = "failed"
    DONE = "done"  # a pod other than 0 ended cleanly (only pod 0 reports the run's state)


class FailureReason(StrEnum):
    """Reasons of a permanent failure reported by ``stagerun launch`` (retrying cannot help)."""

    INVALID_SPEC = "InvalidSpec"
    DATA_PREPARATION_FAILED = "DataPreparationFailed"


T = TypeVar("T")


def _key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json", f.name))


def _json_key(name: str) -> dict[str, str]:
    return {"json": name}


def to_json_dict(message: Any, *, drop_none: bool = True) -> dict[str, Any]:
    """A protocol dataclass as a JSON-ready dict under its wire names (``None`` fields left out by default)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_json_dict(value, drop_none=drop_none)
        elif isinstance(value, StrEnum):
            value = str(value)
        if value is None and drop_none:
            continue
        out[_key(f)] = value
    return out


def from_json_dict(cls: type[T], data: dict[str, Any]) -> T:
    """The dataclass ``cls`` from its wire dict; unknown keys are ignored, missing ones take their defaults."""
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    for name, f in hints.items():
        key = _key(f)
        if key not in data:
            continue
        value = data[key]
        nested = f.metadata.get("nested")
        if nested is not None and isinstance(value, dict):
            value = from_json_dict(nested, value)
        kwargs[name] = value
    return cls(**kwargs)


@dataclass
class RunStatus:
    """``<run dir>/status.json``: why a gang stopped. Keys are the field names (the file predates camelCase)."""

    state: str
    step: int
    tokens: int
    phase_index: int
    phase: str
    checkpoint: str | None
    message: str = ""
    updated_at: float = 0.0

    FILE = "status.json"

    def to_json(self) -> str:
        return json.dumps(to_json_dict(self, drop_none=False), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunStatus:
        return from_json_dict(cls, json.loads(text))


TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message


@dataclass
class TerminationMessage:
    """What ``stagerun launch`` leaves in the container's termination message when the gang ends.

    Pod 0 (global rank 0) carries the run's state: complete, relaunch (with the next phase's index) or stopped.
    Any pod may report a failure; ``permanent`` ones (a bad manifest, unusable data) fail the run at once.
    """

    state: str
    step: int | None = None
    tokens: int | None = None
    phase_index: int | None = field(default=None, metadata=_json_key("phaseIndex"))
    phase: str | None = None
    checkpoint: str | None = None
    message: str | None = None
    reason: str | None = None
    permanent: bool | None = None
    exit_code: int | None = field(default=None, metadata=_json_key("exitCode"))
    text: str | None = None  # a termination message that was not JSON (not written by stagerun launch)

    # What survives when the whole message would not fit the limit.
    ESSENTIAL = ("state", "reason", "permanent", "step", "tokens", "phaseIndex")

    @classmethod
    def from_status(cls, status: RunStatus) -> TerminationMessage:
        return cls(
            state=status.state,
            step=status.step,
            tokens=status.tokens,
            phase_index=status.phase_index,
            phase=status.phase,
            checkpoint=status.checkpoint,
            message=status.message,
        )

    @classmethod
    def failure(cls, reason: FailureReason, message: str) -> TerminationMessage:
        return cls(state=GangState.FAILED, reason=str(reason), permanent=True, message=message[:3000])

    def to_json(self) -> str:
        data = to_json_dict(self)
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) > TERMINATION_LIMIT:
            text = json.dumps({k: data[k] for k in self.ESSENTIAL if k in data}, separators=(",", ":"))
        return text

    @classmethod
    def from_json(cls, text: str) -> TerminationMessage:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls(state="", text=text)
        return from_json_dict(cls, data)


@dataclass
class CheckpointRef:
    """The newest committed checkpoint, as /progress reports it."""

    path: str
    step: int
    tokens: int
    time: float


@dataclass
class Progress:
    """Rank 0's ``GET /progress`` answer. ``last_step_at`` not moving for ``spec.hangTimeout`` means a stuck gang."""

    state: str = GangState.STARTING
    started_at: float = field(default_factory=time.time, metadata=_json_key("startedAt"))
    last_step_at: float | None = field(default=None, metadata=_json_key("lastStepAt"))
    run: str | None = None
    total_tokens: int | None = field(default=None, metadata=_json_key("totalTokens"))
    step: int | None = None
    tokens: int | None = None
    phase: str | None = None
    phase_index: int | None = field(default=None, metadata=_json_key("phaseIndex"))
    loss: float | None = None
    tokens_per_second: float | None = field(default=None, metadata=_json_key("tokensPerSecond"))
    tokens_per_source: dict[str, int] | None = field(default=None, metadata=_json_key("tokensPerSource"))
    last_checkpoint: CheckpointRef | None = field(
        default=None, metadata={"json": "lastCheckpoint", "nested": CheckpointRef}
    )

    PATH = "/progress"

    def to_json(self) -> str:
        # lastStepAt is always present (null before the first step): the operator's hang check reads it.
        data = to_json_dict(self)
        data.setdefault("lastStepAt", None)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Progress:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"/progress answered {type(data).__name__}, expected an object")
        return from_json_dict(cls, data)


@dataclass
class PreparedData:
    """``<run dir>/prepared.json``: the tokenizer and token shard sets the launcher prepared for the workers."""

    tokenizer_path: str = field(metadata=_json_key("tokenizerPath"))
    shard_dirs: dict[str, str] = field(metadata=_json_key("shardDirs"))
    eos_id: int = field(metadata=_json_key("eosId"))
    vocab_size: int = field(metadata=_json_key("vocabSize"))

    FILE = "prepared.json"

    def to_json(self) -> str:
        return json.dumps(to_json_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreparedData:
        return from_json_dict(cls, json.loads(text))
