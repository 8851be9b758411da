"""Async checkpoint saves: copy the state to host memory, then write and commit it in a background thread.

Why: a synchronous save blocks training for the whole upload; an async one blocks it only while the state is
staged (copied to page-locked memory for GPU state), which is what :attr:`CheckpointManager.last_stall_seconds`
measures. This module owns that machinery: DCP's ``async_save`` with its reusable stager (compat.py), the gloo
group the background collectives run on, the thread that waits for every rank's upload and then commits, the
in-flight future that hands the result (or the error) back to the training thread, and abandoning a save that
must not commit. What a checkpoint is (its folder, ``meta.json``, the commit marker) stays in checkpoint.py: the
manager hands in the writer and the ``commit`` to run, so the marker is still written last, after DCP has gathered
every rank's write results and written ``.metadata``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint_ranks import dist_on, single_process_ok
from .compat import FsspecWriter, checkpoint_stager

if TYPE_CHECKING:
    from .checkpoint import CheckpointInfo

__all__ = ["AsyncSaves"]


class AsyncSaves:
    """The async saves of one :class:`~stagerun.trainer.checkpoint.CheckpointManager`: at most one in flight."""

    def __init__(self) -> None:
        self._in_flight: Future[CheckpointInfo] | None = None  # the async save being written, if any
        self.step: int | None = None  # its step (for error messages)
        self._abandon = threading.Event()  # set: the in-flight save must not write its marker
        self._group: dist.ProcessGroup | None = None  # gloo group of async saves' background collectives
        self._stager: Any = None  # async saves' host-memory stager, reused where torch allows (compat.py)

    @property
    def abandoned(self) -> bool:
        """Whether the save in flight was given up (:meth:`wait` timed out): its commit must write no marker."""
        return self._abandon.is_set()

    def start(
        self,
        step: int,
        app_state: dict[str, Any],
        writer: FsspecWriter,
        *,
        pinned: bool,
        commit: Callable[[dist.ProcessGroup | None], CheckpointInfo],
    ) -> None:
        """Stage ``app_state`` to host memory (collective) and return; the files are written in the background.

        Once every rank's upload is done, the background thread calls ``commit(group)`` (collective over
        ``group``); its result or error is what :meth:`poll` / :meth:`wait` hand back. The caller waits for the
        previous save first: one in flight at a time, since the stager reuses its buffers."""
        group = self._async_group()
        stager = self._stager = checkpoint_stager(pinned, self._stager)
        with single_process_ok():  # returns after staging: the upload runs in DCP's own thread
            upload = dcp.async_save(
                app_state, storage_writer=writer, async_stager=stager, process_group=group, no_dist=not dist_on()
            )
        assert isinstance(upload, Future)  # synchronous staging: no separate staging future
        self._abandon.clear()
        self.step = step
        done: Future[CheckpointInfo] = Future()

        def finish() -> None:  # the background thread: every rank's upload, then the marker
            try:
                upload.result()  # rank 0: every rank's write results were gathered and .metadata is written
                done.set_result(commit(group))
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()/poll()
                done.set_exception(e)

        # A daemon thread: a save a failing process abandons must not keep it alive in a dead collective.
        threading.Thread(target=finish, name=f"checkpoint-{step}", daemon=True).start()
        self._in_flight = done

    def poll(self) -> CheckpointInfo | None:
        """The in-flight save's info if it has committed (raising its error if it failed); None while it is still
        being written, or when there is none. Never blocks."""
        if self._in_flight is None or not self._in_flight.done():
            return None
        return self.wait()

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the in-flight save is committed and return its info (None when there is none).

        With ``timeout`` (seconds) it gives up after that long: the save is abandoned (it writes no marker, so
        it is never loaded) and TimeoutError is raised. A failed save raises its error here, once."""
        done, self._in_flight = self._in_flight, None
        if done is None:
            return None
        try:
            return done.result(timeout)
        except TimeoutError:
            self._abandon.set()
            raise

    def _async_group(self) -> dist.ProcessGroup | None:
        """A gloo group for the background thread's collectives (collective on first use, like save itself).

        Its own group: the training thread keeps issuing collectives on the default group meanwhile, and DCP's
        async save needs a CPU backend, which an NCCL default group lacks."""
        if not dist_on():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group
