"""`stagerun launch`: the entrypoint of every trainer pod the operator creates.

The pod's environment (``protocol.PodEnv``, set by stagerun.operator.builders) says where it sits:
``STAGERUN_NNODES`` pods of ``STAGERUN_NPROC_PER_NODE`` processes, rendezvous at ``STAGERUN_RDZV_ENDPOINT`` (pod
index 0, through the headless Service). The entrypoint prepares the data, runs torchrun with c10d rendezvous, and
when it ends writes *why* to the container's termination message (``protocol.TerminationMessage``: state complete /
relaunch / stopped / failed), which the operator reads from the pod status. Pod index 0 holds global rank 0 (see
``node_address``), so its message carries the run's state.

A failure before training is permanent (the run fails at once) only when retrying cannot help: an invalid manifest or
environment, a pre-flight problem (preflight.py: a missing path, teacher or credential, the wrong devices, a model
too big for the memory), or data the user must fix (``DataError``). Anything else while preparing data, such as a
storage timeout or a reset connection, is transient: the pod exits non-zero and the operator restarts the gang with
backoff. While training, a worker that hits a permanent failure (failure_advice.py) leaves it in its pod's
``status.json``, and every pod passes it on with ``permanent: true``, so the run fails with that reason.

The tokenizer of a run with ``tokenizer.train`` is trained once, by pod 0 of the first attempt, and published next to
the checkpoints (``<checkpoint.path>/tokenizer.json``): every other pod and every later attempt uses that file, so
tokens never change meaning between restarts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from stagerun.core.credentials import CredentialsError, write_shared_credentials
from stagerun.core.protocol import FailureReason, GangState, PodEnv, TerminationMessage
from stagerun.core.spec import SpecError, kubernetes_problems, load_run

EXIT_INVALID = 2  # the manifest, the pod's environment or the data is wrong: retrying cannot help
EXIT_TRANSIENT = 1  # preparing the data failed for a reason that may pass (storage, network)
TERMINATION_LOG = "/dev/termination-log"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_WAIT_SECONDS = 3600


def _env(name: str, env: Mapping[str, str]) -> str:
    value = env.get(name)
    if not value:
        raise KeyError(
            f"environment variable {name} is not set: this command runs inside a pod created by the "
            "stagerun operator; use `stagerun run` on a workstation"
        )
    return value


def write_termination_message(message: TerminationMessage, env: Mapping[str, str] = os.environ) -> None:
    path = Path(env.get(PodEnv.TERMINATION_LOG, TERMINATION_LOG))
    try:
        path.write_text(message.to_json())
    except OSError as exc:  # not in a pod (no /dev/termination-log): the exit code still tells success
        print(f"stagerun launch: cannot write the termination message to {path}: {exc}", file=sys.stderr)


def node_address(env: Mapping[str, str]) -> str:
    """This pod's address in the rendezvous, resolvable by its peers: ``<hostname>.<service>``.

    c10d gives rank 0 to the alphabetically first address; Indexed Job hostnames are ``<job>-<index>``, so pod 0
    (``<job>-0.<service>``) always sorts first and holds global rank 0.
    """
    return env.get(PodEnv.NODE_ADDR) or f"{socket.gethostname()}.{_env(PodEnv.SERVICE, env)}"


def torchrun_command(env: Mapping[str, str], manifest: str, run_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stagerun.trainer.torchrun",  # torch.distributed.run without its traceback for a failed worker
        f"--nnodes={_env(PodEnv.NNODES, env)}",
        f"--nproc-per-node={_env(PodEnv.NPROC_PER_NODE, env)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_env(PodEnv.RDZV_ENDPOINT, env)}",
        f"--rdzv-id={_env(PodEnv.RDZV_ID, env)}",
        f"--local-addr={node_address(env)}",
        "--max-restarts=0",
        # Pod 0 hosts the rendezvous store. Said explicitly: torchrun would otherwise decide by resolving the
        # endpoint's DNS name, which may not exist yet when pod 0 starts.
        f"--rdzv-conf=is_host={1 if env.get(PodEnv.JOB_COMPLETION_INDEX, '0') == '0' else 0}",
        "-m",
        "stagerun.trainer",
        "--manifest",
        manifest,
        "--run-dir",
        run_dir,
    ]


def share_tokenizer(run, run_dir: Path, index: int, prepare: Callable[[], None]) -> None:
    """Make ``run_dir/tokenizer.json`` the run's one tokenizer (see the module docstring), then prepare the data."""
    if run.tokenizer.train is None:
        prepare()
        return
    import fsspec

    shared = f"{run.checkpoint.path.rstrip('/')}/{TOKENIZER_FILE}"
    fs, shared_path = fsspec.core.url_to_fs(shared)
    local = run_dir / TOKENIZER_FILE
    deadline = time.monotonic() + TOKENIZER_WAIT_SECONDS
    while not fs.exists(shared_path):
        if index == 0:
            prepare()  # trains run_dir/tokenizer.json
            fs.makedirs(fs._parent(shared_path), exist_ok=True)
            tmp = f"{shared_path}.tmp-{os.getpid()}"
            fs.put_file(str(local), tmp)
            fs.mv(tmp, shared_path)  # readers never see half a file
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod 0 did not publish {shared} within {TOKENIZER_WAIT_SECONDS} s")
        time.sleep(2)
        fs.invalidate_cache()
    local.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(shared_path, str(local))
    prepare()


def is_permanent(exc: BaseException) -> bool:
    """Whether a failure to prepare the data would happen again on retry: the user's input is wrong."""
    from .data import DataError

    return isinstance(exc, (SpecError, DataError))


def _preflight(run, run_dir: Path, phase, processes: int) -> str:
    """The pre-flight problems of this pod's part of the run, as one message ("" when there are none). Teachers and
    paths of every phase are checked; devices and memory only for the phase this Job was shaped for."""
    from .preflight import PreflightError, preflight

    root = run.checkpoint.path or str(run_dir / "checkpoints")  # validation requires the path on Kubernetes
    found = preflight(run, root, phases=[phase], processes=lambda phase: processes, pod=True)
    for warning in found.warnings:
        print(f"stagerun launch: warning: {warning}", file=sys.stderr)
    return str(PreflightError(found.problems, "the pre-flight checks")) if found.problems else ""


def launch(env: Mapping[str, str] = os.environ) -> int:
    try:
        manifest, run_dir = _env(PodEnv.MANIFEST, env), Path(_env(PodEnv.RUN_DIR, env))
        index = int(env.get(PodEnv.JOB_COMPLETION_INDEX, "0"))
        run = load_run(manifest)
        problems = kubernetes_problems(run.manifest)
        if problems:
            raise SpecError(problems, manifest)
        phase = run.phases[int(_env(PodEnv.PHASE_INDEX, env))]
        world = int(_env(PodEnv.NNODES, env)) * int(_env(PodEnv.NPROC_PER_NODE, env))
        if world != phase.world_size:
            raise ValueError(
                f"this pod was started for {world} processes but phase {phase.name} needs "
                f"{phase.world_size}: the Job does not match the manifest"
            )
        settings = write_shared_credentials(env)  # spec.checkpoint.credentialsSecret: keys as files, not env
        if settings:
            env = {**env, **settings}
            os.environ.update(settings)  # this process prepares the data itself
    except (SpecError, KeyError, ValueError, IndexError, CredentialsError) as exc:
        write_termination_message(TerminationMessage.failure(FailureReason.INVALID_SPEC, str(exc)), env)
        print(f"stagerun launch: {exc}", file=sys.stderr)
        return EXIT_INVALID

    refused = _preflight(run, run_dir, phase, int(_env(PodEnv.NPROC_PER_NODE, env)))
    if refused:
        write_termination_message(TerminationMessage.failure(FailureReason.PREFLIGHT_FAILED, refused), env)
        print(f"stagerun launch: {refused}", file=sys.stderr)
        return EXIT_INVALID

    from .runner import prepare

    run_dir.mkdir(parents=True, exist_ok=True)
    sample = env.get(PodEnv.MAX_SOURCE_BYTES)  # smoke runs: tokenize a sample of each source
    try:
        share_tokenizer(run, run_dir, index, lambda: prepare(run, run_dir, int(sample) if sample else None))
    except Exception as exc:
        permanent = is_permanent(exc)
        reason = FailureReason.DATA_PREPARATION_FAILED if permanent else FailureReason.DATA_PREPARATION_ERROR
        write_termination_message(
            TerminationMessage.failure(reason, f"{type(exc).__name__}: {exc}", permanent=permanent), env
        )
        retry = "fix the data" if permanent else "the gang will be restarted"
        print(f"stagerun launch: data preparation failed ({retry}): {exc}", file=sys.stderr)
        return EXIT_INVALID if permanent else EXIT_TRANSIENT

    child_env = dict(env)
    # Give the trainer the pod's grace period to commit its checkpoint after SIGTERM (torchrun's default is 30 s).
    child_env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(env.get(PodEnv.SHUTDOWN_SECONDS, "540"))))
    from .telemetry import read_status

    process = subprocess.Popen(torchrun_command(env, manifest, str(run_dir)), env=child_env)
    signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    code = process.wait()

    status = read_status(run_dir)
    if status is not None and status.state == GangState.FAILED:  # any pod: a rerun fails the same way
        write_termination_message(TerminationMessage.from_status(status, exit_code=code), env)
        print(f"stagerun launch: the run cannot continue ({status.reason}): {status.message}", file=sys.stderr)
        return code or EXIT_INVALID
    status = status if index == 0 else None
    if status is not None and (code == 0 or status.state == GangState.STOPPED):
        write_termination_message(TerminationMessage.from_status(status), env)
        return 0
    write_termination_message(TerminationMessage(GangState.FAILED if code else GangState.DONE, exit_code=code), env)
    return code
