"""The stateful packing and mixing loader (numpy only).

The stream of *global* batches is a deterministic function of (seed, each source's shards, the sequence of
``next_step`` calls) and never of the number of data-parallel ranks: every rank advances the same global state
by one whole global batch per step and reads only its own slice. So a checkpoint taken with 2 ranks resumes with
1 or 4 ranks on exactly the next tokens, and the state is tiny (a few integers per source).

Per source, an infinite stream: epoch e is the source's documents (each with its EOS) in an order seeded by
(data seed, crc32 of the source name, e), concatenated (block_order.py for v2 sets: seeded blocks of documents,
shuffled within windows, walked from an anchor the state keeps, the layout recorded in the state; order.py: the
earlier v2 bijection for runs begun in it, and the whole-epoch permutation v1 sets always had). Stream position p
lies in epoch p // num_tokens. A sequence of length L starting at p is the L + 1 tokens [p, p + L + 1): inputs the first
L, targets the last L; the cursor then advances by L, so the last target is the next sequence's first input and
no token is skipped or repeated. Documents are not padded: a sequence may span documents and epochs; ``doc_ids``
numbers the documents inside each sequence for intra-document attention masking.

Sources mix by Megatron-LM's deterministic error-minimising blend (``BlendedDataset``'s helper): each next
sequence comes from the source furthest behind its target share, weights[i] * (n + 1) - drawn[i].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from stagerun.core.layout import split_batch

from .block_order import BlockOrder, layout_from_env
from .order import BijectionOrder, PermutationOrder
from .readahead import WindowReader, read_mode
from .shards import TokenShards
from .token_files import RemoteTokens

STATE_VERSION = 2  # 2 adds each source's order, its layout and anchor; a version 1 state (v1 sets only) still loads
READABLE_STATES = (1, 2)
V2_ORDERS = ("blocks", "bijection")  # a state saved in either resumes in it on a v2 set


@dataclass
class MicroBatch:
    inputs: np.ndarray  # int64 [m, L]
    targets: np.ndarray  # int64 [m, L]
    doc_ids: np.ndarray  # int32 [m, L]: 0, 1, 2, ... for the documents inside each sequence
    sources: list[str]  # the source of each sequence


class _SourceStream:
    """One source's infinite stream of shuffled epochs; turns stream positions into tokens."""

    def __init__(self, name: str, shards: TokenShards, seed: int, layout: tuple[int, int] | None = None):
        if shards.num_tokens == 0:
            raise ValueError(f"source {name!r} ({shards.source}) holds no tokens: give it a non-empty path or drop it")
        self.name = name
        self.shards = shards
        self.total = shards.num_tokens
        self.num_docs = shards.num_documents
        # Never Python's hash(): it is salted per process, and every rank and every resume must agree.
        self.key = (seed, zlib.crc32(name.encode("utf-8")))
        self.reader: WindowReader | None = None
        self.use_order(shards.order, layout or layout_from_env())

    def use_order(self, name: str, layout: tuple[int, int]) -> None:
        """Read in order ``name`` (``blocks`` with ``layout`` = (block tokens, window blocks), or what a resumed
        state was saved with: ``bijection``, a v1 set's ``permutation``)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.order: BlockOrder | BijectionOrder | PermutationOrder
        if name == "permutation":
            self.order = PermutationOrder(self.shards.doc_ends, self.key)
        elif name == "bijection":
            self.order = BijectionOrder(self.shards.index, self.key, self.total)
        else:
            self.order = BlockOrder(self.shards.index, self.key, self.total, *layout)
        self.order_name = name

    @property
    def layout(self) -> dict[str, int] | None:
        if not isinstance(self.order, BlockOrder):
            return None
        return {"blockTokens": self.order.block_tokens, "windowBlocks": self.order.window_blocks}

    def read(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [position, position + count) of the stream (int64) and each token's document number (0, 1, ...)."""
        index, doc_ids = self.locate(position, count)
        return self.shards.take(index), doc_ids

    def locate(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The global token indices of stream positions [position, position + count) and their document numbers."""
        index = np.empty(count, dtype=np.int64)
        doc_key = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(position + done, self.total)
            take = min(count - done, self.total - offset)
            index[done : done + take], docs = self.order.locate(epoch, offset, take)
            doc_key[done : done + take] = docs + epoch * self.num_docs
            done += take
        doc_ids = np.zeros(count, dtype=np.int64)
        np.cumsum(doc_key[1:] != doc_key[:-1], out=doc_ids[1:])
        return index, doc_ids

    def take(self, index: np.ndarray, dp_size: int) -> np.ndarray:
        """The tokens at ``index`` (located just before): whole windows read ahead for a remote set when the read
        mode says so (readahead.py), else only these positions."""
        if not isinstance(self.order, BlockOrder):
            return self.shards.take(index)
        windows, self.order.touched = self.order.touched, set()
        files = self.shards.files
        remote = isinstance(files, RemoteTokens)
        mode = read_mode(remote, isinstance(files, RemoteTokens) and files.files.cache is not None, dp_size)
        if mode == "ranges":
            return self.shards.take(index)
        if self.reader is None:
            self.reader = WindowReader(self.shards, self.order)
        return self.reader.take(index, windows)

    def anchor(self, position: int) -> list[int] | None:
        """Where the order's walk resumes for a cursor at ``position`` (None: a v1 order needs none)."""
        if isinstance(self.order, PermutationOrder):
            return None
        return self.order.anchor(*divmod(position, self.total))


class PackedMixLoader:
    """Packs and mixes sources into global batches; each rank receives its own micro-batches of each step."""

    def __init__(self, sources: dict[str, TokenShards], seed: int):
        if not sources:
            raise ValueError("PackedMixLoader needs at least one source")
        self.seed = int(seed)
        self.names = list(sources)  # manifest order: ties in the blend go to the earlier source
        self._streams = [_SourceStream(name, shards, self.seed) for name, shards in sources.items()]
        self.cursors = [0] * len(self.names)
        self.drawn = [0] * len(self.names)  # sequences drawn per source in the current phase
        self.phase_sequences = 0  # n: sequences drawn in the current phase
        self.phase_index: int | None = None
        self.tokens_per_source: dict[str, int] = {name: 0 for name in self.names}

    def next_step(
        self,
        *,
        phase_index: int,
        weights: dict[str, float],
        seq_len: int,
        global_sequences: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
    ) -> list[MicroBatch]:
        """Advance the global state by one whole global batch; return only this rank's micro-batches.

        global_sequences must split into dp_size x micro_batch_size x grad_accum (stagerun.core.layout.split_batch);
        dp_rank and dp_size are the rank's ``dp`` coordinate and degree in its ParallelLayout. Rank r gets the
        contiguous block of sequences [r * per_rank, (r + 1) * per_rank) of the global batch, split into grad_accum
        micro-batches of micro_batch_size, in order. Only this rank's tokens are read; the other sequences only move
        cursors.
        """
        per_rank = self._check_step(seq_len, global_sequences, dp_rank, dp_size, micro_batch_size)
        shares = self._shares(weights)
        if phase_index != self.phase_index:
            # A new phase may bring new weights: the blend's error terms restart from zero.
            self.phase_index = phase_index
            self.drawn = [0] * len(self.names)
            self.phase_sequences = 0
        choices = self._blend(shares, global_sequences)
        first = dp_rank * per_rank
        mine: list[tuple[int, int]] = []
        for j, source in enumerate(choices):
            if first <= j < first + per_rank:
                mine.append((source, self.cursors[source]))
            self.cursors[source] += seq_len
            self.tokens_per_source[self.names[source]] += seq_len
        return self._micro_batches(mine, seq_len, micro_batch_size, dp_size)

    def _check_step(self, seq_len: int, global_sequences: int, dp_rank: int, dp_size: int, micro: int) -> int:
        if seq_len < 1 or global_sequences < 1 or micro < 1 or dp_size < 1:
            raise ValueError(
                f"seq_len ({seq_len}), global_sequences ({global_sequences}), micro_batch_size "
                f"({micro}) and dp_size ({dp_size}) must all be positive"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        return split_batch(global_sequences, dp_size, micro).per_rank

    def _shares(self, weights: dict[str, float]) -> list[float]:
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"weights name unknown sources {unknown}: the loader's sources are {self.names}")
        raw = [float(weights.get(name, 0.0)) for name in self.names]
        if any(w < 0 or w != w for w in raw) or sum(raw) <= 0:
            raise ValueError(f"weights {weights} must be non-negative with a positive sum")
        total = sum(raw)
        return [w / total for w in raw]

    def _blend(self, shares: list[float], count: int) -> list[int]:
        """Megatron's blend: each sequence from the source with the largest shares[i] * (n + 1) - drawn[i]."""
        drawn, n = self.drawn, self.phase_sequences
        active = [i for i, w in enumerate(shares) if w > 0]  # a weight of 0 never draws
        choices = []
        for _ in range(count):
            best, best_error = -1, 0.0
            for i in active:
                error = shares[i] * (n + 1) - drawn[i]
                if best < 0 or error > best_error:  # strict: ties go to the lowest index
                    best, best_error = i, error
            drawn[best] += 1
            n += 1
            choices.append(best)
        self.phase_sequences = n
        return choices

    def _micro_batches(self, mine: list[tuple[int, int]], seq_len: int, micro: int, dp_size: int) -> list[MicroBatch]:
        tokens = np.empty((len(mine), seq_len + 1), dtype=np.int64)
        doc_ids = np.empty((len(mine), seq_len), dtype=np.int32)
        index = np.empty((len(mine), seq_len + 1), dtype=np.int64)
        for row, (source, position) in enumerate(mine):
            index[row], docs = self._streams[source].locate(position, seq_len + 1)
            doc_ids[row] = docs[:seq_len]
        # One read per source for the whole step: a remote set fetches all its sequences' ranges in one batch.
        sources = np.array([source for source, _ in mine], dtype=np.int64)
        for source in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == source)
            tokens[rows] = self._streams[source].take(index[rows], dp_size)
        names = [self.names[source] for source, _ in mine]
        return [
            MicroBatch(
                inputs=np.ascontiguousarray(tokens[i : i + micro, :-1]),
                targets=np.ascontiguousarray(tokens[i : i + micro, 1:]),
                doc_ids=doc_ids[i : i + micro],
                sources=names[i : i + micro],
            )
            for i in range(0, len(mine), micro)
        ]

    # --- checkpoint state -------------------------------------------------------------------------------------
    def _fingerprints(self) -> dict[str, dict]:
        return {
            name: {
                "numTokens": s.shards.num_tokens,
                "numDocuments": s.shards.num_documents,
                "tokenizerSha256": s.shards.tokenizer_sha256,
                "order": s.order_name,
            }
            for name, s in zip(self.names, self._streams)
        }

    def state_dict(self) -> dict:
        """The loader's position: JSON-serialisable, independent of the number of ranks."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "phaseIndex": self.phase_index,
            "phaseSequences": self.phase_sequences,
            "cursors": dict(zip(self.names, self.cursors)),
            "drawn": dict(zip(self.names, self.drawn)),
            "tokensPerSource": dict(self.tokens_per_source),
            "sources": self._fingerprints(),
            "layouts": {name: layout for name, s in zip(self.names, self._streams) if (layout := s.layout)},
            "anchors": {
                name: anchor
                for name, stream, cursor in zip(self.names, self._streams, self.cursors)
                if (anchor := stream.anchor(cursor)) is not None
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the sources and seed must be the ones the state was saved with."""
        if state.get("version") not in READABLE_STATES:
            raise ValueError(
                f"data-loader state version {state.get('version')!r} is not {STATE_VERSION}: resume "
                f"with the stagerun version that wrote the checkpoint"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data seed is {state['seed']} but this run uses {self.seed}: set "
                f"spec.data.seed back to {state['seed']} to resume"
            )
        saved, current = state["sources"], self._fingerprints()
        if list(saved) != self.names:
            raise ValueError(
                f"the checkpoint was taken with data sources {list(saved)} but this run has {self.names}: "
                f"resume with the same spec.data.sources (same names, same order)"
            )
        orders = {}
        for name, stream in zip(self.names, self._streams):
            was = {"order": "permutation", **saved[name]}  # states before version 2 come from v1 sets
            now = dict(current[name])
            if was["order"] in V2_ORDERS and stream.shards.order in V2_ORDERS:
                now["order"] = was["order"]  # a v2 set reads in whichever v2 order the run began with
            if was != now:
                changed = [k for k in now if was.get(k) != now[k]]
                raise ValueError(
                    f"source {name!r} differs from the one the checkpoint was taken with "
                    f"({', '.join(changed)}: {was} then, {now} now): resume with the "
                    f"same shard set and tokenizer, or start a new run"
                    + (
                        " (a stagerun-tokens/v1 set converted to v2 reads its documents in another order: "
                        "resume on the v1 set, or start the new run on the v2 one)"
                        if "order" in changed
                        else ""
                    )
                )
            layout = state.get("layouts", {}).get(name)
            orders[name] = (was["order"], (layout["blockTokens"], layout["windowBlocks"]) if layout else None)
        for name, stream in zip(self.names, self._streams):
            order, layout = orders[name]
            saved_layout = None if layout is None else {"blockTokens": layout[0], "windowBlocks": layout[1]}
            if order != stream.order_name or (order == "blocks" and saved_layout != stream.layout):
                stream.use_order(order, layout or layout_from_env())
        self.phase_index = state["phaseIndex"]
        self.phase_sequences = int(state["phaseSequences"])
        self.cursors = [int(state["cursors"][name]) for name in self.names]
        self.drawn = [int(state["drawn"][name]) for name in self.names]
        self.tokens_per_source = {name: int(state["tokensPerSource"][name]) for name in self.names}
        anchors = state.get("anchors", {})
        for name, stream, cursor in zip(self.names, self._streams, self.cursors):
            if not isinstance(stream.order, PermutationOrder):
                epoch, offset = divmod(cursor, stream.total)
                anchor = anchors.get(name)
                if anchor is not None and anchor[0] == epoch and anchor[2] <= offset:
                    stream.order.set_anchor(*anchor)
                else:  # no usable anchor: the walk starts at the epoch's start (slow once, still exact)
                    stream.order.set_anchor(epoch, 0, 0)
