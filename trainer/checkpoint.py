"""Checkpoints: torch.distributed.checkpoint (DCP) through fsspec, committed atomically (docs/architecture.md).

Layout under the manager's URL (local path, PVC, ``memory://``, ``s3://``, ``gs://``)::

    step-00000123/
        __0_0.distcp, __1_0.distcp, .metadata   DCP shards + index (model and optimizer, any sharding)
        meta.json                                global state: tokens, phase, loader state, RNG, ... (rank 0)
        COMMITTED                                written LAST; its presence is what makes the folder a checkpoint;
                                                 it records every file's sha256 and size (checkpoint_checksums.py)

A crash at any point before ``COMMITTED`` exists leaves a folder that :meth:`CheckpointManager.committed`
ignores, so a run always resumes from a complete checkpoint. An async save (:meth:`CheckpointManager.save_async`)
copies the state to (pinned) host memory, returns, and writes and commits it in a background thread
(checkpoint_async.py); the marker still comes last. Loading goes through DCP's resharding, so the world size (and
the FSDP sharding) may differ between save and load.

Loading verifies the files against the marker's digests first; a damaged checkpoint raises ChecksumError, and
checkpoint_resume.py falls back to the previous one. Retention lives in checkpoint_retention.py.

This module is what a checkpoint is: its folder, ``meta.json`` and marker, saving, listing and loading.
Without an initialised process group everything runs as rank 0 of 1 (DCP's no-dist mode; barriers vanish,
checkpoint_ranks.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from stagerun.core import storage

from .checkpoint_async import AsyncSaves
from .checkpoint_checksums import ALGORITHM, ChecksumWriter, digest_of, gather_digests, verify_files
from .checkpoint_ranks import dist_on, on_rank0, rank, single_process_ok, world
from .checkpoint_retention import apply_retention, disk_full_error, is_disk_full
from .compat import FsspecReader

__all__ = ["CheckpointInfo", "CheckpointManager", "ModelOptimizerState", "MARKER", "META"]

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")  # also checkpoint_retention.py's


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    tokens: int
    phase_index: int
    phase_boundary: bool
    path: str  # URL of the checkpoint folder
    saved_at: str  # ISO 8601, UTC
    world_size: int = 0  # ranks that wrote it (informational: loading may use any world size)
    size_bytes: int = 0  # all files of the checkpoint, as measured when it was committed


# ---------------------------------------------------------------------------------------------------- state


class ModelOptimizerState(Stateful):
    """Model + optimizer as one DCP ``Stateful``.

    ``get_state_dict``/``set_state_dict`` produce FQN-keyed state whose tensors are DTensors under FSDP2; DCP
    records each shard's global offsets, which is what lets a checkpoint written by N ranks load into M ranks.
    """

    def __init__(self, model: Any, optimizer: Any | None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
            return
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


# ---------------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves, lists, loads and prunes checkpoints under one URL. ``save``/``load`` are collective."""

    def __init__(self, url: str | os.PathLike, keep: int, *, storage_options: dict[str, Any] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep} for {url}: must be >= 1 (the newest checkpoint is always kept)")
        self.keep = keep
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.resolve(url, self.storage_options)
        self.url = storage.to_url(self.fs, self.root)
        self.last_save_seconds: float | None = None  # from the call to the commit marker
        self.last_stall_seconds: float | None = None  # how long the call blocked its caller (async: the staging)
        self.last_save_bytes: int | None = None  # the whole folder (all ranks' shards), measured by rank 0
        self.last_load_seconds: float | None = None
        # Called as hook(step) on every rank once its part of a save is written, before the commit marker (rank 0:
        # after meta.json too). Tests install faults here to reproduce "a pod died mid-save".
        self.before_commit: list[Callable[[int], None]] = []
        self._async = AsyncSaves()  # the async save in flight, if any, and what async saves reuse
        # Kept by retention whatever ``keep`` says: the newest checkpoint a gang resumed and stepped from
        # (checkpoint_resume.py sets it).
        self.protected_steps: set[int] = set()

    def _folder(self, step: int) -> str:
        return storage.join(self.root, f"step-{step:08d}")

    def _writer(self, folder: str) -> ChecksumWriter:
        # overwrite=False: _begin() emptied the folder, so an existing .metadata would mean a concurrent writer.
        return ChecksumWriter(storage.to_url(self.fs, folder), overwrite=False, **self.storage_options)

    # ---- listing

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first. Folders without a marker are invisible here."""
        infos = []
        for name in storage.list_subdirs(self.fs, self.root):
            m = _STEP_DIR.match(name)
            if m is None:
                continue
            folder = storage.join(self.root, name)
            try:
                marker = storage.read_json(self.fs, storage.join(folder, MARKER))
            except FileNotFoundError:
                continue
            infos.append(self._info(folder, int(m.group(1)), marker))
        return sorted(infos, key=lambda i: i.step)

    def latest(self) -> CheckpointInfo | None:
        infos = self.committed()
        return infos[-1] if infos else None

    def _info(self, folder: str, step: int, marker: dict[str, Any]) -> CheckpointInfo:
        url = storage.to_url(self.fs, folder)
        try:
            info = CheckpointInfo(
                step=int(marker["step"]),
                tokens=int(marker["tokens"]),
                phase_index=int(marker["phaseIndex"]),
                phase_boundary=bool(marker["phaseBoundary"]),
                path=url,
                saved_at=str(marker["savedAt"]),
                world_size=int(marker.get("worldSize", 0)),
                size_bytes=int(marker.get("bytes", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{url}/{MARKER} is malformed ({type(e).__name__}: {e}); delete that folder to fall back to the "
                "previous checkpoint"
            ) from e
        if info.step != step:
            raise ValueError(
                f"{url}/{MARKER} says step {info.step} but the folder name says step {step}; the folder was "
                "renamed or copied by hand - restore its name or delete it"
            )
        return info

    # ---- save

    def save(
        self, step: int, app_state: dict[str, Any], meta: dict[str, Any], *, phase_boundary: bool
    ) -> CheckpointInfo:
        """Write checkpoint ``step`` (collective) and return its info on every rank.

        ``meta`` must be JSON-serialisable and hold ``tokens`` and ``phase_index``; rank 0's copy is stored (with
        ``step`` added) and is what :meth:`load` returns. ``app_state`` is DCP's: values may be ``Stateful``.
        """
        start = time.perf_counter()
        self.wait()  # an async save still in flight commits (or fails) first: one save at a time
        meta_bytes, folder = self._begin(step, meta)
        writer = self._writer(folder)
        with self._disk_full_explained(step), single_process_ok():  # collective; ends with .metadata
            dcp.save(app_state, storage_writer=writer, no_dist=not dist_on())
            info = self._commit(step, folder, meta, meta_bytes, phase_boundary, None, writer)
        self.last_save_seconds = self.last_stall_seconds = time.perf_counter() - start
        self._log_commit(info)
        return info

    def save_async(
        self, step: int, app_state: dict[str, Any], meta: dict[str, Any], *, phase_boundary: bool, pinned: bool
    ) -> CheckpointInfo | None:
        """Start checkpoint ``step`` (collective) and return once the state is copied to host memory (``pinned``:
        page-locked, for GPU state); the files and the commit marker are written in the background
        (checkpoint_async.py).

        Waits for the previous async save first (at most one in flight) and returns that one's info when it was
        still pending (else None). :meth:`poll` / :meth:`wait` hand back this save's info once it is committed.
        """
        start = time.perf_counter()
        previous = self.wait()
        meta_bytes, folder = self._begin(step, meta)
        writer = self._writer(folder)

        def commit(group: dist.ProcessGroup | None) -> CheckpointInfo:  # in the background thread
            info = self._commit(step, folder, meta, meta_bytes, phase_boundary, group, writer)
            self.last_save_seconds = time.perf_counter() - start
            return info

        self._async.start(step, app_state, writer, pinned=pinned, commit=commit)
        self.last_stall_seconds = time.perf_counter() - start
        return previous

    def poll(self) -> CheckpointInfo | None:
        """The in-flight async save's info if it has committed since the last call (raising its error if it
        failed); None while it is still being written, or when there is none. Never blocks."""
        with self._disk_full_explained(self._async.step):
            return self._logged(self._async.poll())

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the in-flight async save is committed and return its info (None when there is none).

        With ``timeout`` (seconds) it gives up after that long: the save is abandoned (it writes no marker, so
        it is never loaded) and TimeoutError is raised. A failed save raises its error here, once."""
        with self._disk_full_explained(self._async.step):
            return self._logged(self._async.wait(timeout))

    def _begin(self, step: int, meta: dict[str, Any]) -> tuple[bytes, str]:
        """Validate ``meta`` and prepare an empty folder for ``step`` (collective); returns meta.json's bytes."""
        for key in ("tokens", "phase_index"):
            if key not in meta:
                raise ValueError(f"checkpoint meta for step {step} lacks {key!r}: add it to the dict passed to save()")
        if meta.get("step", step) != step:
            raise ValueError(f"checkpoint meta has step={meta['step']} but save() was called with step={step}")
        try:  # before any collective or write, so a bad meta costs nothing and leaves nothing behind
            meta_bytes = json.dumps({**meta, "step": step}, indent=1).encode()  # key order kept: it can carry meaning
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"checkpoint meta for step {step} is not JSON-serialisable ({e}); convert tensors/numpy values "
                "with .tolist() / int() / float() before passing them to save()"
            ) from e
        folder = self._folder(step)
        url = storage.to_url(self.fs, folder)

        def prepare() -> None:
            self.fs.invalidate_cache(folder)
            if self.fs.exists(storage.join(folder, MARKER)):
                raise FileExistsError(
                    f"checkpoint {url} is already committed; refusing to overwrite it. Resume from it, or delete "
                    "the folder by hand if it is really unwanted"
                )
            if self.fs.exists(folder):  # leftover of a crashed save: its files must not mix with the new ones
                log.warning("removing uncommitted leftover %s before saving step %d", url, step)
                self.fs.rm(folder, recursive=True)
            self.fs.makedirs(folder, exist_ok=True)

        on_rank0(prepare)
        return meta_bytes, folder

    def _commit(
        self,
        step: int,
        folder: str,
        meta: dict[str, Any],
        meta_bytes: bytes,
        phase_boundary: bool,
        group: dist.ProcessGroup | None,
        writer: ChecksumWriter,
    ) -> CheckpointInfo:
        """After DCP's save returned on this rank: hooks, then rank 0 writes meta.json and the marker (collective).

        The marker records every file's digest, as each rank computed it while writing (checkpoint_checksums.py)."""
        files = gather_digests(writer.digests, group)

        def commit() -> tuple[dict[str, Any], int]:
            self.fs.pipe_file(storage.join(folder, META), meta_bytes)
            self._before_commit(step)
            if self._async.abandoned:
                raise RuntimeError(f"checkpoint step {step} abandoned (the run is ending): no commit marker written")
            nbytes = storage.folder_bytes(self.fs, folder)
            marker = {
                "step": step,
                "tokens": int(meta["tokens"]),
                "phaseIndex": int(meta["phase_index"]),
                "phaseBoundary": bool(phase_boundary),
                "savedAt": datetime.now(UTC).isoformat(timespec="seconds"),
                "worldSize": world(),
                "bytes": nbytes,
                "checksum": ALGORITHM,
                "files": {**files, META: digest_of(meta_bytes)},
            }
            storage.write_bytes_atomic(self.fs, storage.join(folder, MARKER), json.dumps(marker, indent=1).encode())
            return marker, nbytes

        if rank() != 0:
            self._before_commit(step)
        marker, nbytes = on_rank0(commit, group)
        self.last_save_bytes = nbytes
        return self._info(folder, step, marker)

    def _logged(self, info: CheckpointInfo | None) -> CheckpointInfo | None:
        if info is not None:
            self._log_commit(info)
        return info

    def _log_commit(self, info: CheckpointInfo) -> None:
        log.info(
            "checkpoint %s committed: %.1f MB in %.2f s (training waited %.2f s)",
            info.path,
            info.size_bytes / 1e6,
            self.last_save_seconds or 0.0,
            self.last_stall_seconds or 0.0,
        )

    def _before_commit(self, step: int) -> None:
        for hook in self.before_commit:
            hook(step)

    # ---- load

    def load(
        self,
        info: CheckpointInfo,
        app_state: dict[str, Any],
        *,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Load ``info`` into ``app_state`` (collective; reshards to the current world) and return its meta.

        ``check_meta`` sees the meta before any tensor is read, so an incompatible checkpoint (another model) is
        refused with the caller's message instead of a shape error from deep inside DCP."""
        start = time.perf_counter()
        folder = self._folder(info.step)
        url = storage.to_url(self.fs, folder)
        try:
            marker = storage.read_json(self.fs, storage.join(folder, MARKER))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{url} has no {MARKER} marker: it is not a committed checkpoint (a crashed save?). "
                "Load one from CheckpointManager.committed() instead"
            ) from None
        disk = self._info(folder, info.step, marker)
        try:
            meta = storage.read_json(self.fs, storage.join(folder, META))
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} is committed but lacks {META}; the folder is damaged - delete it") from None
        expected = {"step": disk.step, "tokens": disk.tokens, "phase_index": disk.phase_index}
        found = {k: meta.get(k) for k in expected}
        if found != expected or (info.step, info.tokens) != (disk.step, disk.tokens):
            raise ValueError(
                f"checkpoint {url}: {META} says {found} but {MARKER} says {expected} (caller expected step "
                f"{info.step}, tokens {info.tokens}); the folder mixes two saves - delete it to fall back to "
                "the previous checkpoint"
            )
        if check_meta is not None:
            check_meta(meta)
        files = marker.get("files")
        if files:  # before any tensor is read: a damaged file is named instead of loading garbage
            verify_files(self.fs, folder, files)
        else:
            log.warning("checkpoint %s predates checksums (no file digests in its %s): loaded unverified", url, MARKER)
        with single_process_ok():
            dcp.load(app_state, storage_reader=FsspecReader(url, **self.storage_options), no_dist=not dist_on())
        self.last_load_seconds = time.perf_counter() - start
        log.info(
            "checkpoint %s loaded in %.2f s (saved by %d ranks, loaded by %d)",
            url,
            self.last_load_seconds,
            disk.world_size,
            world(),
        )
        return meta

    # ---- retention

    def apply_retention(self) -> list[str]:
        """Delete what retention no longer needs (rank 0 only; [] elsewhere); see checkpoint_retention.py.

        :attr:`protected_steps` are kept whatever ``keep`` says."""
        return apply_retention(self, self.protected_steps)

    # ---- disk full

    @contextlib.contextmanager
    def _disk_full_explained(self, step: int | None) -> Iterator[None]:
        """A save that fails for lack of space says how much is needed (checkpoint_retention.py)."""
        try:
            yield
        except BaseException as e:  # DCP's CheckpointException (how a rank's failed write arrives) is no Exception
            if is_disk_full(e):
                raise disk_full_error(self, step) from e
            raise
