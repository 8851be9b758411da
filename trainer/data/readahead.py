"""Whole-window read-ahead for a remote source in the block order (``block_order.py``): the tokens of the window the
stream is in and of the next one, fetched as whole blocks (a few large ranges per window, coalesced per file, one
request batch) in a background thread while the current window trains, and gathered from memory.

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

from .block_order import KEEP_WINDOWS, BlockOrder

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
class WindowTokens:
    """The tokens of one window's blocks: block global starts (sorted), stops, offsets into ``tokens``."""

    starts: np.ndarray
    stops: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray


class WindowReader:
    """Keeps the tokens of the windows the stream touches, and fetches the next window before it is needed."""

    def __init__(self, shards, order: BlockOrder):
        self.shards, self.order = shards, order
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readahead")
        self._windows: OrderedDict[tuple[int, int], Future[WindowTokens]] = OrderedDict()

    def _fetch(self, epoch: int, number: int) -> WindowTokens:
        blocks = self.order.window_blocks_of(epoch, number)
        starts, stops = self.order.block_tokens_range(blocks)
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        order = np.argsort(starts)
        starts, stops = starts[order], stops[order]
        parts = self.shards.read_ranges(starts, stops)
        offsets = np.concatenate([[0], np.cumsum(stops - starts)[:-1]]).astype(np.int64)
        tokens = np.concatenate(parts) if parts else np.zeros(0, self.shards.dtype)
        return WindowTokens(starts, stops, offsets, tokens)

    def _submit(self, key: tuple[int, int]) -> Future[WindowTokens]:
        future = self._windows.get(key)
        if future is None:
            future = self._windows[key] = self._executor.submit(self._fetch, *key)
        else:
            self._windows.move_to_end(key)
        return future

    def take(self, index: np.ndarray, windows: set[tuple[int, int]]) -> np.ndarray:
        """Tokens at global positions ``index`` (int64), which lie in ``windows``; starts fetching the window after
        the last of them. A position outside them (never, by construction) is read by range."""
        keep = set(windows)
        for key in sorted(windows):
            self._submit(key)
        if windows:
            keep.add(after := self.order.next_window(*max(windows)))
            self._submit(after)
        # At most the previous window besides these (a sequence may span two); never one this step reads (a step
        # longer than a small set's epoch spans several). A dropped future still completes, then its tokens go.
        for key in [k for k in self._windows if k not in keep][: max(0, len(self._windows) - KEEP_WINDOWS - 1)]:
            del self._windows[key]
        flat = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty(len(flat), dtype=np.int64)
        todo = np.ones(len(flat), dtype=bool)
        for key in sorted(windows):
            data = self._windows[key].result()  # an error of the background fetch is raised here, unchanged
            if not len(data.starts):
                continue
            at = np.maximum(np.searchsorted(data.starts, flat, side="right") - 1, 0)
            hit = todo & (flat >= data.starts[at]) & (flat < data.stops[at])
            out[hit] = data.tokens[data.offsets[at[hit]] + flat[hit] - data.starts[at[hit]]]
            todo &= ~hit
        if todo.any():
            out[todo] = self.shards.take(flat[todo])
        return out.reshape(np.shape(index))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
