"""Whole-window read-ahead for a remote source in the block order (``block_order.py``): the tokens of the window the
stream is in and of the next one, fetched as whole blocks (a few large ranges per window, coalesced per file, one
request batch) in a background thread while the current window trains, and laid out there in the window's visiting
order, so that any run of stream positions inside a window is one slice: a step's sequences of a source are a
copy of one contiguous run of memory, with no per-token index (the gather is paid once per window, off the
training thread).

Whole blocks are the fast way to read a store whose request rate, not its bandwidth, is the limit, but a process
then fetches the whole stream of a source while it trains on its share of each global batch (1 / dp of it). So
``read_mode`` chooses: ``blocks`` when the process needs all of it (dp = 1) or when the node-local chunk cache is
on (a node's ranks then share one fetch of each block), else ``ranges`` (only the byte ranges of the process's own
sequences, within 1.2x of the bytes it needs). ``STAGERUN_DATA_READ_AHEAD`` = ``blocks`` | ``ranges`` overrides it.
Either way the tokens, and so the batches, are the same.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .block_order import KEEP_WINDOWS, BlockOrder, Window

MODES = ("auto", "blocks", "ranges")


def read_mode(remote: bool, cached: bool, dp_size: int) -> str:
    """``blocks`` or ``ranges`` for a source (see the module doc); a local set is always read in place."""
    mode = os.environ.get("STAGERUN_DATA_READ_AHEAD", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"STAGERUN_DATA_READ_AHEAD={mode!r}: expected one of {', '.join(MODES)}")
    if not remote:
        return "ranges"
    if mode == "auto":
        return "blocks" if dp_size == 1 or cached else "ranges"
    return mode


@dataclass(frozen=True)
class OrderedWindow:
    """A window's tokens in visiting order: ``tokens[k]`` is the token at epoch offset ``start + k``."""

    start: int
    tokens: np.ndarray  # the set's dtype


# Documents at least this long on average are copied one slice each; shorter ones by one vectorised gather (a Python
# slice per 16-token document would cost more than the tokens it copies).
SLICE_COPY_MIN_TOKENS = 128


def visiting_order(fetched: np.ndarray, src: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The documents ``fetched[src[j] : src[j] + lengths[j]]`` one after another (j in order)."""
    total = int(lengths.sum())
    if not len(lengths):
        return fetched[:0].copy()
    if total >= SLICE_COPY_MIN_TOKENS * len(lengths):
        out = np.empty(total, dtype=fetched.dtype)
        at = 0
        for a, n in zip(src.tolist(), lengths.tolist()):
            out[at : at + n] = fetched[a : a + n]
            at += n
        return out
    # index of output token t = t + (src[j] - dst[j]) for the document j holding it: one repeat, one add, one take
    kind = np.int32 if max(total, len(fetched)) < 2**31 else np.int64
    dst = np.cumsum(lengths) - lengths
    index = np.repeat((src - dst).astype(kind), lengths)
    index += np.arange(total, dtype=kind)
    return fetched[index]


class WindowReader:
    """Keeps the ordered tokens of the windows the stream reads, and prepares the next window before it is needed."""

    def __init__(self, shards, order: BlockOrder):
        self.shards, self.order = shards, order
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readahead")
        self._windows: OrderedDict[tuple[int, int], Future[OrderedWindow]] = OrderedDict()

    def _fetch(self, epoch: int, number: int, start: int) -> OrderedWindow:
        window = self.order.built(epoch, number, start)
        starts, stops = self.order.block_tokens_range(window.blocks)
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        order = np.argsort(starts)
        starts, stops = starts[order], stops[order]
        parts = self.shards.read_ranges(starts, stops)
        offsets = np.concatenate([[0], np.cumsum(stops - starts)[:-1]]).astype(np.int64)
        fetched = np.concatenate(parts) if parts else np.zeros(0, self.shards.dtype)
        lengths = np.diff(window.ends, prepend=window.start)
        first = window.ends - lengths + window.shift  # each document's global start, inside one of the blocks
        block = np.searchsorted(starts, first, side="right") - 1
        return OrderedWindow(window.start, visiting_order(fetched, offsets[block] + first - starts[block], lengths))

    def _submit(self, key: tuple[int, int], start: int) -> Future[OrderedWindow]:
        future = self._windows.get(key)
        if future is None:
            future = self._windows[key] = self._executor.submit(self._fetch, *key, start)
        else:
            self._windows.move_to_end(key)
        return future

    def read(self, window: Window, offset: int, count: int) -> np.ndarray:
        """The tokens of epoch offsets [offset, offset + count), which lie in ``window`` (a view: copy it before the
        next read); starts preparing the window after it."""
        key = (window.epoch, window.number)
        future = self._submit(key, window.start)
        after = self.order.next_window(*key)
        self._submit(after, window.stop if after[0] == window.epoch else 0)
        # Keep this window, the next, and the previous one (a step's first sequence overlaps the last one's final
        # token); a step longer than a small set's epoch reads on through several, each used up before it goes.
        while len(self._windows) > KEEP_WINDOWS + 1:
            oldest = next(iter(self._windows))
            if oldest in (key, after):
                break
            del self._windows[oldest]  # a dropped future still completes, then its tokens go
        data = future.result()  # an error of the background fetch is raised here, unchanged
        return data.tokens[offset - data.start : offset - data.start + count]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
