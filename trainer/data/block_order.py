"""The epoch order of a v2 set's documents: blocks of consecutive documents in a seeded order, and the documents
shuffled within windows of blocks. Why blocks: a window's tokens lie in a few large contiguous byte ranges of the
shard files, so a remote set is read in a few large requests a window ahead (``readahead.py``) instead of one
small ranged read per shuffled document, which is what bounded remote throughput (benchmarks/RESULTS.md).

Block b holds the documents that *start* in the set's global tokens [b T, (b + 1) T) (T = ``block_tokens``;
a document longer than T leaves the blocks after its own empty). Epoch e orders the blocks by a seeded bijection
P_e of [0, blocks) (``FeistelPermutation``); window w is blocks P_e(wW), ..., P_e(wW + W - 1) (W =
``window_blocks``); its documents (those blocks' documents, in that order) are visited in the order of a second
seeded bijection of [0, documents of the window), keyed by (e, w); the epoch is window 0, window 1, ...: every
document exactly once. A window's arrays (end offset and token shift per document) are built on first use and
kept for at most ``KEEP_WINDOWS`` windows, so memory is O(W T / mean document length), whatever the set's size;
the walk to a position starts from the anchor the loader state keeps (epoch, window, its start offset).

A preference set (``unit`` = 2) keeps each pair (documents 2i and 2i + 1) whole and adjacent: blocks start only at
even documents (block b holds the pairs whose first document starts in its tokens) and a window shuffles pairs, not
documents, so the chosen and the rejected response of a pair always follow one another in the epoch.

Shuffle quality: any two documents more than W blocks apart in the corpus land in independent random windows; the
documents that train together within a window come from W random places of the corpus, not from one.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .doc_index import DocIndex
from .order import FeistelPermutation

BLOCK_TOKENS = 1 << 20  # 2 MiB of uint16 tokens, 4 MiB of uint32: one large read per block
WINDOW_BLOCKS = 8  # documents shuffle across 8 random blocks (8 Mi tokens)
KEEP_WINDOWS = 2  # the window being read and the next one (built ahead); a rank reads its sequences in order


def layout_from_env() -> tuple[int, int]:
    """(block tokens, window blocks) for a new run: ``STAGERUN_DATA_BLOCK_TOKENS`` / ``STAGERUN_DATA_WINDOW_BLOCKS``
    (a resumed run keeps the layout its checkpoint records)."""
    tokens = int(os.environ.get("STAGERUN_DATA_BLOCK_TOKENS", "") or BLOCK_TOKENS)
    window = int(os.environ.get("STAGERUN_DATA_WINDOW_BLOCKS", "") or WINDOW_BLOCKS)
    if tokens < 1 or window < 1:
        raise ValueError(
            f"STAGERUN_DATA_BLOCK_TOKENS ({tokens}) and STAGERUN_DATA_WINDOW_BLOCKS ({window}) must be positive"
        )
    return tokens, window


@dataclass(frozen=True)
class Window:
    epoch: int
    number: int
    start: int  # the epoch offset of its first token
    ends: np.ndarray  # int64: epoch end offset of each of its documents, in visiting order
    shift: np.ndarray  # int64: global token index minus epoch offset, per document
    blocks: np.ndarray  # int64: its block ids, in order

    @property
    def stop(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else self.start


class BlockOrder:
    """Epoch offsets -> global token indices for a v2 set, by windows of seeded blocks (see the module doc)."""

    name = "blocks"

    def __init__(
        self,
        index: DocIndex,
        key: tuple[int, ...],
        total: int,
        block_tokens: int,
        window_blocks: int,
        unit: int = 1,
    ):
        self.index, self.key, self.total = index, key, total
        self.n = index.num_documents
        self.unit = int(unit)  # documents that stay together: 2 for a preference set's pairs, else 1
        if self.unit < 1 or self.n % self.unit:
            raise ValueError(f"{self.n} documents do not split into units of {self.unit}")
        self.block_tokens, self.window_blocks = int(block_tokens), int(window_blocks)
        self.num_blocks = max(1, -(-total // self.block_tokens))
        self.num_windows = -(-self.num_blocks // self.window_blocks)
        self._permutations: OrderedDict[int, FeistelPermutation] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], Window] = OrderedDict()
        self._lock = threading.Lock()  # the builder thread and the read-ahead thread use the caches too
        # The next window is built in the background while this one is read: a step never waits for a window's
        # permutation (a few hundred ms for a window of half a million documents).
        self._builder: ThreadPoolExecutor | None = None
        self._building: dict[tuple[int, int], Future[Window]] = {}
        self.set_anchor(0, 0, 0)

    # --- blocks ----------------------------------------------------------------------------------------------
    def first_documents(self, blocks: np.ndarray) -> np.ndarray:
        """The first document id of each block (``num_documents`` for b = ``num_blocks``)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        at = np.searchsorted(self.index.ends, blocks * self.block_tokens, side="left") + 1
        at = -(-at // self.unit) * self.unit  # a block starts at a unit's first document (a pair's chosen one)
        return np.where(blocks == 0, 0, np.minimum(at, self.n)).astype(np.int64)

    def block_tokens_range(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global start, global stop) of each block's tokens: one contiguous range of the set."""
        blocks = np.asarray(blocks, dtype=np.int64)
        firsts = self.first_documents(np.concatenate([blocks, blocks + 1]))
        ends = np.asarray(self.index.ends, dtype=np.int64)
        bounds = np.where(firsts == 0, 0, ends[np.maximum(firsts - 1, 0)])
        return bounds[: len(blocks)], bounds[len(blocks) :]

    def permutation(self, key: tuple[int, ...], n: int) -> FeistelPermutation:
        return FeistelPermutation(n, (*self.key, *key))

    def window_blocks_of(self, epoch: int, number: int) -> np.ndarray:
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                perm = self._permutations[epoch] = self.permutation((epoch,), self.num_blocks)
                while len(self._permutations) > 2:
                    self._permutations.popitem(last=False)
        first = number * self.window_blocks
        return perm(np.arange(first, min(self.num_blocks, first + self.window_blocks), dtype=np.int64))

    def window_tokens(self, epoch: int, number: int) -> int:
        starts, stops = self.block_tokens_range(self.window_blocks_of(epoch, number))
        return int((stops - starts).sum())

    def next_window(self, epoch: int, number: int) -> tuple[int, int]:
        return (epoch, number + 1) if number + 1 < self.num_windows else (epoch + 1, 0)

    # --- windows ---------------------------------------------------------------------------------------------
    def set_anchor(self, epoch: int, number: int, start: int) -> None:
        """Window ``number`` of ``epoch`` starts at epoch offset ``start`` (from a saved state, or the start)."""
        self.epoch, self.number, self.start = int(epoch), int(number), int(start)

    def window(self, epoch: int, number: int, start: int) -> Window:
        """Window ``number`` of ``epoch``, which begins at epoch offset ``start``; cached (a pure function)."""
        with self._lock:
            cached = self._windows.get((epoch, number))
            if cached is not None:
                self._windows.move_to_end((epoch, number))
                return cached
        blocks = self.window_blocks_of(epoch, number)
        firsts, stops = self.first_documents(blocks), self.first_documents(blocks + 1)
        ids = np.concatenate(
            [np.zeros(0, np.int64)] + [np.arange(a, b, dtype=np.int64) for a, b in zip(firsts.tolist(), stops.tolist())]
        )
        if len(ids):
            units = len(ids) // self.unit  # whole units: blocks start at units' first documents
            moved = self.permutation((epoch, number, 1), units)(np.arange(units, dtype=np.int64))
            ids = ids.reshape(units, self.unit)[moved].reshape(-1)
        starts, lengths = self.index.bounds(ids)
        ends = start + np.cumsum(lengths)
        built = Window(epoch, number, start, ends, starts - (ends - lengths), blocks)
        with self._lock:
            self._windows[(epoch, number)] = built
            while len(self._windows) > KEEP_WINDOWS:
                self._windows.popitem(last=False)
        return built

    def built(self, epoch: int, number: int, start: int) -> Window:
        """``window(...)`` for another thread (the read-ahead): waits for the builder's build of it if one is under
        way rather than building it a second time."""
        future = self._building.get((epoch, number))
        return future.result() if future is not None else self.window(epoch, number, start)

    def _cached(self, epoch: int, number: int) -> Window | None:
        future = self._building.pop((epoch, number), None)
        if future is not None:
            future.result()  # built in the background (its error, if any, is raised here)
        with self._lock:
            return self._windows.get((epoch, number))

    def _build_next(self, window: Window) -> None:
        key = self.next_window(window.epoch, window.number)
        start = window.stop if key[0] == window.epoch else 0
        with self._lock:
            if key in self._windows or key in self._building:
                return
        if self._builder is None:
            self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="order")
        self._building[key] = self._builder.submit(self.window, *key, start)

    def _walk_to(self, epoch: int, offset: int) -> Window:
        if epoch != self.epoch or offset < self.start:
            self.set_anchor(epoch, 0, 0)  # a new epoch, or before the anchor: walk from the epoch's start
        while True:
            if self.number >= self.num_windows:
                raise AssertionError(f"epoch offset {offset} is beyond the {self.total} tokens of the source")
            cached = self._cached(self.epoch, self.number)
            # Windows passed on the way are only sized (two index look-ups per block), never built.
            stop = cached.stop if cached is not None else self.start + self.window_tokens(self.epoch, self.number)
            if offset < stop:
                window = cached if cached is not None else self.window(self.epoch, self.number, self.start)
                self._build_next(window)
                return window
            self.number, self.start = self.number + 1, stop

    def pieces(self, epoch: int, offset: int, take: int) -> Iterator[tuple[Window, int, int]]:
        """(window, first epoch offset, count) for epoch offsets [offset, offset + take), split at window ends."""
        done = 0
        while done < take:
            window = self._walk_to(epoch, offset + done)
            count = min(take - done, window.stop - (offset + done))
            yield window, offset + done, count
            done += count

    def locate(self, epoch: int, offset: int, take: int) -> tuple[np.ndarray, np.ndarray]:
        """(global token index, document rank in the epoch) of epoch offsets [offset, offset + take)."""
        index = np.empty(take, dtype=np.int64)
        ranks = np.empty(take, dtype=np.int64)
        done = 0
        for window, first, count in self.pieces(epoch, offset, take):
            # The documents covering [first, first + count) are a run of the window's: repeat each over its tokens
            # (cheaper than a binary search per token).
            j0, j1 = np.searchsorted(window.ends, [first, first + count - 1], side="right").tolist()
            cuts = np.minimum(window.ends[j0 : j1 + 1], first + count)
            j = np.repeat(np.arange(j0, j1 + 1, dtype=np.int64), np.diff(cuts, prepend=first))
            index[done : done + count] = np.arange(first, first + count, dtype=np.int64) + window.shift[j]
            # A document's rank only has to differ from its neighbours' (the loader numbers the documents inside a
            # sequence where the rank changes): window number x (documents + 1) + place keeps windows apart.
            ranks[done : done + count] = window.number * (self.n + 1) + j
            done += count
        return index, ranks

    def ends(self, epoch: int, offset: int, stop: int, at_least: int = 0) -> np.ndarray:
        """Epoch offsets of the document ends e with offset < e <= stop, in visiting order, and more until there are
        ``at_least`` (never past the epoch's end). The walk's anchor moves only to ``offset``'s window: the loader
        packs every row of a global batch this way, then locates its own rows, which lie at or after ``offset``."""
        window = self._walk_to(epoch, offset)
        parts, found = [], 0
        while True:
            first = int(np.searchsorted(window.ends, offset, side="right"))
            last = int(np.searchsorted(window.ends, stop, side="right"))
            last = max(last, min(len(window.ends), first + at_least - found))
            parts.append(window.ends[first:last])
            found += last - first
            if last < len(window.ends) or (window.stop >= stop and found >= at_least):
                break  # the next end is past stop, and there are enough
            following = self.next_window(epoch, window.number)
            if following[0] != epoch:
                break
            offset = window.stop
            window = self._cached(*following) or self.window(*following, offset)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def anchor(self, epoch: int, offset: int) -> list[int]:
        """[epoch, window, window start offset] of the window holding epoch offset ``offset``: what a state stores."""
        window = self._walk_to(epoch, offset)
        return [epoch, window.number, window.start]
