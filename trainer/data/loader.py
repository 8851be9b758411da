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

Phase kinds (``next_step(kind=...)``, ResolvedPhase.kind). ``pretrain`` is the above for every set; a chat set's
stored values lose their loss-mask bit (shard_format.LOSS_MASK_BIT) and every target trains. In ``sft`` and ``dpo``
phases rows are packed instead:

- sft, chat sources: from the cursor (a document start), the consecutive documents of the epoch order that fit in
  seqLen + 1 tokens; the rest of the row is padding (inputs the set's eosId, targets IGNORE_INDEX, one more document
  number so nothing attends to it), and the cursor advances by the tokens taken. A conversation longer than the row
  is split: the row holds its first seqLen + 1 tokens, the cursor advances by seqLen (the last target is the next
  row's first input, as in a stream) and the next rows continue it (``splitConversations`` counts such
  conversations, in the state and per step); nothing is dropped. Targets are IGNORE_INDEX wherever the target
  token's mask bit is 0 and across documents. A cursor a pretrain phase left inside a document moves to the next
  document start at the source's first sft row (``skippedTokens`` counts what that skipped). Text sources (replay)
  are read as streams, every target trained.
- dpo, preference sources only: whole pairs (documents 2i, 2i + 1, adjacent in the epoch order: block_order.py's
  ``unit``), greedily, padding as above; ``MicroBatch.pair_ids`` is the document number in the row (2k: pair k's
  chosen response, 2k + 1: its rejected one) at the positions whose target is trained, -1 elsewhere. A pair longer
  than seqLen + 1 goes alone in a row and keeps its prompt: each response is cut from its end, the chosen one to
  max(C // 2, C - rejected length) tokens of the row's C = seqLen + 1 and the rejected one to what is left (so a
  short response gives its room to the long one); ``truncatedPairs`` counts them. A pair whose prompt leaves a
  response no trained token is a DataError asking for a larger seqLen.

Every rank walks the packing of every row of the global batch (document lengths only, from the order's document
ends), so cursors and the per-step counts (``StepCounts``: pairs, split conversations, truncated pairs) agree on all
ranks; only this rank's rows' tokens are read.

Shares in sft and dpo phases: a row's worth differs by source (an sft chat row trains only its assistant tokens, a
dpo row holds a varying number of pairs), so the blend counts *amounts*, not rows: each next row comes from the
source with the largest shares[i] x T - amount[i] (T: the phase's amount so far; ties to the larger share, then the
earlier source). In sft the amount is a row's expected loss tokens: seqLen for a text row, and for a chat row its
targets x numLossTokens / numTokens of its set (the set's mean density of trained tokens: the row's own count would
need its tokens, which only its rank reads); so the phase weights are shares of loss tokens, up to how much a set's
density varies between conversations. In dpo the amount is a row's pairs: the weights are shares of pairs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from stagerun.core.layout import split_batch

from .block_order import BlockOrder, layout_from_env
from .corpora import DataError
from .order import BijectionOrder, PermutationOrder
from .readahead import WindowReader, read_mode
from .shard_format import split_loss_mask
from .shards import TokenShards
from .token_files import RemoteTokens

# 2 adds each source's order, its layout and anchor; a version 1 state (v1 sets only) still loads. The packing
# state of sft/dpo phases (packing, drawnAmount, phaseAmount, the counters) is optional: a state without it is one
# saved before post-training existed, whose sources were all read as streams.
STATE_VERSION = 2
READABLE_STATES = (1, 2)
V2_ORDERS = ("blocks", "bijection")  # a state saved in either resumes in it on a v2 set
KINDS = ("pretrain", "sft", "dpo")
IGNORE_INDEX = -100  # the targets no loss is taken on (trainer/batch.py's, which imports torch)


@dataclass
class MicroBatch:
    inputs: np.ndarray  # int64 [m, L]
    targets: np.ndarray  # int64 [m, L]; IGNORE_INDEX where no loss is taken (sft/dpo rows only)
    doc_ids: np.ndarray  # int32 [m, L]: 0, 1, 2, ... for the documents inside each sequence (padding: one more)
    sources: list[str]  # the source of each sequence
    # dpo phases: int32 [m, L], 2k / 2k + 1 at the trained targets of the row's pair k's chosen / rejected response,
    # -1 elsewhere; None in other phases.
    pair_ids: np.ndarray | None = None
    num_pairs: int = 0  # pairs in this micro-batch


@dataclass(frozen=True)
class StepCounts:
    """What one ``next_step`` packed in the whole global batch (every rank computes the same)."""

    pairs: int = 0  # preference pairs (dpo)
    split_conversations: int = 0  # conversations longer than a row, begun in this step (sft)
    truncated_pairs: int = 0  # pairs longer than a row, cut (dpo)
    skipped_tokens: int = 0  # tokens skipped to reach a document start at a source's first sft row


@dataclass
class _Row:
    """One row of a global batch: its source, and for this rank's rows where its tokens come from."""

    source: int
    pieces: list[tuple[int, int]] | None = None  # packed rows: (stream position, tokens) per document, in row order
    pairs: int = 0
    truncated: bool = False
    # this rank's rows: the stream position of a stream row's first token; a packed row's runs of consecutive
    # stream positions (position, tokens) and each token's document number in the row [L + 1]
    position: int | None = None
    runs: list[tuple[int, int]] | None = None
    doc_ids: np.ndarray | None = None


class _SourceStream:
    """One source's infinite stream of shuffled epochs; turns stream positions into tokens."""

    def __init__(self, name: str, shards: TokenShards, seed: int, layout: tuple[int, int] | None = None):
        if shards.num_tokens == 0:
            raise ValueError(f"source {name!r} ({shards.source}) holds no tokens: give it a non-empty path or drop it")
        self.name = name
        self.shards = shards
        self.total = shards.num_tokens
        self.num_docs = shards.num_documents
        self.content: str = shards.content
        self.masked = shards.loss_mask_bit is not None
        self.loss_density = shards.num_loss_tokens / shards.num_tokens  # trained tokens per token, set-wide
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
        if self.content != "text" and name != "blocks":
            # Whole-document packing needs the block order's document ends, and pairs its units; chat and
            # preference sets are always v2 sets begun in it, so only a foreign state can ask for another.
            raise ValueError(
                f"source {self.name!r} ({self.shards.source}) is a {self.content} set, read only in the block order, "
                f"but the checkpoint reads it in the {name!r} order: resume with the shard set the checkpoint was "
                f"taken with, or start a new run"
            )
        if name == "permutation":
            self.order = PermutationOrder(self.shards.doc_ends, self.key)
        elif name == "bijection":
            self.order = BijectionOrder(self.shards.index, self.key, self.total)
        else:
            unit = 2 if self.content == "preference" else 1  # pairs stay whole and adjacent
            self.order = BlockOrder(self.shards.index, self.key, self.total, *layout, unit=unit)
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

    def ends(self, position: int, stop: int, at_least: int = 0) -> np.ndarray:
        """Stream positions of the document ends e with position < e <= stop, and more until there are
        ``at_least`` (block order only: chat and preference sets)."""
        assert isinstance(self.order, BlockOrder), "packed rows read chat and preference sets in the block order"
        parts, found = [], 0
        while True:
            epoch, offset = divmod(position, self.total)
            part = self.order.ends(epoch, offset, min(self.total, stop - epoch * self.total), at_least - found)
            parts.append(part + epoch * self.total)
            found += len(part)
            if found >= at_least and stop <= (epoch + 1) * self.total:
                return np.concatenate(parts)
            position = (epoch + 1) * self.total  # an epoch ends at a document end: go on in the next one

    def window_reader(self, dp_size: int) -> WindowReader | None:
        """The whole-window reader of a remote set in the block order when the read mode says so (readahead.py),
        else None: the tokens are then gathered by index, only this rank's."""
        files = self.shards.files
        if not isinstance(self.order, BlockOrder):
            return None
        remote = isinstance(files, RemoteTokens)
        cached = isinstance(files, RemoteTokens) and files.files.cache is not None
        if read_mode(remote, cached, dp_size) == "ranges":
            return None
        if self.reader is None:
            self.reader = WindowReader(self.shards, self.order)
        return self.reader

    def read_span(self, position: int, count: int, dp_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of stream positions [position, position + count) (int64, or the set's dtype) and, per token, the
        number of document ends e with position < e <= its position: the document numbering of ``read``, for any
        sub-span by a subtraction. Window by window slices of the reader's ordered tokens when it reads whole
        windows, else located and gathered by index (``read``)."""
        reader = self.window_reader(dp_size)
        if reader is None:
            return self.read(position, count)
        starts = np.zeros(count, dtype=np.int32 if count < 2**31 else np.int64)  # 1 at each document start but 0
        return self.window_tokens(reader, position, count, starts), np.cumsum(starts, out=starts)

    def window_tokens(
        self, reader: WindowReader, position: int, count: int, starts: np.ndarray | None = None
    ) -> np.ndarray:
        """Tokens of stream positions [position, position + count) from ``reader``'s ordered windows (the set's
        dtype: widened where they are copied into the batch); sets 1 in ``starts`` where a document starts."""
        assert isinstance(self.order, BlockOrder)
        tokens = np.empty(count, dtype=self.shards.dtype)
        done = 0
        while done < count:
            epoch, offset = divmod(position + done, self.total)
            take = min(count - done, self.total - offset)
            for window, first, n in self.order.pieces(epoch, offset, take):
                at = done + first - offset
                tokens[at : at + n] = reader.read(window, first, n)
                if starts is not None:
                    j0, j1 = np.searchsorted(window.ends, [first, first + n], side="right").tolist()
                    ends = window.ends[j0:j1] - first + at  # each end is the next document's first token
                    starts[ends[ends < count]] = 1
            done += take
        return tokens

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
        # sft/dpo phases: the blend's amounts (expected loss tokens, or pairs; see the module doc) in this phase.
        self.drawn_amount = [0.0] * len(self.names)
        self.phase_amount = 0.0
        # Where each cursor stands: "stream" (moved as a stream: maybe inside a document), "documents" (at a
        # document start) or "split" (inside a conversation longer than a row, continued by the next sft row).
        self.packing = ["stream"] * len(self.names)
        self.split_conversations = dict.fromkeys(self.names, 0)
        self.truncated_pairs = dict.fromkeys(self.names, 0)
        self.skipped_tokens = dict.fromkeys(self.names, 0)
        self.last_step = StepCounts()  # what the latest next_step packed

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
        kind: str = "pretrain",
    ) -> list[MicroBatch]:
        """Advance the global state by one whole global batch; return only this rank's micro-batches.

        global_sequences must split into dp_size x micro_batch_size x grad_accum (stagerun.core.layout.split_batch);
        dp_rank and dp_size are the rank's ``dp`` coordinate and degree in its ParallelLayout. Rank r gets the
        contiguous block of sequences [r * per_rank, (r + 1) * per_rank) of the global batch, split into grad_accum
        micro-batches of micro_batch_size, in order. Only this rank's tokens are read; the other sequences only move
        cursors. ``kind``: the phase's (pretrain | sft | dpo; see the module doc); ``last_step`` then holds the
        step's counts.
        """
        per_rank = self._check_step(seq_len, global_sequences, dp_rank, dp_size, micro_batch_size)
        shares = self._shares(weights)
        self._check_kind(kind, shares, phase_index)
        if phase_index != self.phase_index:
            # A new phase may bring new weights: the blend's error terms restart from zero.
            self.phase_index = phase_index
            self.drawn = [0] * len(self.names)
            self.phase_sequences = 0
            self.drawn_amount = [0.0] * len(self.names)
            self.phase_amount = 0.0
        first = dp_rank * per_rank
        before = (sum(self.split_conversations.values()), sum(self.truncated_pairs.values()))
        skipped = sum(self.skipped_tokens.values())
        rows: list[_Row] = []
        if kind == "pretrain":
            for j, source in enumerate(self._blend(shares, global_sequences)):
                rows.append(self._stream_row(source, seq_len, first <= j < first + per_rank))
        else:
            for j in range(global_sequences):
                rows.append(self._packed_row(kind, shares, seq_len, first <= j < first + per_rank))
        self.last_step = StepCounts(
            pairs=sum(row.pairs for row in rows),
            split_conversations=sum(self.split_conversations.values()) - before[0],
            truncated_pairs=sum(self.truncated_pairs.values()) - before[1],
            skipped_tokens=sum(self.skipped_tokens.values()) - skipped,
        )
        return self._micro_batches(
            rows[first : first + per_rank], seq_len, micro_batch_size, dp_size, kind, phase_index
        )

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

    def _check_kind(self, kind: str, shares: list[float], phase_index: int) -> None:
        """What the phase's kind can train on, by each weighted source's content (known only once its set is open:
        the spec's check sees declared formats); the trainer turns these into user errors."""
        if kind not in KINDS:
            raise ValueError(f"phase kind {kind!r} is not one of {', '.join(KINDS)}")
        field = f"spec.phases[{phase_index}].data.weights"
        for name, stream, share in zip(self.names, self._streams, shares):
            if share <= 0:
                continue
            shown = f"source {name!r} ({stream.shards.source}) holds {stream.content}"
            if kind == "dpo" and stream.content != "preference":
                raise ValueError(
                    f"{shown}, but a dpo phase trains on preference pairs only: give {name} weight 0 in {field}, "
                    f"or point it at a preference set"
                )
            if kind != "dpo" and stream.content == "preference":
                raise ValueError(
                    f"{shown} pairs, which only dpo phases train on, but this phase's kind is {kind}: give {name} "
                    f"weight 0 in {field}, or set kind: dpo"
                )
            if kind == "sft" and stream.content == "chat" and stream.loss_density == 0:
                raise ValueError(
                    f"{shown} conversations without one trained (assistant) token (numLossTokens 0): an sft phase "
                    f"learns nothing from it; give {name} weight 0 in {field}, or re-tokenize it with its assistant "
                    f"turns"
                )

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

    def _pick(self, shares: list[float]) -> int:
        """The amount blend of sft/dpo phases (module doc): the source furthest behind its share of the amount."""
        active = [i for i, w in enumerate(shares) if w > 0]
        return max(active, key=lambda i: (shares[i] * self.phase_amount - self.drawn_amount[i], shares[i], -i))

    def _stream_row(self, source: int, seq_len: int, mine: bool) -> _Row:
        """A row read as a stream (pretrain, and text replay in sft): seq_len + 1 tokens, the cursor moves seq_len."""
        row = _Row(source)
        if mine:
            row.position = self.cursors[source]
        self.cursors[source] += seq_len
        self.tokens_per_source[self.names[source]] += seq_len
        self.packing[source] = "stream"
        return row

    def _packed_row(self, kind: str, shares: list[float], seq_len: int, mine: bool) -> _Row:
        source = self._pick(shares)
        stream = self._streams[source]
        if stream.content == "text":  # replay in an sft phase: every target trains
            row, amount = self._stream_row(source, seq_len, mine), float(seq_len)
        else:
            if kind == "sft":
                row, consumed = self._conversations(source, seq_len + 1)
                amount = stream.loss_density * (sum(length for _, length in row.pieces or []) - 1)
            else:
                row, consumed = self._pairs(source, seq_len + 1)
                amount = float(row.pairs)
            self.cursors[source] += consumed
            self.tokens_per_source[self.names[source]] += consumed
            if mine:
                self._locate_pieces(row, seq_len + 1)
        self.drawn[source] += 1
        self.phase_sequences += 1
        self.drawn_amount[source] += amount
        self.phase_amount += amount
        return row

    def _conversations(self, source: int, room: int) -> tuple[_Row, int]:
        """An sft row of a chat source: the whole conversations from the cursor that fit in ``room`` tokens, or the
        next ``room`` tokens of one too long for it; and how far the cursor moves."""
        stream, name = self._streams[source], self.names[source]
        position = self.cursors[source]
        if self.packing[source] == "stream" and position % stream.total:
            start = int(stream.ends(position - 1, position, 1)[0])  # the first document start at or after it
            self.skipped_tokens[name] += start - position
            self.cursors[source] = position = start
        ends = stream.ends(position, position + room)
        if len(ends):
            bounds = [position, *ends.tolist()]
            self.packing[source] = "documents"
            return _Row(source, [(a, b - a) for a, b in zip(bounds, bounds[1:])]), bounds[-1] - position
        if self.packing[source] != "split":
            self.split_conversations[name] += 1
        self.packing[source] = "split"
        return _Row(source, [(position, room)]), room - 1  # the last target is the next row's first input

    def _pairs(self, source: int, room: int) -> tuple[_Row, int]:
        """A dpo row: the whole pairs from the cursor (always a pair's start) that fit in ``room`` tokens, or one
        pair too long for it, cut (module doc); and how far the cursor moves (past every pair it holds)."""
        stream = self._streams[source]
        position = self.cursors[source]
        ends = stream.ends(position, position + room, 2)
        fit = int(np.searchsorted(ends, position + room, side="right"))
        fit -= fit % 2
        self.packing[source] = "documents"
        if fit:
            bounds = [position, *ends[:fit].tolist()]
            return _Row(source, [(a, b - a) for a, b in zip(bounds, bounds[1:])], pairs=fit // 2), bounds[-1] - position
        chosen_end, rejected_end = int(ends[0]), int(ends[1])
        chosen, rejected = chosen_end - position, rejected_end - chosen_end
        keep_chosen = min(chosen, max(room // 2, room - rejected))
        keep_rejected = min(rejected, room - keep_chosen)
        self.truncated_pairs[self.names[source]] += 1
        pieces = [(position, keep_chosen), (chosen_end, keep_rejected)]
        return _Row(source, pieces, pairs=1, truncated=True), rejected_end - position

    def _locate_pieces(self, row: _Row, room: int) -> None:
        """This rank's packed row: its runs of consecutive stream positions (a row of whole documents is one run)
        and each token's document number."""
        pieces = row.pieces or []
        runs: list[tuple[int, int]] = []
        for position, length in pieces:
            if runs and runs[-1][0] + runs[-1][1] == position:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((position, length))
        doc_ids = np.full(room, len(pieces), dtype=np.int64)  # padding: a document of its own
        lengths = [length for _, length in pieces]
        doc_ids[: sum(lengths)] = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
        row.runs, row.doc_ids = runs, doc_ids

    def _micro_batches(
        self, mine: list[_Row], seq_len: int, micro: int, dp_size: int, kind: str, phase_index: int
    ) -> list[MicroBatch]:
        m, L = len(mine), seq_len
        inputs = np.empty((m, L), dtype=np.int64)
        targets = np.empty((m, L), dtype=np.int64)
        doc_ids = np.empty((m, L), dtype=np.int32)
        pair_ids = np.full((m, L), -1, dtype=np.int32) if kind == "dpo" else None
        # Stream rows: a source's rows in this rank's block are consecutive draws, so its k rows are the one span
        # [p, p + k L + 1) of its stream (each row's last target is the next row's first input): one read per
        # source per step, then rows are reshapes of it.
        for source, rows, position in self._stream_runs(mine, L):
            stream, k = self._streams[source], len(rows)
            tokens, counts = stream.read_span(position, k * L + 1, dp_size)
            ids = split_loss_mask(tokens)[0] if stream.masked else tokens  # every target trains
            numbers = counts[: k * L].reshape(k, L)
            if len(rows) == m:  # one source: whole arrays, no row gather
                inputs[:], targets[:] = ids[: k * L].reshape(k, L), ids[1:].reshape(k, L)
                np.subtract(numbers, numbers[:, :1], out=doc_ids, casting="unsafe")
            else:
                inputs[rows], targets[rows] = ids[: k * L].reshape(k, L), ids[1:].reshape(k, L)
                doc_ids[rows] = numbers - numbers[:, :1]
        packed = [r for r, row in enumerate(mine) if row.runs is not None]
        if packed:
            self._packed_rows(mine, packed, inputs, targets, doc_ids, pair_ids, L, dp_size, phase_index)
        names = [self.names[row.source] for row in mine]
        return [
            MicroBatch(
                inputs=inputs[i : i + micro],
                targets=targets[i : i + micro],
                doc_ids=doc_ids[i : i + micro],
                sources=names[i : i + micro],
                pair_ids=None if pair_ids is None else pair_ids[i : i + micro],
                num_pairs=sum(row.pairs for row in mine[i : i + micro]),
            )
            for i in range(0, len(mine), micro)
        ]

    @staticmethod
    def _stream_runs(mine: list[_Row], seq_len: int) -> list[tuple[int, np.ndarray, int]]:
        """(source, row numbers, first stream position) per run of stream rows that follow one another in their
        source's stream."""
        runs: dict[int, list[tuple[list[int], int]]] = {}
        for r, row in enumerate(mine):
            if row.position is None:
                continue
            own = runs.setdefault(row.source, [])
            if own and own[-1][1] + len(own[-1][0]) * seq_len == row.position:
                own[-1][0].append(r)
            else:
                own.append(([r], row.position))
        return [(source, np.array(rows), start) for source, own in runs.items() for rows, start in own]

    def _packed_rows(
        self,
        mine: list[_Row],
        packed: list[int],
        inputs: np.ndarray,
        targets: np.ndarray,
        doc_ids: np.ndarray,
        pair_ids: np.ndarray | None,
        seq_len: int,
        dp_size: int,
        phase_index: int,
    ) -> None:
        """The sft/dpo rows of this rank: their runs' tokens (whole windows' slices, or one gather per source),
        inputs padded with the set's eosId, targets only where trained and inside one document."""
        room = seq_len + 1
        values = np.zeros((len(packed), room), dtype=np.int64)
        valid = np.zeros((len(packed), room), dtype=bool)
        gathers: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # by source: (row, at, index) to read by index
        for i, r in enumerate(packed):
            row = mine[r]
            stream, at = self._streams[row.source], 0
            reader = stream.window_reader(dp_size)
            for position, length in row.runs or []:
                if reader is not None:  # packed rows number their documents themselves: tokens only
                    values[i, at : at + length] = stream.window_tokens(reader, position, length)
                else:
                    gathers.setdefault(row.source, []).append((i, at, stream.locate(position, length)[0]))
                at += length
            valid[i, :at] = True
        # One read per source for the whole step: a remote set fetches all its sequences' ranges in one batch.
        for source, parts in gathers.items():
            tokens = self._streams[source].shards.take(np.concatenate([index for _, _, index in parts]))
            done = 0
            for i, at, index in parts:
                values[i, at : at + len(index)] = tokens[done : done + len(index)]
                done += len(index)
        for i, r in enumerate(packed):
            row, stream = mine[r], self._streams[mine[r].source]
            assert row.doc_ids is not None  # set with the runs
            ids, trained = split_loss_mask(values[i]) if stream.masked else (values[i], None)
            assert trained is not None  # packed rows are chat / preference sets, which carry the mask
            inputs[r] = np.where(valid[i, :-1], ids[:-1], stream.shards.eos_id)
            same = row.doc_ids[1:] == row.doc_ids[:-1]  # never across documents (nor into the padding)
            target = trained[1:] & same & valid[i, 1:]
            targets[r] = np.where(target, ids[1:], IGNORE_INDEX)
            doc_ids[r] = row.doc_ids[:seq_len]
            if pair_ids is not None:
                pair_ids[r] = np.where(target, row.doc_ids[:-1], -1)
                self._check_pairs(row, pair_ids[r], values[i], seq_len, phase_index)

    def _check_pairs(self, row: _Row, pair_ids: np.ndarray, values: np.ndarray, seq_len: int, phase: int) -> None:
        """Every response of the row's pairs has a trained target (the DPO loss sums over them; a response
        without one would not count as a pair on the device)."""
        present = np.bincount(pair_ids[pair_ids >= 0], minlength=2 * row.pairs)
        missing = np.flatnonzero(present[: 2 * row.pairs] == 0)
        if not len(missing):
            return
        stream = self._streams[row.source]
        j = int(missing[0])
        position = (row.pieces or [])[j - j % 2][0]  # the pair's chosen response: its first token
        first = int(stream.locate(position, 1)[0][0])
        pair = int(np.searchsorted(stream.shards.index.ends, first, side="right")) // 2
        which = "chosen" if j % 2 == 0 else "rejected"
        where = f"source {self.names[row.source]!r} ({stream.shards.source}): preference pair {pair}"
        if not row.truncated:
            raise DataError(
                f"{where} has no trained token in its {which} response (no loss-mask bit): the set is corrupt or "
                f"was written without the chat template's assistant turns; re-tokenize it"
            )
        prompts = []  # per response: the tokens before its first trained one
        for start, _ in row.pieces or []:
            length = int(stream.ends(start, start, 1)[0]) - start
            _, trained = split_loss_mask(stream.shards.take(stream.locate(start, length)[0]))
            prompts.append(int(np.argmax(trained)) if trained.any() else length)
        kept = (row.pieces or [])[j][1]
        # With seqLen >= 2 x prompt + 1 each response keeps at least prompt + 1 tokens under the truncation rule.
        raise DataError(
            f"{where} does not fit seqLen {seq_len}: the pair is longer than a row, so each response is cut from its "
            f"end, and the {kept} tokens left to the {which} one hold only its prompt ({prompts[j]} tokens before "
            f"the response); raise seqLen (spec.phases[{phase}].seqLen) to at least {2 * max(prompts) + 1}, or "
            f"shorten the longest prompts"
        )

    # --- checkpoint state -------------------------------------------------------------------------------------
    def _fingerprints(self) -> dict[str, dict]:
        return {
            name: {
                "numTokens": s.shards.num_tokens,
                "numDocuments": s.shards.num_documents,
                "tokenizerSha256": s.shards.tokenizer_sha256,
                "order": s.order_name,
                **({"content": s.content} if s.content != "text" else {}),  # text sets: as states before chat sets
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
            # sft/dpo packing (module doc); absent in states saved before post-training: all read as streams.
            "packing": {name: mode for name, mode in zip(self.names, self.packing) if mode != "stream"},
            "drawnAmount": dict(zip(self.names, self.drawn_amount)),
            "phaseAmount": self.phase_amount,
            "splitConversations": dict(self.split_conversations),
            "truncatedPairs": dict(self.truncated_pairs),
            "skippedTokens": dict(self.skipped_tokens),
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
        self.packing = [state.get("packing", {}).get(name, "stream") for name in self.names]
        self.drawn_amount = [float(state.get("drawnAmount", {}).get(name, 0.0)) for name in self.names]
        self.phase_amount = float(state.get("phaseAmount", 0.0))
        for key, counter in (
            ("splitConversations", self.split_conversations),
            ("truncatedPairs", self.truncated_pairs),
            ("skippedTokens", self.skipped_tokens),
        ):
            counter.update({name: int(state.get(key, {}).get(name, 0)) for name in self.names})
        anchors = state.get("anchors", {})
        for name, stream, cursor in zip(self.names, self._streams, self.cursors):
            if not isinstance(stream.order, PermutationOrder):
                epoch, offset = divmod(cursor, stream.total)
                anchor = anchors.get(name)
                if anchor is not None and anchor[0] == epoch and anchor[2] <= offset:
                    stream.order.set_anchor(*anchor)
                else:  # no usable anchor: the walk starts at the epoch's start (slow once, still exact)
                    stream.order.set_anchor(epoch, 0, 0)
