"""The init process of one container run by the process kubelet: stands in for the container's PID namespace.

A container runtime gives every container its own PID namespace: SIGTERM goes to the container's main process only
(PID 1), and when PID 1 dies the kernel kills everything else in the namespace. Local processes have no such
boundary: torchrun starts its workers in sessions of their own, so neither a process group nor a session holds a
container's processes, and a killed agent would leave its workers training. This script restores the boundary
without privileges: run as

    python container_init.py --pid-file FILE -- COMMAND [ARG...]

it makes itself a child subreaper (every orphan of the container is re-parented to it, so all of the container's
processes stay in its subtree), starts COMMAND, writes COMMAND's pid to FILE, forwards SIGTERM and SIGINT to COMMAND
alone, and when COMMAND exits kills whatever COMMAND left behind and exits with COMMAND's status (128 + signal when a
signal ended it, as runtimes report). If the kubelet's thread that started it dies, the kernel sends SIGUSR1 (its
parent-death signal) and it kills the whole container.

`descendants` and `kill_tree` are imported by the kubelet to kill a container outright (SIGKILL of every process in
the subtree), as a runtime does at the end of a grace period or on a force deletion.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (a process whose stat vanishes while read has exited: skipped)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may itself contain spaces or parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, parent = fields[0], int(fields[1])
        if state != "Z":  # a zombie is dead already: only its parent's wait remains
            children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first, then theirs)."""
    children, found, queue = _children_map(), [], [pid]
    while queue:
        for child in children.get(queue.pop(0), ()):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(pid: int, *, include_root: bool = True, rounds: int = 50) -> None:
    """SIGKILL everything below `pid` (repeated until nothing is left: a process may fork while we look), then `pid`."""
    for _ in range(rounds):
        below = descendants(pid)
        if not below:
            break
        for child in below:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    if include_root:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def _reap_all() -> None:
    """Wait for every child left (all were just sent SIGKILL, so this ends at once)."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--pid-file" or argv[2] != "--":
        print("usage: container_init.py --pid-file FILE -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    pid_file, command = Path(argv[1]), argv[3:]
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1)
    main_pid: int | None = None
    pending: list[int] = []  # signals that arrived before COMMAND was started

    def forward(signum: int, _frame) -> None:
        if main_pid is None:
            pending.append(signum)
        else:
            try:
                os.kill(main_pid, signum)
            except ProcessLookupError:
                pass

    def parent_died(_signum: int, _frame) -> None:
        kill_tree(os.getpid(), include_root=False)
        os._exit(128 + signal.SIGKILL)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGUSR1, parent_died)
    if os.getppid() != parent:  # the kubelet died before the death signal was armed
        return 128 + signal.SIGKILL
    try:
        main_pid = os.posix_spawnp(command[0], command, os.environ)
    except OSError as exc:  # what a runtime reports as StartError (exit code 128)
        print(f"container_init: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 128
    temporary = pid_file.with_name(pid_file.name + ".tmp")
    temporary.write_text(str(main_pid))
    os.replace(temporary, pid_file)  # the kubelet never reads half a pid
    for signum in pending:
        os.kill(main_pid, signum)
    while True:
        pid, wait_status = os.wait()  # reaps orphans of the container too (we are their subreaper)
        if pid == main_pid:
            code = _exit_code(wait_status)
            kill_tree(os.getpid(), include_root=False)  # PID 1 is gone: the kernel would kill the rest
            _reap_all()
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
