"""One gang per run: an exclusive lock on the run's checkpoint root, taken before anything is prepared or started.

- **Local roots** (a path, a PVC mount): ``fcntl.flock`` on ``<root>/.stagerun.lock``, which also holds the
  holder (pid, host, start time, command). The kernel drops the lock when the last process holding the open file
  ends, so a killed holder never leaves it stale; `stagerun run` passes the descriptor to torchrun, so the lock
  lasts as long as the gang, not just the parent. (On NFS, flock depends on the server's lock support.)
- **Remote roots** (``s3://``, ``gs://``, ...): a lease object ``<root>/LEASE.json`` with an owner id and an expiry,
  renewed every ``ttl / 3`` by a thread of its holder (the `stagerun run` process, or rank 0 in an operator pod),
  deleted on release, and taken over only once expired. Object stores without conditional writes cannot make
  this atomic: two runs that both find no live lease within the same second may both write theirs; each reads
  the lease back after :data:`SETTLE_SECONDS`, and the one whose write did not survive gives up, so the window is
  two writes landing within that settle time. A holder that stops renewing (killed -9) blocks a new run for at
  most ``ttl`` seconds; a stale lease can also be deleted by hand once its holder is known to be gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from stagerun.core import storage

__all__ = ["LOCK_FILE", "LEASE_FILE", "HELD_ENV", "RunLock", "RunLocked", "acquire"]

log = logging.getLogger(__name__)

LOCK_FILE = ".stagerun.lock"
LEASE_FILE = "LEASE.json"
HELD_ENV = "STAGERUN_RUN_LOCK"  # set for the workers of a gang whose parent holds the lock
LEASE_TTL_SECONDS = 60.0
SETTLE_SECONDS = 1.0


class RunLocked(RuntimeError):
    """Another process holds the run's lock."""


def _holder() -> dict[str, Any]:
    return {
        "owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: {holder.get('command')})"
    )


class RunLock:
    """A held lock; :meth:`release` it (or let the process end: a flock goes with the process, a lease expires)."""

    def __init__(self, url: str, holder: dict[str, Any], fd: int | None = None) -> None:
        self.url, self.holder, self.fd = url, holder, fd
        self.lost = threading.Event()  # a lease another run took over (this one failed to renew in time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fs: Any = None
        self._path = ""

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closes this process's descriptor; inherited copies keep the lock until they end
            self.fd = None
        elif self._fs is not None and not self.lost.is_set():
            with contextlib.suppress(Exception):
                if _read_lease(self._fs, self._path).get("owner") == self.holder["owner"]:
                    self._fs.rm_file(self._path)

    # ---- remote lease

    def _start_renewing(self, fs: Any, path: str, ttl: float, on_lost: Callable[[], None] | None) -> None:
        self._fs, self._path = fs, path

        def renew() -> None:
            while not self._stop.wait(ttl / 3):
                try:
                    current = _read_lease(fs, path)
                    if current.get("owner") != self.holder["owner"]:
                        log.error("run lock %s was taken over by %s: stopping this gang", self.url, _describe(current))
                        self.lost.set()
                        if on_lost:
                            on_lost()
                        return
                    _write_lease(fs, path, self.holder, ttl)
                except Exception as e:  # noqa: BLE001 - storage trouble: try again; the lease is still valid for a while
                    log.warning("renewing run lock %s failed: %s", self.url, e)

        self._thread = threading.Thread(target=renew, name="run-lock-renewal", daemon=True)
        self._thread.start()


def _read_lease(fs: Any, path: str) -> dict[str, Any]:
    fs.invalidate_cache(path)
    try:
        return storage.read_json(fs, path)
    except FileNotFoundError:
        return {}


def _write_lease(fs: Any, path: str, holder: dict[str, Any], ttl: float) -> None:
    now = time.time()
    record = {**holder, "renewedAt": now, "expiresAt": now + ttl}
    fs.pipe_file(path, json.dumps(record, indent=1).encode())


def acquire(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    ttl: float = LEASE_TTL_SECONDS,
    wait_seconds: float = 0.0,
    on_lost: Callable[[], None] | None = None,
) -> RunLock:
    """Take the run lock of checkpoint root ``url`` or raise RunLocked naming the holder and the fix.

    ``wait_seconds``: keep trying that long (an operator pod waiting for a dead attempt's lease to expire)."""
    fs, root = storage.resolve(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return _acquire_local(url, root) if storage.is_local(fs) else _acquire_lease(url, fs, root, ttl, on_lost)
        except RunLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def _acquire_local(url: str, root: str) -> RunLock:
    path = os.path.join(root, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            with open(path) as f:
                holder = json.loads(f.read() or "null")
        except (OSError, ValueError):
            holder = None
        os.close(fd)
        raise RunLocked(
            f"run {url} is locked by {_describe(holder)}: another gang trains it. Wait for it to finish or stop it "
            f"(kill {holder.get('pid') if holder else '<pid>'}); the lock ({path}) goes away with its process"
        ) from None
    holder = _holder()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return RunLock(url, holder, fd)


def _acquire_lease(url: str, fs: Any, root: str, ttl: float, on_lost: Callable[[], None] | None) -> RunLock:
    path = storage.join(root, LEASE_FILE)
    holder = _holder()
    current = _read_lease(fs, path)
    if current and float(current.get("expiresAt", 0)) > time.time():
        raise _locked_by_lease(url, storage.to_url(fs, path), current)
    _write_lease(fs, path, holder, ttl)
    time.sleep(SETTLE_SECONDS)  # a concurrent writer's lease lands by now: the last write wins, the other yields
    current = _read_lease(fs, path)
    if current.get("owner") != holder["owner"]:
        raise _locked_by_lease(url, storage.to_url(fs, path), current)
    lock = RunLock(url, holder)
    lock._start_renewing(fs, path, ttl, on_lost)
    return lock


def _locked_by_lease(url: str, path: str, lease: dict[str, Any]) -> RunLocked:
    left = max(0.0, float(lease.get("expiresAt", 0)) - time.time())
    return RunLocked(
        f"run {url} is locked by {_describe(lease)}: its lease {path} is renewed until "
        f"{left:.0f} s from now. Wait for that run to finish or stop it; if it is gone (killed), the lease "
        f"expires within {left:.0f} s, or delete the lease object by hand once you are sure"
    )
