"""`stagerun launch`: the entrypoint of every trainer pod the operator creates.

The pod's environment (set by stagerun.operator.builders) says where it sits: ``STAGERUN_NNODES`` pods of
``STAGERUN_NPROC_PER_NODE`` processes, rendezvous at ``STAGERUN_RDZV_ENDPOINT`` (pod index 0, through the headless
Service). The entrypoint prepares the data, runs torchrun with c10d rendezvous, and when it ends writes *why* to the
container's termination message (JSON: state complete / relaunch / stopped / failed), which the operator reads from
the pod status. Pod index 0 holds global rank 0 (see ``node_address``), so its message carries the run's state.

The tokenizer of a run with ``tokenizer.train`` is trained once, by pod 0 of the first attempt, and published next to
the checkpoints (``<checkpoint.path>/tokenizer.json``): every other pod and every later attempt uses that file, so
tokens never change meaning between restarts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stagerun.core.spec import SpecError, kubernetes_problems, load_run

EXIT_INVALID = 2  # the manifest or the pod's environment is wrong: retrying cannot help
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_WAIT_SECONDS = 3600


def _env(name: str, env) -> str:
    value = env.get(name)
    if not value:
        raise KeyError(
            f"environment variable {name} is not set: this command runs inside a pod created by the "
            "stagerun operator; use `stagerun run` on a workstation"
        )
    return value


def write_termination_message(message: dict, env=os.environ) -> None:
    path = Path(env.get("STAGERUN_TERMINATION_LOG", TERMINATION_LOG))
    text = json.dumps(message, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        text = json.dumps({k: message[k] for k in ("state", "reason", "step", "tokens") if k in message})
    try:
        path.write_text(text)
    except OSError as exc:  # not in a pod (no /dev/termination-log): the exit code still tells success
        print(f"stagerun launch: cannot write the termination message to {path}: {exc}", file=sys.stderr)


def node_address(env) -> str:
    """This pod's address in the rendezvous, resolvable by its peers: ``<hostname>.<service>``.

    c10d gives rank 0 to the alphabetically first address; Indexed Job hostnames are ``<job>-<index>``, so pod 0
    (``<job>-0.<service>``) always sorts first and holds global rank 0.
    """
    return env.get("STAGERUN_NODE_ADDR") or f"{socket.gethostname()}.{_env('STAGERUN_SERVICE', env)}"


def torchrun_command(env, manifest: str, run_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={_env('STAGERUN_NNODES', env)}",
        f"--nproc-per-node={_env('STAGERUN_NPROC_PER_NODE', env)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_env('STAGERUN_RDZV_ENDPOINT', env)}",
        f"--rdzv-id={_env('STAGERUN_RDZV_ID', env)}",
        f"--local-addr={node_address(env)}",
        "--max-restarts=0",
        # Pod 0 hosts the rendezvous store. Said explicitly: torchrun would otherwise decide by resolving the
        # endpoint's DNS name, which may not exist yet when pod 0 starts.
        f"--rdzv-conf=is_host={1 if env.get('JOB_COMPLETION_INDEX', '0') == '0' else 0}",
        "-m",
        "stagerun.trainer",
        "--manifest",
        manifest,
        "--run-dir",
        run_dir,
    ]


def share_tokenizer(run, run_dir: Path, index: int, prepare) -> None:
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


def launch(env=os.environ) -> int:
    try:
        manifest, run_dir = _env("STAGERUN_MANIFEST", env), Path(_env("STAGERUN_RUN_DIR", env))
        index = int(env.get("JOB_COMPLETION_INDEX", "0"))
        run = load_run(manifest)
        problems = kubernetes_problems(run.manifest)
        if problems:
            raise SpecError(problems, manifest)
        phase = run.phases[int(_env("STAGERUN_PHASE_INDEX", env))]
        world = int(_env("STAGERUN_NNODES", env)) * int(_env("STAGERUN_NPROC_PER_NODE", env))
        if world != phase.world_size:
            raise ValueError(
                f"this pod was started for {world} processes but phase {phase.name} needs "
                f"{phase.world_size}: the Job does not match the manifest"
            )
    except (SpecError, KeyError, ValueError, IndexError) as exc:
        write_termination_message(
            {"state": "failed", "reason": "InvalidSpec", "permanent": True, "message": str(exc)[:3000]}, env
        )
        print(f"stagerun launch: {exc}", file=sys.stderr)
        return EXIT_INVALID

    from .runner import prepare

    run_dir.mkdir(parents=True, exist_ok=True)
    sample = env.get("STAGERUN_MAX_SOURCE_BYTES")  # smoke runs: tokenize a sample of each source
    try:
        share_tokenizer(run, run_dir, index, lambda: prepare(run, run_dir, int(sample) if sample else None))
    except Exception as exc:  # a bad data path is as permanent as a bad manifest
        write_termination_message(
            {
                "state": "failed",
                "reason": "DataPreparationFailed",
                "permanent": True,
                "message": f"{type(exc).__name__}: {exc}"[:3000],
            },
            env,
        )
        print(f"stagerun launch: data preparation failed: {exc}", file=sys.stderr)
        return EXIT_INVALID

    child_env = dict(env)
    # Give the trainer the pod's grace period to commit its checkpoint after SIGTERM (torchrun's default is 30 s).
    child_env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(env.get("STAGERUN_SHUTDOWN_SECONDS", "540"))))
    process = subprocess.Popen(torchrun_command(env, manifest, str(run_dir)), env=child_env)
    signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    code = process.wait()

    from .telemetry import read_status

    status = read_status(run_dir) if index == 0 else None
    if status is not None and (code == 0 or status.state == "stopped"):
        message = {
            "state": status.state,
            "step": status.step,
            "tokens": status.tokens,
            "phaseIndex": status.phase_index,
            "phase": status.phase,
            "checkpoint": status.checkpoint,
            "message": status.message,
        }
        write_termination_message(message, env)
        return 0
    write_termination_message({"state": "failed" if code else "done", "exitCode": code}, env)
    return code
