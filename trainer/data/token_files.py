"""The token files of a shard set, local (memory-mapped, opened on first use) or remote (read in place by byte
range, ``remote_io``): ``gather`` returns the tokens at given positions of one shard, ``gather_many`` those of
several shards at once (a remote set fetches them in one request batch); ``chunks`` streams a file's bytes for
hashing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .remote_io import RemoteFiles

MAX_OPEN_SHARDS = 256  # memory maps held open at once (each holds a file descriptor)
HASH_BLOCK = 8 << 20


class LocalTokens:
    def __init__(self, folder: Path, manifest: dict, dtype: np.dtype):
        self.folder, self.dtype = folder, dtype
        self._shards = manifest["shards"]
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def _tokens(self, shard: int) -> np.ndarray:
        tokens = self._open.get(shard)
        if tokens is None:
            entry = self._shards[shard]
            path, count = self.folder / entry["tokens"], entry["numTokens"]
            tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(count,)) if count else np.zeros(0, self.dtype)
            self._open[shard] = tokens
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return tokens

    def gather(self, shard: int, positions: np.ndarray) -> np.ndarray:
        return self._tokens(shard)[positions]

    def gather_many(self, groups: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        return [self.gather(shard, positions) for shard, positions in groups]

    def spans(self, pieces: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """The tokens [start, stop) of shard ``shard`` for each (shard, start, stop) of ``pieces``."""
        return [np.array(self._tokens(shard)[start:stop]) for shard, start, stop in pieces]

    def chunks(self, name: str) -> Iterator[bytes]:
        with open(self.folder / name, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                yield block


class RemoteTokens:
    def __init__(self, files: RemoteFiles, manifest: dict, dtype: np.dtype):
        self.files, self.dtype = files, dtype
        self._shards = manifest["shards"]

    def gather(self, shard: int, positions: np.ndarray) -> np.ndarray:
        return self.gather_many([(shard, positions)])[0]

    def gather_many(self, groups: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Only the runs of consecutive positions are fetched (a packed sequence is a few runs inside documents),
        every shard's in one request batch (``RemoteFiles.read_many`` coalesces them per file)."""
        size = self.dtype.itemsize
        parts, inverses = [], []
        for shard, positions in groups:
            unique, inverse = np.unique(positions, return_inverse=True)
            breaks = np.flatnonzero(np.diff(unique) != 1) + 1
            firsts = unique[np.concatenate([[0], breaks])] if len(unique) else unique
            lasts = unique[np.concatenate([breaks - 1, [len(unique) - 1]])] + 1 if len(unique) else unique
            parts.append((self._shards[shard]["tokens"], (firsts * size).tolist(), (lasts * size).tolist()))
            inverses.append(inverse.reshape(-1))
        return [
            np.frombuffer(b"".join(data), dtype=self.dtype)[inverse]
            for data, inverse in zip(self.files.read_many(parts), inverses)
        ]

    def spans(self, pieces: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """The tokens [start, stop) of shard ``shard`` for each (shard, start, stop): whole ranges, one batch."""
        size = self.dtype.itemsize
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _, _) in enumerate(pieces):
            by_shard.setdefault(shard, []).append(i)
        parts = [
            (self._shards[shard]["tokens"], [pieces[i][1] * size for i in at], [pieces[i][2] * size for i in at])
            for shard, at in by_shard.items()
        ]
        out: list[np.ndarray] = [np.zeros(0, self.dtype)] * len(pieces)
        for at, data in zip(by_shard.values(), self.files.read_many(parts)):
            for i, raw in zip(at, data):
                out[i] = np.frombuffer(raw, dtype=self.dtype)
        return out

    def chunks(self, name: str) -> Iterator[bytes]:
        size = self.files.sizes[name]
        for start in range(0, size, HASH_BLOCK):
            yield self.files.fetch([name], [start], [min(size, start + HASH_BLOCK)])[0]
