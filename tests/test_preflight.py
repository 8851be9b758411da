"""Pre-flight checks and honest failure advice (issue 19, item 4; item 5's tracebacks in `stagerun run`).

Each problem is reproduced first as a user meets it: the real `stagerun run` / `stagerun launch` on real files, with
a `sitecustomize` hook that records every `torch.distributed.run` start, so "caught before any worker started" is
measured rather than assumed. What a CPU test machine cannot have (a full disk, GPUs, little memory) comes through
``preflight.Machine``; one test checks that the real free space of tmp_path is what the check reads.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stagerun, tiny_run, write_manifest

from stagerun.core.memory_estimate import estimate_phase_memory
from stagerun.core.protocol import FailureReason, GangState, PodEnv, RunStatus, TerminationMessage
from stagerun.core.spec import resolve_run
from stagerun.trainer import preflight as P
from stagerun.trainer.failure_advice import classify, failed_status, permanent_advice, rerun_advice

CPU = P.Machine(gpus=0, gpu_memory=None, ram_available=64 << 30, free_bytes=lambda path: 1 << 50)
HOOK = """import os, sys
if {"torch.distributed.run", "stagerun.trainer.torchrun"} & set(sys.orig_argv):
    open(os.path.join(os.environ["TORCHRUN_SEEN"], str(os.getpid())), "w").close()
"""


@pytest.fixture
def torchrun_seen(tmp_path) -> tuple[dict[str, str], Path]:
    """Environment that makes every Python process started as torchrun leave a file in the returned folder."""
    hook, seen = tmp_path / "hook", tmp_path / "torchrun-seen"
    hook.mkdir()
    seen.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TORCHRUN_SEEN": str(seen)}, seen


def test_the_torchrun_hook_sees_a_torchrun_start(torchrun_seen):
    """The measurement's own check: without it, "no torchrun was started" could not fail."""
    env, seen = torchrun_seen
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--help"],
        env=dict(os.environ, **env),
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert len(list(seen.iterdir())) == 1


def clean_failure(result) -> str:
    assert result.returncode != 0, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    return result.stdout


# --- stagerun run: refused before any worker, every problem at once, no traceback -------------------------------


def test_nproc_below_one_is_refused_naming_the_flag(tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    for nproc in ("-1", "0"):
        output = clean_failure(stagerun("run", str(manifest), "--run-dir", str(tmp_path / "run"), "--nproc", nproc))
        assert f"--nproc: must be at least 1, got {nproc}" in output
        assert "spec.parallelism" not in output  # what -1 used to be blamed on
    assert not (tmp_path / "run").exists()


def test_bad_paths_teacher_and_gpus_are_all_reported_before_any_worker_starts(tmp_path, torchrun_seen):
    env, seen = torchrun_seen
    manifest = tiny_run(
        tokenizer={"path": str(tmp_path / "missing-tokenizer.json")},
        resources={"gpusPerNode": 1},
    )
    manifest["spec"]["data"]["sources"]["docs"] = {"path": str(tmp_path / "nowhere" / "*.jsonl"), "weight": 0.6}
    manifest["spec"]["data"]["sources"]["code"] = {"path": str(tmp_path / "absent-folder"), "weight": 0.4}
    manifest["spec"]["phases"][2]["distill"] = {"teacher": {"checkpoint": str(tmp_path / "no-teacher")}}
    path = write_manifest(tmp_path / "bad.yaml", manifest)
    output = clean_failure(stagerun("run", str(path), "--run-dir", str(tmp_path / "run"), env=env))
    assert "5 problem(s)" in output and "found before starting any worker" in output, output
    assert f"spec.data.sources.docs.path: {tmp_path}/nowhere/*.jsonl matches no files" in output
    assert f"spec.data.sources.code.path: {tmp_path}/absent-folder does not exist" in output
    assert "spec.tokenizer.path: " in output and "missing-tokenizer.json does not exist" in output
    assert "spec.phases[2].distill.teacher.checkpoint: phase anneal: no committed checkpoint at" in output
    assert "spec.resources.gpusPerNode: is 1 but this machine has no CUDA GPU (fix: set gpusPerNode: 0" in output
    assert list(seen.iterdir()) == []  # no torchrun, so no phase started
    assert not (tmp_path / "run").exists()  # nothing prepared, the probe's folders removed again


def test_a_data_error_found_while_preparing_is_one_message_not_a_traceback(tmp_path, torchrun_seen):
    env, seen = torchrun_seen
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "fine"}\n{"no text field": 1}\n')  # exists (pre-flight passes), unusable inside
    manifest = tiny_run()
    manifest["spec"]["data"]["sources"]["code"] = {"path": str(empty), "weight": 0.4}
    path = write_manifest(tmp_path / "tiny.yaml", manifest)
    output = clean_failure(stagerun("run", str(path), "--run-dir", str(tmp_path / "run"), env=env))
    assert "error: " in output and str(empty) in output, output[-3000:]
    assert list(seen.iterdir()) == []


def test_a_permanent_failure_inside_the_workers_is_advised_as_such_without_a_traceback(run_dir, tmp_path):
    """Every checkpoint was de-committed as damaged: the workers refuse to start from step 0 (NoIntactCheckpoint),
    which no rerun changes. Pre-flight cannot see it (nothing is committed); the workers classify it."""
    from conftest import run_tiny

    from stagerun.trainer.checkpoint_resume import DAMAGED

    damaged = run_dir / "checkpoints" / "step-00000004"
    damaged.mkdir(parents=True)
    (damaged / DAMAGED).write_text(json.dumps({"reason": "a flipped bit in __0_0.distcp"}))
    output = clean_failure(run_tiny(write_manifest(tmp_path / "tiny.yaml", tiny_run()), run_dir))
    assert "tiny: workers failed: no committed checkpoint under" in output, output[-3000:]
    assert "this failure is permanent (NoIntactCheckpoint)" in output
    assert "run the same command again" not in output
    assert "torchrun: worker rank" in output  # torchrun's one line instead of its ChildFailedError traceback
    assert json.loads((run_dir / RunStatus.FILE).read_text())["reason"] == "NoIntactCheckpoint"


# --- the pod entrypoint: the same checks, reported to the operator as permanent -----------------------------------


def test_launch_fails_the_run_for_good_on_a_preflight_problem_without_starting_torchrun(tmp_path, torchrun_seen):
    from test_operator_state import RUN, SETTINGS, obs, pod, running_status

    from stagerun.operator.state import reconcile

    env, seen = torchrun_seen
    manifest = tiny_run(image="stagerun:test", checkpoint={"path": str(tmp_path / "ckpt"), "volumeClaim": "ckpt"})
    manifest["spec"]["phases"][0]["distill"] = {"teacher": {"checkpoint": str(tmp_path / "no-teacher")}}
    path = write_manifest(tmp_path / "tiny.yaml", manifest)
    log = tmp_path / "termination-log"
    pod_env = {
        PodEnv.MANIFEST: str(path),
        PodEnv.RUN_DIR: str(tmp_path / "run"),
        PodEnv.PHASE_INDEX: "0",
        PodEnv.NNODES: "1",
        PodEnv.NPROC_PER_NODE: "2",
        PodEnv.SERVICE: "tiny-a1",
        PodEnv.RDZV_ENDPOINT: "127.0.0.1:29400",
        PodEnv.RDZV_ID: "tiny-a1",
        PodEnv.NODE_ADDR: "127.0.0.1",
        PodEnv.TERMINATION_LOG: str(log),
        PodEnv.JOB_COMPLETION_INDEX: "0",
    }
    result = stagerun("launch", env={**env, **{str(k): v for k, v in pod_env.items()}})
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout[-3000:]
    message = TerminationMessage.from_json(log.read_text())
    assert message.state == GangState.FAILED and message.permanent is True
    assert message.reason == FailureReason.PREFLIGHT_FAILED
    assert "spec.phases[0].distill.teacher.checkpoint" in (message.message or "")
    assert list(seen.iterdir()) == []
    # What the operator makes of it: Failed with that reason, no restart.
    decision = reconcile(RUN, running_status(), obs(pods=[pod(phase="Failed", exit_code=2, message=message)]), SETTINGS)
    assert decision.status["state"] == "Failed" and decision.status["failureReason"] == "PreflightFailed"
    assert decision.status["restarts"] == 0


class _GangThatFailedForGood:
    """Stands in for torchrun (as in test_protocol.py): a worker hit a full disk and left its status, exit 1."""

    status = ""  # set by the test: classifying imports torch, which must not happen under a patched Popen

    def __init__(self, cmd, env):
        (Path(env[PodEnv.RUN_DIR]) / RunStatus.FILE).write_text(self.status)

    def wait(self) -> int:
        return 1

    def send_signal(self, signum: int) -> None:
        pass


@pytest.mark.parametrize("index", ["0", "1"])  # every pod passes it on, not only pod 0
def test_a_permanent_failure_in_a_worker_reaches_the_operator_as_permanent(tmp_path, monkeypatch, index):
    import signal

    from test_operator_state import RUN, SETTINGS, obs, pod, running_status

    from stagerun.operator.state import reconcile
    from stagerun.trainer import launch as launch_module

    manifest = tiny_run(image="stagerun:test", checkpoint={"path": str(tmp_path / "ckpt"), "volumeClaim": "ckpt"})
    pod_env = {
        PodEnv.MANIFEST: str(write_manifest(tmp_path / "tiny.yaml", manifest)),
        PodEnv.RUN_DIR: str(tmp_path / "run"),
        PodEnv.PHASE_INDEX: "0",
        PodEnv.NNODES: "2",
        PodEnv.NPROC_PER_NODE: "1",
        PodEnv.SERVICE: "tiny-a1",
        PodEnv.RDZV_ENDPOINT: "127.0.0.1:29400",
        PodEnv.RDZV_ID: "tiny-a1",
        PodEnv.NODE_ADDR: "127.0.0.1",
        PodEnv.TERMINATION_LOG: str(tmp_path / "termination-log"),
        PodEnv.JOB_COMPLETION_INDEX: index,
    }
    pod_env = {str(k): v for k, v in pod_env.items()}
    failure = classify(OSError(errno.ENOSPC, "No space left on device"))
    assert failure is not None
    monkeypatch.setattr(_GangThatFailedForGood, "status", failed_status(failure).to_json())
    monkeypatch.setattr("stagerun.trainer.runner.prepare", lambda run, run_dir, max_source_bytes=None: None)
    monkeypatch.setattr(launch_module.subprocess, "Popen", _GangThatFailedForGood)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_text("{}")  # what prepare would have trained; pod 0 publishes it
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # pod 1 waits for pod 0's
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert launch_module.launch(pod_env) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    message = TerminationMessage.from_json((tmp_path / "termination-log").read_text())
    assert message.permanent is True and message.reason == "CheckpointDiskFull" and message.exit_code == 1
    assert "No space left on device" in (message.message or "")
    # Pod 1 failed for good, pod 0 only saw its peer go: the operator fails the run with pod 1's reason.
    peers = [
        pod(name="quickstart-a1-0-abcde", index=0, phase="Failed", exit_code=1, message={"state": "failed"}),
        pod(name="quickstart-a1-1-fghij", index=1, phase="Failed", exit_code=1, message=message),
    ]
    decision = reconcile(RUN, running_status(), obs(pods=peers), SETTINGS)
    assert decision.status["state"] == "Failed" and decision.status["failureReason"] == "CheckpointDiskFull"
    stopped = TerminationMessage.from_status(RunStatus("stopped", 4, 8, 0, "core", "ck"))
    assert stopped.permanent is None and stopped.reason is None  # only failures are marked


# --- classification and advice ----------------------------------------------------------------------------------


def test_only_transient_failures_are_advised_to_run_again():
    from stagerun.trainer.checkpoint_resume import NoIntactCheckpoint
    from stagerun.trainer.data import DataError
    from stagerun.trainer.distill import TeacherMismatch, TeacherNotFound

    permanent = {
        NoIntactCheckpoint("every checkpoint is damaged"): "NoIntactCheckpoint",
        OSError(errno.ENOSPC, "No space left on device"): "CheckpointDiskFull",
        TeacherNotFound("no committed checkpoint at /t"): "TeacherUnusable",
        TeacherMismatch("another architecture"): "TeacherUnusable",
        DataError("shard 3: token id 70000 >= vocab"): "TrainingDataError",
    }
    for exc, reason in permanent.items():
        failure = classify(exc)
        assert failure is not None and failure.reason == reason, exc
        advice = permanent_advice("tiny", failed_status(failure))
        assert "run the same command again" not in advice and reason in advice and str(exc) in advice
    for exc in (ConnectionResetError("peer"), TimeoutError("s3"), RuntimeError("a peer rank exited")):
        assert classify(exc) is None, exc
    assert "run the same command again to resume from step 12" in rerun_advice("tiny", 1, 12)


# --- the checks one by one (real files; the machine given) ------------------------------------------------------


def run_of(**spec) -> object:
    return resolve_run(tiny_run(**spec))


def test_free_space_is_read_from_the_real_filesystem(tmp_path):
    real = shutil.disk_usage(tmp_path).free
    assert abs(P.free_bytes(str(tmp_path)) - real) < 64 << 20
    assert abs(P.free_bytes(str(tmp_path / "not" / "yet")) - real) < 64 << 20  # its nearest existing parent


def test_a_root_without_room_for_keep_plus_one_checkpoints_is_refused(tmp_path):
    run = run_of(checkpoint={"path": str(tmp_path / "ck"), "keep": 2})
    size = P.checkpoint_bytes(run)
    assert size == 12 * run.model.parameter_count()
    tight = P.Machine(gpus=0, gpu_memory=None, ram_available=64 << 30, free_bytes=lambda path: 3 * size - 1)
    found = P.check_checkpoint_root(run, str(tmp_path / "ck"), "spec.checkpoint.path", tight)
    [problem] = found.problems
    assert problem.path == "spec.checkpoint.path" and "keep + 1 = 3 checkpoints" in problem.message
    assert "lower spec.checkpoint.keep" in (problem.fix or "")
    assert not (tmp_path / "ck").exists()  # the probe's folder, made for it, is gone again
    (tmp_path / "ck").mkdir()
    roomy = P.Machine(gpus=0, gpu_memory=None, ram_available=64 << 30, free_bytes=lambda path: 3 * size)
    assert P.check_checkpoint_root(run, str(tmp_path / "ck"), "spec.checkpoint.path", roomy).problems == []
    assert list((tmp_path / "ck").iterdir()) == []  # the probe was written and deleted


def test_checkpoints_already_on_disk_count_as_used_space(tmp_path):
    root = tmp_path / "ck"
    for step in (4, 8):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "COMMITTED").write_text(json.dumps({"bytes": 1000}))
    run = run_of(checkpoint={"path": str(root), "keep": 2})
    size = P.checkpoint_bytes(run)
    one = P.Machine(gpus=0, gpu_memory=None, ram_available=64 << 30, free_bytes=lambda path: size)
    assert P.check_checkpoint_root(run, str(root), "spec.checkpoint.path", one).problems == []


def test_an_unwritable_checkpoint_root_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    run = run_of(checkpoint={"path": str(tmp_path / "a-file" / "ck")})
    [problem] = P.check_checkpoint_root(run, str(tmp_path / "a-file" / "ck"), "spec.checkpoint.path", CPU).problems
    assert problem.path == "spec.checkpoint.path" and "is not writable" in problem.message


def test_devices_gpus_on_a_cpu_machine_and_more_processes_than_gpus(tmp_path):
    run = run_of(resources={"nodes": 2, "gpusPerNode": 2})
    phase = run.phases[0]
    [cpu] = P.check_devices(run, phase, phase.world_size, CPU, pod=False).problems
    assert cpu.path == "spec.resources.gpusPerNode" and "no CUDA GPU" in cpu.message
    two = P.Machine(gpus=2, gpu_memory=80 << 30, ram_available=64 << 30)
    [local] = P.check_devices(run, phase, phase.world_size, two, pod=False).problems
    assert "runs 4 processes on this machine, one per GPU, but it has 2" in local.message
    assert "--nproc 2" in (local.fix or "")
    assert P.check_devices(run, phase, 2, two, pod=True).problems == []  # a pod runs processesPerNode


def test_memory_for_the_model_refuses_what_cannot_fit_and_warns_near_the_limit():
    run = run_of(resources={"processesPerNode": 2})
    phase = run.phases[0]
    # The shared model of a step's peak (what `stagerun plan` prints), per rank; two ranks share this machine's RAM.
    peak = estimate_phase_memory(run, phase).total
    assert peak > 16 * run.model.parameter_count() // 2  # activations and the loss come on top of the states
    fits = P.Machine(gpus=0, gpu_memory=None, ram_available=4 * peak)
    assert P.check_memory(run, phase, 2, fits).problems == P.check_memory(run, phase, 2, fits).warnings == []
    near = P.Machine(gpus=0, gpu_memory=None, ram_available=int(2 * peak / 0.95))
    [warning] = P.check_memory(run, phase, 2, near).warnings
    assert warning.path == "spec.model" and "little margin is left" in warning.message
    [problem] = P.check_memory(run, phase, 2, P.Machine(gpus=0, gpu_memory=None, ram_available=peak)).problems
    assert "shard over more ranks" in (problem.fix or "") and "estimated peak" in problem.message
    gpu_run = run_of(resources={"gpusPerNode": 2})
    gpu_peak = estimate_phase_memory(gpu_run, gpu_run.phases[0]).total
    [gpu] = P.check_memory(
        gpu_run, gpu_run.phases[0], 2, P.Machine(gpus=2, gpu_memory=gpu_peak - 1, ram_available=64 << 30)
    ).problems
    assert "GPU memory of one GPU" in gpu.message
    assert (
        P.check_memory(
            gpu_run, gpu_run.phases[0], 2, P.Machine(gpus=2, gpu_memory=2 * gpu_peak, ram_available=64 << 30)
        ).problems
        == []
    )


def test_memory_counts_a_dpo_reference_beside_the_policy():
    pretrain = run_of()
    dpo = run_of(
        tokenizer={"train": {"vocabSize": 512, "maxBytes": "1M"}, "chatTemplate": {"format": "chatml"}},
        data={
            "sources": {
                "docs": {"path": "builtin:python-docs", "weight": 1.0},
                "prefs": {"path": "builtin:preference-arithmetic", "weight": 0.0},
            }
        },
        phases=[
            {"name": "pre", "tokens": "64K", "seqLen": 64, "batch": {"size": 512}, "lr": {"peak": 1e-3}},
            {"name": "dpo", "tokens": "64K", "kind": "dpo", "data": {"weights": {"prefs": 1.0}}},
        ],
    )
    pre, pref = estimate_phase_memory(dpo, dpo.phases[0]), estimate_phase_memory(dpo, dpo.phases[1])
    ranks = dpo.phases[1].world_size  # FSDP over every rank: each holds its share of the reference, in fp32
    assert pre.frozen == 0 and pref.frozen == 4 * -(-dpo.model.parameter_count() // ranks)
    assert pref.total - pre.total == pref.frozen
    assert estimate_phase_memory(pretrain, pretrain.phases[0]).frozen == 0


def save_tiny_checkpoint(root: Path, model_spec) -> None:
    """A real (single-process) stagerun checkpoint of a model built from ``model_spec``."""
    from stagerun.core.spec.model import architecture_fields
    from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
    from stagerun.trainer.model import Transformer, init_weights

    model = Transformer(model_spec)
    init_weights(model, 0)
    meta = {"tokens": 64, "phase_index": 0, "model": architecture_fields(model_spec)}
    CheckpointManager(str(root), keep=1).save(1, {"train": ModelOptimizerState(model, None)}, meta, phase_boundary=True)


def test_a_teacher_of_another_architecture_is_refused_and_the_right_one_passes(tmp_path):
    student = run_of()
    save_tiny_checkpoint(tmp_path / "teacher", student.model)
    same = tiny_run()
    same["spec"]["phases"][2]["distill"] = {"teacher": {"checkpoint": str(tmp_path / "teacher")}}
    assert P.check_teachers(resolve_run(same), str(tmp_path / "own")).problems == []
    other = tiny_run()
    other["spec"]["phases"][2]["distill"] = {
        "teacher": {"checkpoint": str(tmp_path / "teacher"), "model": {"preset": "tiny", "layers": 3}}
    }
    [problem] = P.check_teachers(resolve_run(other), str(tmp_path / "own")).problems
    assert problem.path == "spec.phases[2].distill.teacher.model" and "another architecture" in problem.message


def test_resuming_a_checkpoint_of_another_model_is_refused_before_the_start(tmp_path):
    run = run_of(checkpoint={"path": str(tmp_path / "ck")})
    save_tiny_checkpoint(tmp_path / "ck", run.model)
    assert P.check_checkpoint_root(run, str(tmp_path / "ck"), "spec.checkpoint.path", CPU).problems == []
    changed = run_of(model={"preset": "tiny", "layers": 3}, checkpoint={"path": str(tmp_path / "ck")})
    [problem] = P.check_checkpoint_root(changed, str(tmp_path / "ck"), "spec.checkpoint.path", CPU).problems
    assert problem.path == "spec.model" and "written by a different model (fields that differ: layers)" in (
        problem.message
    )


def test_a_missing_init_folder_is_named(tmp_path):
    run = run_of(model={"preset": "tiny", "init": {"from": "hf", "path": str(tmp_path / "no-such-model")}})
    [problem] = P.check_init(run).problems
    assert problem.path == "spec.model.init.path" and "config.json" in problem.message


# --- s3:// (moto's server on 127.0.0.1) ---------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="data")
    client.put_object(Bucket="data", Key="web/part-0.jsonl", Body=b'{"text": "hello"}\n')
    try:
        yield client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def s3_run():
    manifest = tiny_run(checkpoint={"path": "s3://data/runs/tiny", "keep": 2})
    manifest["spec"]["data"]["sources"]["code"] = {"path": "s3://data/web/part-0.jsonl", "weight": 0.4}
    manifest["spec"]["data"]["sources"]["docs"] = {"path": "s3://data/missing/", "weight": 0.6}
    return resolve_run(manifest)


def test_s3_paths_are_checked_with_one_request_and_the_probe_is_deleted(s3):
    found = P.preflight(s3_run(), "s3://data/runs/tiny", machine=CPU)
    assert [(p.path, p.message) for p in found.problems] == [
        ("spec.data.sources.docs.path", "s3://data/missing/ does not exist")
    ]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data").get("Contents", [])]
    assert keys == ["web/part-0.jsonl"]  # the checkpoint root's probe was written and deleted


def test_s3_without_credentials_is_refused_naming_every_field(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    [problem] = P.preflight(s3_run(), "s3://data/runs/tiny", machine=CPU).problems
    assert "no AWS credentials were found" in problem.message
    for field in ("spec.data.sources.docs.path", "spec.data.sources.code.path", "spec.checkpoint.path"):
        assert field in problem.path
    assert "AWS_ACCESS_KEY_ID" in (problem.fix or "")
