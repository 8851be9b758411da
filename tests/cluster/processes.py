"""Child processes of the test control plane: started with a log file, stopped SIGTERM-then-SIGKILL, never orphaned."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec should only make the call


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # If pytest itself is killed (timeout, Ctrl-C twice, OOM), the kernel kills the servers too: no etcd or
    # apiserver outlives the session holding its ports and tmp dir.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held open together, so the `count` differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Process:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent,
            )

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])

    def check_running(self) -> None:
        if not self.running:
            raise RuntimeError(
                f"{self.name} exited with status {self.popen.returncode}; the end of {self.log}:\n{self.log_tail()}"
            )


def stop_all(processes: list[Process], grace_s: float = 10.0) -> None:
    """SIGTERM every process still running, SIGKILL those that outlive the grace, and reap them all."""
    for proc in processes:
        if proc.running:
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain `text` (a tmp dir only this session uses).

    The leftover check after teardown: it also catches anything a component might have spawned itself.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue  # exited while we looked
        if text in cmdline and "zombie" not in state:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def listening_addresses(pid: int) -> set[str]:
    """The local IP addresses of the TCP sockets process `pid` listens on (IPv4 and IPv6), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                addresses.add(_proc_net_ip(local.split(":")[0], width))
    return addresses


def _proc_net_ip(hex_ip: str, width: int) -> str:
    """/proc/net/tcp{,6} print addresses as native-endian (little-endian here) 32-bit words in hex."""
    raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, width, 8))
    return str(ipaddress.ip_address(raw))
