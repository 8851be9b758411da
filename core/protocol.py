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
import types
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints


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
    # Node-local cache of remote shard sets (manifests, document indexes, the optional chunk cache): in a pod, on
    # its local-disk emptyDir rather than the container's writable layer (trainer/data/remote_io.py).
    CACHE = "STAGERUN_CACHE"
    DATA_CACHE_DIR = "STAGERUN_DATA_CACHE_DIR"  # spec.data.cache: the chunk cache's own volume, and its LRU limit
    DATA_CACHE_BYTES = "STAGERUN_DATA_CACHE_BYTES"
    CREDENTIALS_DIR = "STAGERUN_CREDENTIALS_DIR"  # credentialsSecret's keys, as files (core/credentials.py)
    # Set by Kubernetes, not by stagerun: the Job controller (index 0 holds global rank 0) and the downward API.
    JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
    POD_IP = "POD_IP"
    POD_NAME = "POD_NAME"
    POD_NAMESPACE = "POD_NAMESPACE"


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
    """Reasons of a failure reported by ``stagerun launch`` before training starts."""

    INVALID_SPEC = "InvalidSpec"  # permanent: the manifest or the pod's environment is wrong
    DATA_PREPARATION_FAILED = "DataPreparationFailed"  # permanent: the data itself is unusable (DataError)
    # Transient: storage or network trouble (a timeout, a reset connection, a 5xx) or an unforeseen error while
    # preparing data; the operator restarts the gang with backoff, within spec.maxRestarts.
    DATA_PREPARATION_ERROR = "DataPreparationError"
    # Permanent, found by the pre-flight checks (trainer/preflight.py) before any worker started: a path, a
    # credential, a teacher, the devices or the memory do not fit the manifest. The message names each field.
    PREFLIGHT_FAILED = "PreflightFailed"
    # Permanent failures of a running gang (``RunStatus.reason``, written by the rank that hit them): running the
    # same gang again fails the same way, so the operator fails the run instead of restarting it.
    CHECKPOINT_DISK_FULL = "CheckpointDiskFull"  # keep + 1 checkpoints do not fit where spec.checkpoint.path is
    NO_INTACT_CHECKPOINT = "NoIntactCheckpoint"  # every committed checkpoint is damaged: no fallback is left
    TEACHER_UNUSABLE = "TeacherUnusable"  # a distillation teacher is missing or of another architecture
    TRAINING_DATA_ERROR = "TrainingDataError"  # the token shards are unusable (DataError in a worker)
    TRAINING_INVALID_SPEC = "TrainingInvalidSpec"  # the manifest does not fit what the worker found (SpecError)


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


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value fits a field's annotation (shallow: a dict's items are not looked at)."""
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return any(_conforms(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:  # JSON has one number type: 1700000000 is a fine timestamp
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def from_json_dict(cls: type[T], data: dict[str, Any]) -> T:
    """The dataclass ``cls`` from its wire dict; unknown keys are ignored, missing ones take their defaults.

    Raises ValueError when ``data`` is not an object, lacks a required key or holds a value of the wrong type, so a
    reader has one exception to catch and never acts on a half-understood message.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cast(Any, cls)):
        key = _key(f)
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}: {key} is missing")
            continue
        value = data[key]
        nested = f.metadata.get("nested")
        if nested is not None and isinstance(value, dict):
            value = from_json_dict(nested, value)
        if not _conforms(value, hints[f.name]):
            raise ValueError(f"{cls.__name__}: {key} is {value!r}, expected {hints[f.name]}")
        kwargs[f.name] = value
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
    reason: str = ""  # state failed: a FailureReason (every failed status is permanent: a rerun cannot help)

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

    # What the operator decides on: kept when even the message without its free text would not fit the limit.
    ESSENTIAL = ("state", "reason", "permanent", "step", "tokens", "phaseIndex", "exitCode")
    FREE_TEXT = ("message", "text")  # shortened first when the message is too long

    @classmethod
    def from_status(cls, status: RunStatus, exit_code: int | None = None) -> TerminationMessage:
        """The gang's status as the operator reads it; a failed status is permanent (see ``RunStatus.reason``)."""
        failed = status.state == GangState.FAILED
        return cls(
            state=status.state,
            step=status.step,
            tokens=status.tokens,
            phase_index=status.phase_index,
            phase=status.phase,
            checkpoint=status.checkpoint,
            message=status.message,
            reason=(status.reason or None) if failed else None,
            permanent=True if failed else None,
            exit_code=exit_code,
        )

    @classmethod
    def failure(cls, reason: FailureReason, message: str, *, permanent: bool = True) -> TerminationMessage:
        return cls(state=GangState.FAILED, reason=str(reason), permanent=permanent, message=message)

    def to_json(self) -> str:
        """Compact JSON of at most ``TERMINATION_LIMIT`` bytes (Kubernetes cuts longer ones, and cut JSON is
        unreadable): the free text is shortened first, then everything but ``ESSENTIAL`` is dropped."""
        data = to_json_dict(self)
        text = _compact(data)
        if _size(text) <= TERMINATION_LIMIT:
            return text
        free = {key: data.pop(key) for key in self.FREE_TEXT if key in data}
        if _size(_compact(data)) > TERMINATION_LIMIT:
            data = {key: data[key] for key in self.ESSENTIAL if key in data}
        if "message" in free:
            data["message"] = _longest_fitting(data, "message", free["message"])
        return _compact(data)

    @classmethod
    def from_json(cls, text: str) -> TerminationMessage:
        """Never raises: a message that is not one of ours comes back as ``text`` with an empty state."""
        try:
            return from_json_dict(cls, json.loads(text))
        except ValueError:
            return cls(state="", text=text)


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def _size(text: str) -> int:
    return len(text.encode())


def _longest_fitting(data: dict[str, Any], key: str, value: str, marker: str = "...") -> str:
    """The longest prefix of ``value`` (marked as cut) that keeps ``data`` within the limit once set as ``key``.

    Searched rather than computed: JSON escapes (quotes, non-ASCII as \\uXXXX) make bytes per character vary.
    """

    def fits(candidate: str) -> bool:
        return _size(_compact({**data, key: candidate})) <= TERMINATION_LIMIT

    if fits(value):
        return value
    low, high = 0, len(value)  # fits(value[:low] + marker) holds for low = 0 as long as the rest fits at all
    while low < high:
        middle = (low + high + 1) // 2
        if fits(value[:middle] + marker):
            low = middle
        else:
            high = middle - 1
    return value[:low] + marker


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
    evaluation: dict[str, Any] | None = None  # the latest spec.phases[].eval result (trainer/evaluation.py)

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
