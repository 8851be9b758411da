"""The output folder of ``stagerun tokenize`` (local or behind fsspec), into which units are committed one by one.

A unit's shard files are moved (local) or uploaded (fsspec URL) into the folder, and only then is its marker
``.stagerun-tokenize/units/<key>.json`` written: a unit counts as done only once its marker is there and its files
have the sizes the marker states. The manifest is written last, by ``finish``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stagerun.core import storage

from .readers import DataError, InputFile
from .shards import MANIFEST
from .tokenize_units import Unit

WORK_DIR = ".stagerun-tokenize"
UNITS_DIR = f"{WORK_DIR}/units"
STAGING_DIR = f"{WORK_DIR}/staging"
SHARD_NAME = re.compile(r"^shard-[0-9a-f]{16}-\d{3}\.(bin|idx)$")
# Filesystems whose contents live in one process: workers in other processes cannot see them.
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})


class OutputFolder:
    """The output folder, local or behind fsspec; units are committed into it one by one."""

    def __init__(self, url: str):
        self.url = str(url)
        self.remote = storage.is_url(self.url)
        if self.remote:
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")
            self.local: Path | None = None
        else:
            self.fs, self.root = None, None
            self.local = Path(self.url.removeprefix("file://"))

    @property
    def folder(self) -> Path:
        """The local output folder (a remote output has none: its files go through ``fs``)."""
        if self.local is None:
            raise RuntimeError(f"{self.url} is not a local folder")
        return self.local

    def check(self) -> None:
        """A DataError if the folder cannot be one: an existing file, or below one."""
        if self.remote:
            if self.fs.isfile(self.root):
                raise DataError(f"--out {self.url} is a file, not a folder: name a folder (new, or an earlier run's)")
            return
        path = self.folder
        if path.exists() and not path.is_dir():
            raise DataError(f"--out {self.url} is a file, not a folder: name a folder (new, or an earlier run's)")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DataError(f"--out {self.url}: {parent} is a file, so no folder can be made there")
                break

    def check_apart(self, inputs: Sequence[str], files: Sequence[InputFile]) -> None:
        """A DataError if an input lies in the (local) output folder or the folder in an input folder: a rerun
        would read the shards as text."""
        if self.remote:
            return
        out = os.path.realpath(self.folder)
        for pattern in inputs:
            if not storage.is_url(pattern) and os.path.isdir(pattern):
                folder = os.path.realpath(pattern)
                if out == folder or out.startswith(folder.rstrip(os.sep) + os.sep):
                    raise DataError(
                        f"--out {self.url} is inside the input {pattern}: a rerun would read the shards as text; "
                        f"put the output elsewhere"
                    )
        for file in files:
            if not storage.is_url(file.url) and os.path.realpath(file.url).startswith(out.rstrip(os.sep) + os.sep):
                raise DataError(
                    f"{file.shown} is inside --out {self.url}: the output folder must hold no inputs; choose "
                    f"another --out, or move the file"
                )

    @property
    def process_local(self) -> bool:
        return self.remote and protocol_of(self.url) in PROCESS_LOCAL_PROTOCOLS

    def _refresh(self) -> None:
        if self.remote:
            self.fs.invalidate_cache()  # other processes wrote here: never trust a cached listing

    def read_manifest(self) -> dict | None:
        if self.remote:
            self._refresh()
            try:
                raw = self.fs.cat_file(f"{self.root}/{MANIFEST}")
            except FileNotFoundError:
                return None
        else:
            path = self.folder / MANIFEST
            if not path.is_file():
                return None
            raw = path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def drop_manifest(self) -> None:
        """Remove the manifest: the folder is no complete set any more (before it is made again)."""
        if self.remote:
            try:
                self.fs.rm_file(f"{self.root}/{MANIFEST}")
            except FileNotFoundError:
                pass
            self._refresh()
        else:
            (self.folder / MANIFEST).unlink(missing_ok=True)

    def sizes(self) -> dict[str, int]:
        """Size of every file directly in the folder, by name."""
        if self.remote:
            self._refresh()
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
            return {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries
                if e.get("type", "file") == "file"
            }
        if not self.folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.folder.iterdir() if p.is_file()}

    def markers(self) -> dict[str, dict]:
        """The committed units' markers, by unit key."""
        found: dict[str, dict] = {}
        if self.remote:
            self._refresh()
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/{UNITS_DIR}", detail=False)]
            except FileNotFoundError:
                names = []
            read = lambda name: self.fs.cat_file(f"{self.root}/{UNITS_DIR}/{name}")  # noqa: E731
        else:
            folder = self.folder / UNITS_DIR
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            read = lambda name: (folder / name).read_bytes()  # noqa: E731
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                marker = json.loads(read(name))
            except (OSError, ValueError):
                continue  # unreadable: the unit is simply done again
            if isinstance(marker, dict) and marker.get("key") == name[:-5]:
                found[marker["key"]] = marker
        return found

    def staging(self) -> str:
        """A local folder for units' files before they are committed (inside the output when it is local, so the
        commit is a rename on one filesystem)."""
        if self.remote:
            return tempfile.mkdtemp(prefix="stagerun-tokenize-")
        folder = self.folder / STAGING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def commit(self, staged: Path, marker: dict) -> None:
        """Move a finished unit's files into place, then write its marker (the unit counts as done only now)."""
        data = (json.dumps(marker, indent=1) + "\n").encode()
        names = [name for shard in marker["shards"] for name in (shard["tokens"], shard["index"])]
        if self.remote:
            self.fs.makedirs(f"{self.root}/{UNITS_DIR}", exist_ok=True)
            for name in names:
                self.fs.put_file(str(staged / name), f"{self.root}/{name}")
            self.fs.pipe_file(f"{self.root}/{UNITS_DIR}/{marker['key']}.json", data)
        else:
            (self.folder / UNITS_DIR).mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(staged / name, self.folder / name)
            storage.write_bytes_atomic(LocalFileSystem(), str(self.folder / UNITS_DIR / f"{marker['key']}.json"), data)
        shutil.rmtree(staged, ignore_errors=True)

    def finish(self, manifest: dict, keep: set[str]) -> None:
        """Delete shard files no unit of this plan owns, write the manifest (last), drop the work folder."""
        stale = [name for name in self.sizes() if SHARD_NAME.match(name) and name not in keep]
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        if self.remote:
            for name in stale:
                self.fs.rm_file(f"{self.root}/{name}")
            self.fs.pipe_file(f"{self.root}/{MANIFEST}", data)
            try:
                self.fs.rm(f"{self.root}/{WORK_DIR}", recursive=True)
            except FileNotFoundError:
                pass
            self._refresh()
        else:
            for name in stale:
                (self.folder / name).unlink(missing_ok=True)
            storage.write_bytes_atomic(LocalFileSystem(), str(self.folder / MANIFEST), data)
            shutil.rmtree(self.folder / WORK_DIR, ignore_errors=True)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def committed_units(output: OutputFolder, units: Sequence[Unit], itemsize: int) -> dict[str, dict]:
    """Markers of this plan's units whose files are all there with the sizes the marker states."""
    markers = output.markers()
    if not markers:
        return {}
    sizes = output.sizes()
    done = {}
    for unit in units:
        marker = markers.get(unit.key)
        if marker is None:
            continue
        try:
            # A unit committed by a version before format v2 has no hashes: it is simply tokenized again.
            intact = all(
                sizes.get(s["tokens"]) == s["numTokens"] * itemsize
                and sizes.get(s["index"]) == s["numDocuments"] * 8
                and isinstance(s.get("sha256"), str)
                and isinstance(s.get("indexSha256"), str)
                for s in marker["shards"]
            )
        except (KeyError, TypeError):
            intact = False
        if intact:
            done[unit.key] = marker
    return done
