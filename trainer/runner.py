"""`stagerun run`: train a manifest on this machine with torchrun, phase by phase.

The runner validates the manifest before any process starts, prepares the tokenizer and token shards once, then
starts a torchrun gang for the phase the newest checkpoint points at. When the gang reports that the next phase
needs another topology it starts a new gang; when it was stopped (Ctrl-C, SIGTERM) it says how to resume.

One gang per run: the run lock (run_lock.py) is taken before anything is prepared, so a second `stagerun run` of
the same run fails at once naming the holder; torchrun inherits the lock and dies with this process (gang_life.py).

Before the lock, the pre-flight checks (preflight.py) look at paths, credentials, teachers, devices and memory and
report every problem at once. When a gang fails, the advice depends on why (failure_advice.py): "run the same
command again" only for what a rerun can fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from stagerun.core.plan import phase_at
from stagerun.core.protocol import GangState, PodEnv, PreparedData, RunStatus
from stagerun.core.spec import ResolvedRun

from .failure_advice import permanent_advice, rerun_advice
from .gang_life import descendants, die_with_parent, stop_tree
from .preflight import PreflightError, preflight
from .run_lock import HELD_ENV, RunLocked, acquire
from .telemetry import read_status

EXIT_STOPPED = 130  # the shell convention for "interrupted": rerun the command to resume
ABORT_WAIT_SECONDS = 30.0  # a second Ctrl-C waits this long for the workers' checkpoint, then kills them


def default_run_dir(run: ResolvedRun) -> Path:
    return Path("runs") / run.name


def prepare(run: ResolvedRun, run_dir: Path, max_source_bytes: int | None = None) -> None:
    """Tokenizer and token shards, made once per run dir; workers only open what this writes."""
    from .data.prepare import prepare_data

    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(run, run_dir, max_source_bytes=max_source_bytes)
    record = PreparedData(
        tokenizer_path=str(prepared.tokenizer_path),
        shard_dirs={k: str(v) for k, v in prepared.shard_dirs.items()},
        eos_id=prepared.eos_id,
        vocab_size=prepared.vocab_size,
    )
    (run_dir / PreparedData.FILE).write_text(record.to_json())


def torchrun_command(
    manifest: Path, run_dir: Path, nproc: int, world_override: int | None, max_restarts: int
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "stagerun.trainer.torchrun",  # torch.distributed.run without its traceback for a failed worker
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "stagerun.trainer",
        "--manifest",
        str(manifest),
        "--run-dir",
        str(run_dir),
    ]
    if world_override:
        cmd += ["--world-size", str(world_override)]
    return cmd


def worker_env(run: ResolvedRun, nproc: int, metrics_port: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if metrics_port:
        env[PodEnv.STATUS_PORT.value] = str(metrics_port)  # rank 0 serves /metrics and /progress on 127.0.0.1
    if "OMP_NUM_THREADS" not in env:
        # Share the cores between CPU workers instead of letting each one spawn a thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_local(
    run: ResolvedRun,
    manifest: Path,
    *,
    nproc: int | None,
    run_dir: Path | None,
    max_restarts: int = 0,
    max_source_bytes: int | None = None,
    metrics_port: int | None = None,
) -> int:
    from .train import checkpoint_url

    run_dir = Path(run_dir or default_run_dir(run))
    check_before_start(run, manifest, checkpoint_url(run, run_dir))
    try:  # before anything is written: a second run of the same run must not touch its files
        lock = acquire(checkpoint_url(run, run_dir), on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    except RunLocked as exc:
        print(f"{run.name}: {exc}", file=sys.stderr)
        return 1
    try:
        return _run_locked(run, manifest, lock, nproc, run_dir, max_restarts, max_source_bytes, metrics_port)
    finally:
        lock.release()


def check_before_start(run: ResolvedRun, manifest: Path, root_url: str) -> None:
    """Pre-flight (preflight.py): print the warnings, raise PreflightError listing every problem. Every phase runs
    on this machine with the whole world (``--nproc`` is already in ``phase.world_size``)."""
    field = "spec.checkpoint.path" if run.checkpoint.path else "--run-dir (spec.checkpoint.path is unset)"
    found = preflight(run, root_url, root_field=field)
    for warning in found.warnings:
        print(f"{run.name}: warning: {warning}", file=sys.stderr)
    if found.problems:
        raise PreflightError(found.problems, f"{manifest} (found before starting any worker)")


def _run_locked(run, manifest, lock, nproc, run_dir, max_restarts, max_source_bytes, metrics_port) -> int:
    from .checkpoint import CheckpointManager
    from .train import checkpoint_url

    prepare(run, run_dir, max_source_bytes)  # spec.model.init was checked by the pre-flight
    manager = CheckpointManager(checkpoint_url(run, run_dir), run.checkpoint.keep)
    while True:
        latest = manager.latest()
        tokens = latest.tokens if latest else 0
        phase = phase_at(run, tokens)
        if phase is None:
            final = latest.path if latest else "none"  # only a run without phases is complete at 0 tokens
            print(f"{run.name}: complete ({tokens:,} tokens); final checkpoint {final}")
            return 0
        world = nproc or phase.world_size
        where = f"resuming from {latest.path} (step {latest.step})" if latest else "starting from scratch"
        print(f"{run.name}: phase {phase.name}, {world} worker process(es), {where}", flush=True)
        status_file = run_dir / RunStatus.FILE
        status_file.unlink(missing_ok=True)
        env = {**worker_env(run, world, metrics_port), HELD_ENV: lock.holder["owner"]}
        code = _run_gang(torchrun_command(manifest, run_dir, world, nproc, max_restarts), env, lock.fd)
        status = read_status(run_dir)
        stopped = status is not None and status.state == GangState.STOPPED  # torchrun exits non-zero on Ctrl-C
        if status is not None and status.state == GangState.FAILED:  # rerunning cannot help: say what can
            print(permanent_advice(run.name, status), file=sys.stderr)
            return code or 1
        if status is None or (code != 0 and not stopped):
            newest = manager.latest()
            print(rerun_advice(run.name, code, newest.step if newest else None), file=sys.stderr)
            return code or 1
        if status.state == GangState.RELAUNCH:
            print(f"{run.name}: {status.message}; starting the next gang", flush=True)
            continue
        if status.state == GangState.STOPPED:
            print(
                f"{run.name}: stopped at step {status.step} with checkpoint {status.checkpoint}; "
                "run the same command again to resume"
            )
            return EXIT_STOPPED
        if status.state == GangState.COMPLETE:
            print(
                f"{run.name}: complete at step {status.step} ({status.tokens:,} tokens); "
                f"metrics in {run_dir / 'metrics.jsonl'}"
            )
            return 0
        raise RuntimeError(f"unknown run state {asdict(status)}")


def _run_gang(cmd: list[str], env: dict[str, str], lock_fd: int | None = None) -> int:
    """Run torchrun; on Ctrl-C let the workers checkpoint (they got the signal too) instead of dying with them.

    A second Ctrl-C waits (at most ABORT_WAIT_SECONDS) for the checkpoint to commit, then kills the gang and waits
    until every worker is gone: the prompt never returns while workers still write. A third kills at once.
    torchrun gets SIGTERM if this process dies (even by kill -9), and inherits the run lock's descriptor."""
    parent = os.getpid()
    process = subprocess.Popen(
        cmd,
        env=env,
        pass_fds=(lock_fd,) if lock_fd is not None else (),
        preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent),  # noqa: PLW1509 - no threads run yet here
    )
    interrupts = 0
    abort_by: float | None = None

    def on_interrupt(signum, frame):
        nonlocal interrupts, abort_by
        interrupts += 1
        if interrupts == 1:
            message = "stopping after the current step and a checkpoint (Ctrl-C again to abort)"
        elif interrupts == 2:
            abort_by = time.monotonic() + ABORT_WAIT_SECONDS
            message = f"aborting: waiting up to {ABORT_WAIT_SECONDS:.0f} s for the checkpoint (Ctrl-C to kill now)"
        else:
            abort_by = time.monotonic()
            message = "killing the workers"
        print(f"\n{message}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    previous_term = signal.signal(signal.SIGTERM, lambda s, f: process.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if abort_by is not None and time.monotonic() >= abort_by:
                    tree = descendants(process.pid)
                    left = stop_tree([process.pid, *tree])
                    process.wait()
                    if left:
                        print(f"workers {left} did not stop; kill them by hand", file=sys.stderr)
                    return process.returncode
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
