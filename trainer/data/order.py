"""The seeded bijection every v2 order is built from (``FeistelPermutation``), and two epoch orders kept so that the
runs begun in them resume exactly: the first v2 order (``BijectionOrder``: new runs use ``block_order.py``) and the
v1 order (``PermutationOrder``).

In the bijection order, a v2 set's epoch e visits its documents in the order p_e(0), p_e(1), ..., p_e(n - 1), where
p_e is a seeded bijection of [0, n): a balanced Feistel network over the smallest even number of bits covering n,
cycle-walked back into [0, n) (each step of the walk stays a bijection of the larger domain, so the walk ends, after
fewer than four steps on average). p_e(k) costs a few integer operations for any k, so nothing per document is held:
the order walks forward from an anchor (the document holding the source's cursor, part of the loader state) over the
documents the global batches pass, a window of about one global batch. A new epoch needs only its round keys, so an
epoch boundary costs a step nothing extra.

A v1 set keeps the order it always had, a whole-epoch ``rng.permutation`` (two epochs cached), so a run begun on one
resumes exactly; it costs about 40 bytes per document per process, which is why v2 exists.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .doc_index import DocIndex

ROUNDS = 6
EVAL_CHUNK = 1 << 16  # positions evaluated at a time (8 bytes each: 512 KiB per temporary)
MIN_CHUNK = 1024  # documents added to the window at a time, at least
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing function of uint64 (the Feistel round function)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection of [0, n), evaluated for any array of positions."""

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        # Round keys from a cryptographic hash of the key: stable across processes, machines and numpy versions.
        self.keys = [
            np.uint64(int.from_bytes(hashlib.blake2b(repr((key, r)).encode(), digest_size=8).digest(), "little"))
            for r in range(ROUNDS)
        ]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        if len(positions) > EVAL_CHUNK:
            # In pieces whose temporaries stay in cache: ~25% faster on half a million positions (a window's
            # documents), the same values.
            return np.concatenate([self(positions[i : i + EVAL_CHUNK]) for i in range(0, len(positions), EVAL_CHUNK)])
        out = np.asarray(positions, dtype=np.uint64).copy()
        todo = np.arange(len(out))
        while len(todo):
            out[todo] = self._network(out[todo])
            todo = todo[out[todo] >= np.uint64(self.n)]
        return out.astype(np.int64)

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right


class BijectionOrder:
    """Epoch offsets -> global token indices for a v2 set, walking a window of documents forward from an anchor."""

    def __init__(self, index: DocIndex, key: tuple[int, ...], total: int):
        self.index, self.key, self.total = index, key, total
        self.n = index.num_documents
        self._average = max(1.0, total / self.n)
        self._permutations: dict[int, FeistelPermutation] = {}
        self.set_anchor(0, 0, 0)

    def permutation(self, epoch: int) -> FeistelPermutation:
        perm = self._permutations.get(epoch)
        if perm is None:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            perm = self._permutations[epoch] = FeistelPermutation(self.n, (*self.key, epoch))
        return perm

    def set_anchor(self, epoch: int, rank: int, offset: int) -> None:
        """Document ``rank`` of ``epoch`` starts at epoch offset ``offset`` (from a saved state, or the start)."""
        self.epoch, self.k0, self.o0 = int(epoch), int(rank), int(offset)
        self._ends = np.zeros(0, dtype=np.int64)  # epoch end offsets of documents k0, k0 + 1, ...
        self._shift = np.zeros(0, dtype=np.int64)  # global token index minus epoch offset, per document

    def _window_end(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else self.o0

    def _cover(self, epoch: int, start: int, stop: int) -> None:
        """Make the window hold every document overlapping epoch offsets [start, stop)."""
        if epoch != self.epoch or start < self.o0:
            # A new epoch, or a position before the anchor (never after load_state_dict): walk from its start.
            self.set_anchor(epoch, 0, 0)
        while self._window_end() < stop:
            first = self.k0 + len(self._ends)
            count = min(self.n - first, max(MIN_CHUNK, int((stop - self._window_end()) / self._average * 1.25)))
            if count <= 0:
                raise AssertionError(f"epoch offset {stop} is beyond the {self.total} tokens of the source")
            ids = self.permutation(epoch)(np.arange(first, first + count, dtype=np.int64))
            starts, lengths = self.index.bounds(ids)
            ends = self._window_end() + np.cumsum(lengths)
            self._ends = np.concatenate([self._ends, ends])
            self._shift = np.concatenate([self._shift, starts - (ends - lengths)])
        # Documents that end at or before ``start`` are never read again: drop them once they are half the window.
        drop = int(np.searchsorted(self._ends, start, side="right"))
        if drop and 2 * drop >= len(self._ends):
            self.k0, self.o0 = self.k0 + drop, int(self._ends[drop - 1])
            self._ends, self._shift = self._ends[drop:].copy(), self._shift[drop:].copy()

    def locate(self, epoch: int, offset: int, take: int) -> tuple[np.ndarray, np.ndarray]:
        """(global token index, document rank in the epoch) of epoch offsets [offset, offset + take)."""
        self._cover(epoch, offset, offset + take)
        offsets = np.arange(offset, offset + take, dtype=np.int64)
        j = np.searchsorted(self._ends, offsets, side="right")
        return offsets + self._shift[j], j + self.k0

    def anchor(self, epoch: int, offset: int) -> list[int]:
        """[epoch, rank, start offset] of the document holding epoch offset ``offset``: what a state stores."""
        self._cover(epoch, offset, offset + 1)
        j = int(np.searchsorted(self._ends, offset, side="right"))
        return [epoch, self.k0 + j, int(self._ends[j - 1]) if j else self.o0]


class PermutationOrder:
    """A v1 set's order: each epoch a ``rng.permutation`` of all documents, seeded by (key, epoch)."""

    def __init__(self, doc_ends: np.ndarray, key: tuple[int, ...]):
        self._lengths = np.diff(doc_ends, prepend=0)
        self._starts = doc_ends - self._lengths
        self.key = key
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(end offsets of the permuted documents within the epoch, global token index minus epoch offset)."""
        cached = self._epochs.get(epoch)
        if cached is None:
            rng = np.random.Generator(np.random.PCG64([*self.key, epoch]))
            order = rng.permutation(len(self._lengths))
            lengths = self._lengths[order]
            ends = np.cumsum(lengths)
            shift = self._starts[order] - (ends - lengths)
            if len(self._epochs) >= 2:  # a sequence spans at most two epochs unless a source is shorter than it
                del self._epochs[min(self._epochs)]
            cached = self._epochs[epoch] = (ends, shift)
        return cached

    def locate(self, epoch: int, offset: int, take: int) -> tuple[np.ndarray, np.ndarray]:
        ends, shift = self._epoch(epoch)
        offsets = np.arange(offset, offset + take, dtype=np.int64)
        docs = np.searchsorted(ends, offsets, side="right")
        return offsets + shift[docs], docs
