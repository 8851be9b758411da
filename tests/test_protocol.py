"""The trainer <-> operator messages (stagerun.core.protocol): JSON round trips, tolerance of what one version does not
know about the other, the termination message's size limit, and how `stagerun launch` classifies its failures."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import tiny_run, write_manifest

from stagerun.core.protocol import (
    TERMINATION_LIMIT,
    CheckpointRef,
    FailureReason,
    GangState,
    PodEnv,
    PreparedData,
    Progress,
    RunStatus,
    TerminationMessage,
    from_json_dict,
    to_json_dict,
)
from stagerun.trainer import launch as launch_module

STATUS = RunStatus(
    state=GangState.RELAUNCH,
    step=42,
    tokens=524_288,
    phase_index=1,
    phase="long",
    checkpoint="s3://b/run/step-00000042",
    message="phase long needs 4 processes",
    updated_at=1_800_000_000.5,
)
PROGRESS = Progress(
    state=GangState.RUNNING,
    started_at=1_800_000_000.0,
    last_step_at=1_800_000_100.0,
    run="tiny",
    total_tokens=36_864,
    step=40,
    tokens=491_520,
    phase="core",
    phase_index=0,
    loss=6.2,
    tokens_per_second=5000.0,
    tokens_per_source={"docs": 344_064, "code": 147_456},
    last_checkpoint=CheckpointRef(path="s3://b/run/step-00000040", step=40, tokens=491_520, time=1_800_000_099.0),
)
PREPARED = PreparedData(
    tokenizer_path="/run/tokenizer.json", shard_dirs={"docs": "/run/data/docs"}, eos_id=0, vocab_size=512
)


def test_every_message_round_trips_through_json():
    assert RunStatus.from_json(STATUS.to_json()) == STATUS
    assert Progress.from_json(PROGRESS.to_json()) == PROGRESS
    assert Progress.from_json(PROGRESS.to_json().encode()) == PROGRESS  # urlopen gives bytes
    assert PreparedData.from_json(PREPARED.to_json()) == PREPARED
    message = TerminationMessage.from_status(STATUS)
    assert TerminationMessage.from_json(message.to_json()) == message
    failure = TerminationMessage.failure(FailureReason.DATA_PREPARATION_ERROR, "TimeoutError: s3", permanent=False)
    assert TerminationMessage.from_json(failure.to_json()) == failure


def test_wire_names_are_the_documented_keys():
    progress = json.loads(PROGRESS.to_json())
    assert {"startedAt", "lastStepAt", "totalTokens", "tokensPerSecond", "tokensPerSource", "lastCheckpoint"} <= set(
        progress
    )
    assert progress["lastCheckpoint"] == {
        "path": "s3://b/run/step-00000040",
        "step": 40,
        "tokens": 491_520,
        "time": 1_800_000_099.0,
    }
    # The status file keeps its snake_case keys, null checkpoint included (it predates the protocol module).
    assert set(json.loads(STATUS.to_json())) == {
        "state", "step", "tokens", "phase_index", "phase", "checkpoint", "message", "updated_at", "reason",
    }  # fmt: skip
    assert json.loads(RunStatus("stopped", 1, 2, 0, "core", None).to_json())["checkpoint"] is None
    assert json.loads(PREPARED.to_json()) == {
        "tokenizerPath": "/run/tokenizer.json",
        "shardDirs": {"docs": "/run/data/docs"},
        "eosId": 0,
        "vocabSize": 512,
    }
    message = json.loads(TerminationMessage.from_status(STATUS).to_json())
    assert message["phaseIndex"] == 1 and message["state"] == "relaunch" and "exitCode" not in message
    assert json.loads(TerminationMessage(GangState.FAILED, exit_code=1).to_json()) == {"state": "failed", "exitCode": 1}


def test_a_fresh_progress_reports_a_null_last_step():
    """The operator's hang check reads lastStepAt: before the first step it is there, and null."""
    data = json.loads(Progress(started_at=1.0).to_json())
    assert data == {"state": "starting", "startedAt": 1.0, "lastStepAt": None}


def test_readers_ignore_keys_they_do_not_know_and_default_the_missing_ones():
    progress = Progress.from_json(json.dumps({"state": "running", "step": 3, "gpuTemperature": 71, "startedAt": 5}))
    assert (progress.step, progress.started_at, progress.loss, progress.last_checkpoint) == (3, 5, None, None)
    message = TerminationMessage.from_json('{"state":"complete","step":9,"futureField":[1,2]}')
    assert message == TerminationMessage(state="complete", step=9)
    status = json.loads(STATUS.to_json()) | {"newField": True}
    assert RunStatus.from_json(json.dumps(status)) == STATUS
    prepared = json.loads(PREPARED.to_json()) | {"tokenizerSha256": "abc"}
    assert from_json_dict(PreparedData, prepared) == PREPARED


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",  # not an object
        '{"step": "twelve"}',  # wrong type
        '{"step": true}',  # a bool is not a step
        '{"lastCheckpoint": "s3://b"}',  # not an object where one is nested
        '{"lastCheckpoint": {"path": "s3://b", "step": 1}}',  # a nested object lacking a required key
        "not json",
    ],
)
def test_a_malformed_progress_answer_is_a_value_error(text):
    with pytest.raises(ValueError):
        Progress.from_json(text)


def test_missing_required_keys_are_a_value_error():
    with pytest.raises(ValueError, match="phase_index"):
        RunStatus.from_json('{"state": "complete", "step": 1, "tokens": 2, "phase": "core", "checkpoint": null}')
    with pytest.raises(ValueError, match="tokenizerPath"):
        PreparedData.from_json('{"shardDirs": {}, "eosId": 0, "vocabSize": 1}')


@pytest.mark.parametrize("text", ["stopped by SIGTERM", "[1]", '{"step": 3}', '{"state": 7}', ""])
def test_a_termination_message_not_written_by_stagerun_is_kept_as_text(text):
    message = TerminationMessage.from_json(text)
    assert message.state == "" and message.text == text and not message.permanent


@pytest.mark.parametrize("char", ["x", "é", '"', "\U0001f525"])  # JSON escapes make some characters longer
def test_a_long_termination_message_is_cut_to_the_limit_keeping_what_the_operator_decides_on(char):
    message = TerminationMessage.failure(FailureReason.DATA_PREPARATION_FAILED, "DataError: " + char * 10_000)
    text = message.to_json()
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert len(text.encode()) > TERMINATION_LIMIT - 16  # shortened, not dropped
    back = TerminationMessage.from_json(text)
    assert (back.state, back.reason, back.permanent) == ("failed", "DataPreparationFailed", True)
    assert back.message.startswith("DataError: " + char) and back.message.endswith("...")


def test_when_even_the_short_fields_do_not_fit_only_the_essential_keys_are_kept():
    message = TerminationMessage.from_status(STATUS)
    message.checkpoint = "s3://b/" + "x" * 5000
    back = TerminationMessage.from_json(message.to_json())
    assert len(message.to_json().encode()) <= TERMINATION_LIMIT
    assert (back.state, back.step, back.tokens, back.phase_index) == ("relaunch", 42, 524_288, 1)
    assert back.checkpoint is None and back.phase is None and back.message == STATUS.message


def test_enums_are_plain_strings_on_the_wire():
    assert to_json_dict(TerminationMessage(GangState.DONE, exit_code=0)) == {"state": "done", "exitCode": 0}
    assert type(to_json_dict(TerminationMessage(GangState.DONE))["state"]) is str
    assert PodEnv.TERMINATION_LOG == "STAGERUN_TERMINATION_LOG" and f"{PodEnv.MANIFEST}" == "STAGERUN_MANIFEST"


# -- stagerun launch ------------------------------------------------------------------------------------------------


@pytest.fixture
def pod_env(tmp_path: Path) -> dict[str, str]:
    """The environment the operator gives pod 0 of a one-pod gang, for the tiny run (two processes per pod)."""
    manifest = tiny_run(image="ghcr.io/example/stagerun:0.1", checkpoint={"path": f"file://{tmp_path}/ckpt"})
    return {
        PodEnv.MANIFEST.value: str(write_manifest(tmp_path / "run.yaml", manifest)),
        PodEnv.RUN_DIR.value: str(tmp_path / "run"),
        PodEnv.PHASE_INDEX.value: "0",
        PodEnv.NNODES.value: "1",
        PodEnv.NPROC_PER_NODE.value: "2",
        PodEnv.SERVICE.value: "tiny-a1",
        PodEnv.RDZV_ENDPOINT.value: "tiny-a1-0.tiny-a1:29400",
        PodEnv.RDZV_ID.value: "uid-1",
        PodEnv.JOB_COMPLETION_INDEX.value: "0",
        PodEnv.TERMINATION_LOG.value: str(tmp_path / "termination-log"),
    }


def termination_message(env: dict[str, str]) -> TerminationMessage:
    return TerminationMessage.from_json(Path(env[PodEnv.TERMINATION_LOG]).read_text())


def failing_prepare(exc: BaseException):
    def prepare(run, run_dir, max_source_bytes=None):
        raise exc

    return prepare


def test_launch_reports_an_invalid_environment_as_permanent(pod_env):
    del pod_env[PodEnv.NNODES]
    assert launch_module.launch(pod_env) == launch_module.EXIT_INVALID
    message = termination_message(pod_env)
    assert (message.state, message.reason, message.permanent) == ("failed", "InvalidSpec", True)
    assert "STAGERUN_NNODES is not set" in message.message


def test_launch_reports_bad_data_as_permanent(pod_env, monkeypatch):
    from stagerun.trainer.data import DataError

    problem = DataError("builtin:nope: unknown generated corpus")
    monkeypatch.setattr("stagerun.trainer.runner.prepare", failing_prepare(problem))
    assert launch_module.launch(pod_env) == launch_module.EXIT_INVALID
    message = termination_message(pod_env)
    assert (message.state, message.reason, message.permanent) == ("failed", "DataPreparationFailed", True)
    assert message.message == "DataError: builtin:nope: unknown generated corpus"


@pytest.mark.parametrize(
    "problem",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("read timed out"),
        OSError("503 Service Unavailable"),
        RuntimeError("something unforeseen"),
    ],
)
def test_launch_reports_storage_and_unknown_errors_as_transient(pod_env, monkeypatch, problem):
    monkeypatch.setattr("stagerun.trainer.runner.prepare", failing_prepare(problem))
    code = launch_module.launch(pod_env)
    assert code != 0 and code != launch_module.EXIT_INVALID
    message = termination_message(pod_env)
    assert (message.state, message.reason, message.permanent) == ("failed", "DataPreparationError", False)
    assert message.message.startswith(type(problem).__name__)


class _FinishedTorchrun:
    """Stands in for torchrun: the gang already ran and left its status file."""

    def __init__(self, cmd, env):
        self.cmd, self.env = cmd, env

    def wait(self) -> int:
        return 0

    def send_signal(self, signum: int) -> None:
        pass


def test_launch_passes_the_gangs_status_on_as_the_termination_message(pod_env, monkeypatch):
    run_dir = Path(pod_env[PodEnv.RUN_DIR])
    monkeypatch.setattr("stagerun.trainer.runner.prepare", lambda run, run_dir, max_source_bytes=None: None)
    monkeypatch.setattr(launch_module.subprocess, "Popen", _FinishedTorchrun)
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text("{}")  # what prepare would have trained; pod 0 publishes it
    (run_dir / RunStatus.FILE).write_text(STATUS.to_json())
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert launch_module.launch(pod_env) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert termination_message(pod_env) == TerminationMessage.from_status(STATUS)
