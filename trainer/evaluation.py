"""Per-phase evaluation (``spec.phases[].eval``): whether a stage worked, measured at its end (and every
``eval.everyTokens``).

- Held-out loss: mean cross-entropy on the first ``heldOut.tokens`` tokens of a source that no phase trains on
  (validation requires weight 0 everywhere), cut into windows of the phase's seqLen. The same fused chunked loss as
  training (losses.py), so it is memory-bounded at long contexts and comparable with the training loss.
- Needle in a haystack, on token ids (no tokenizer needed): a passkey of ``keyTokens`` distinct ids follows a
  marker at a depth of random filler; the sequence ends with the marker again, and the sample counts as solved when
  the greedy prediction at each of the last ``keyTokens`` positions is the passkey's next token (teacher-forced
  greedy decoding: all correct iff greedy decoding would write the passkey). Marker, passkey and filler ids are
  disjoint, so retrieving the key is the only way to solve it. The depths are spread evenly over the haystack.

Every rank runs every forward (FSDP gathers parameters in them; TP and CP ranks split each one): sequences are dealt
to data-parallel ranks, each rank runs the same number of micro-batches (padding with ignored targets), CP ranks keep
their chunks of each sequence (context_parallel.chunk_indices), and the sums go over the ``loss`` group. Only the
needle's last positions get logits: a forward hook on the final norm takes their hidden states and applies the head
there, while the model's own forward runs the chunked loss on ignored targets, never materialising logits.

Results go to ``<run dir>/eval.jsonl`` (a line per evaluation; metrics.jsonl stays one line per step, which its
readers key by step), the Prometheus gauges ``stagerun_eval_*`` (metrics.py) and the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagerun.core.plan import StepPlan, checkpoint_due
from stagerun.core.protocol import PreparedData
from stagerun.core.spec.run import EvalSpec, NeedleEvalSpec

from .callback_api import Callback, StepRecord
from .context_parallel import chunk_indices
from .losses import IGNORE_INDEX, LossConfig

__all__ = [
    "EvalResult",
    "Evaluation",
    "NeedleSet",
    "held_out_loss",
    "model_predictor",
    "needle_accuracy",
    "needle_set",
]

log = logging.getLogger("stagerun.trainer.eval")

MARKER_TOKENS = 3  # ids of the marker that precedes the passkey (at its depth and at the end)
EVAL_FILE = "eval.jsonl"


@dataclass(frozen=True)
class NeedleSet:
    """Haystacks of ``seq_len`` inputs each; the last ``key_tokens`` targets are the passkey, the rest ignored."""

    inputs: np.ndarray  # int64 [samples, seq_len]
    targets: np.ndarray  # int64 [samples, seq_len]: IGNORE_INDEX except the last key_tokens positions
    depths: np.ndarray  # float [samples]: where the needle starts, as a fraction of the haystack
    key_tokens: int


def needle_set(vocab_size: int, seq_len: int, spec: NeedleEvalSpec) -> NeedleSet:
    """The haystacks of ``spec`` for a model of ``vocab_size`` ids (the tokenizer's, not the padded vocabulary:
    ids past it never occur in training). Deterministic in (vocab_size, seq_len, spec)."""
    key, n = spec.key_tokens, spec.samples
    needle = MARKER_TOKENS + key
    if seq_len + 1 < 2 * needle + 1:
        raise ValueError(f"seqLen {seq_len} is too short for a needle of {needle} tokens and its query")
    rng = np.random.default_rng(spec.seed)
    ids = rng.permutation(vocab_size)
    alphabet = max(key, min(256, vocab_size // 4))  # passkey ids; the rest (after the marker) is filler
    if MARKER_TOKENS + alphabet >= vocab_size:
        raise ValueError(f"a vocabulary of {vocab_size} ids is too small for the needle test")
    marker, key_ids = ids[:MARKER_TOKENS], ids[MARKER_TOKENS : MARKER_TOKENS + alphabet]
    filler = ids[MARKER_TOKENS + alphabet :]
    length = seq_len + 1  # inputs are [:-1], targets [1:]
    room = length - 2 * needle  # where the needle may start: it never touches the query at the end
    depths = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])
    rows = filler[rng.integers(0, len(filler), size=(n, length))]
    for i, depth in enumerate(depths):
        passkey = rng.choice(key_ids, size=key, replace=False)
        start = int(round(depth * room))
        rows[i, start : start + needle] = np.concatenate([marker, passkey])
        rows[i, length - needle :] = np.concatenate([marker, passkey])
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, seq_len - key :] = rows[:, length - key :]
    return NeedleSet(rows[:, :seq_len].astype(np.int64), targets, depths, key)


# A predictor maps inputs [B, T] (this rank's micro-batch) to the greedy token ids at the last ``k`` positions
# [B, k]; under context parallelism each rank sees its chunks and returns -1 where it holds no such position.
Predictor = Callable[[torch.Tensor, int], torch.Tensor]


def needle_accuracy(predict: Predictor, needles: NeedleSet, topo: Any = None, micro_batch: int = 1) -> float:
    """Fraction of haystacks whose passkey is predicted in full (every rank gets the same number)."""
    correct = _per_sample(predict, needles, topo, micro_batch)
    return float((correct == needles.key_tokens).mean())


def _per_sample(predict: Predictor, needles: NeedleSet, topo: Any, micro_batch: int) -> np.ndarray:
    n, k = len(needles.inputs), needles.key_tokens
    counts = torch.zeros(n, dtype=torch.float64)
    for rows, inputs, _ in _micro_batches(needles.inputs, needles.targets, topo, micro_batch):
        predicted = predict(inputs, k).cpu()
        answer = torch.from_numpy(needles.targets[rows][:, -k:]) if len(rows) else None
        if answer is not None:
            counts[rows] += (predicted[: len(rows)] == answer).sum(dim=1).double()
    return np.asarray(_sum_over_loss(counts, topo).tolist())


def model_predictor(model: torch.nn.Module, topo: Any = None) -> Predictor:
    """Greedy predictions of a stagerun Transformer at the last ``k`` positions, without full logits: a hook on the
    final norm applies the head to those positions' hidden states while the forward runs the chunked loss."""
    from torch.distributed.tensor import DTensor

    net: Any = model  # a stagerun Transformer (FSDP-wrapped in training): its final norm and head weight

    def predict(inputs: torch.Tensor, k: int) -> torch.Tensor:
        total = inputs.shape[1] * _cp_size(topo)
        local = _local_positions(total, topo)  # global position of each local column
        wanted = np.nonzero(local >= total - k)[0]
        found: dict[str, torch.Tensor] = {}

        def take(module, args, output):
            hidden = output.full_tensor() if isinstance(output, DTensor) else output  # TP: sequence shards
            weight, shard = net._head_weight()  # inside the root forward: FSDP has gathered the head
            logits = shard.gather(hidden[:, torch.from_numpy(wanted).to(hidden.device)] @ weight.T)
            found["ids"] = logits.argmax(dim=-1)

        handle = net.norm.register_forward_hook(take)
        try:
            ignored = torch.full_like(inputs, IGNORE_INDEX)
            model(inputs, targets=ignored, loss=LossConfig())
        finally:
            handle.remove()
        out = torch.full((inputs.shape[0], k), -1, dtype=torch.long, device=inputs.device)
        out[:, torch.from_numpy(local[wanted] - (total - k)).to(inputs.device)] = found["ids"]
        return out

    return predict


def held_out_loss(
    model: torch.nn.Module, tokens: np.ndarray, seq_len: int, topo: Any = None, micro_batch: int = 1, chunk: int = 4096
) -> tuple[float, int]:
    """(mean cross-entropy, target tokens) over ``tokens`` cut into windows of ``seq_len`` (+1 for the targets)."""
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"{len(tokens)} tokens do not fill one sequence of {seq_len}")
    used = tokens[: windows * seq_len + 1].astype(np.int64)
    inputs = used[:-1].reshape(windows, seq_len)
    targets = used[1:].reshape(windows, seq_len)
    totals = torch.zeros(2, dtype=torch.float64)
    for _, x, y in _micro_batches(inputs, targets, topo, micro_batch):
        terms = model(x, targets=y, loss=LossConfig(chunk_tokens=chunk))
        totals += torch.stack([terms.ce_sum.detach().double().cpu(), terms.count.double().cpu()])
    ce, count = _sum_over_loss(totals, topo).tolist()
    return ce / count, int(count)


def _micro_batches(inputs: np.ndarray, targets: np.ndarray, topo: Any, micro_batch: int):
    """(global row indices, inputs, targets) of this rank's micro-batches: rows dealt to data-parallel ranks, the
    same count on every rank (short ones padded with ignored targets), CP chunks of every sequence kept."""
    dp_rank, dp_size = (topo.dp_rank, topo.dp_size) if topo is not None else (0, 1)
    device = topo.device if topo is not None else torch.device("cpu")
    mine = np.arange(dp_rank, len(inputs), dp_size)
    per_rank = -(-len(inputs) // dp_size)  # ceil: every rank runs as many forwards as the busiest
    steps = -(-per_rank // micro_batch)
    columns = _local_positions(inputs.shape[1], topo)
    for step in range(steps):
        rows = mine[step * micro_batch : (step + 1) * micro_batch]
        x = np.zeros((micro_batch, inputs.shape[1]), dtype=np.int64)
        y = np.full((micro_batch, inputs.shape[1]), IGNORE_INDEX, dtype=np.int64)
        x[: len(rows)], y[: len(rows)] = inputs[rows], targets[rows]
        if len(rows) < micro_batch and len(rows):
            x[len(rows) :] = inputs[rows[0]]  # padding rows: real tokens, ignored targets
        x, y = x[:, columns], y[:, columns]
        yield rows, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def _cp_size(topo: Any) -> int:
    shard = getattr(topo, "context_shard", None) if topo is not None else None
    return shard.size if shard is not None else 1


def _local_positions(total: int, topo: Any) -> np.ndarray:
    shard = getattr(topo, "context_shard", None) if topo is not None else None
    return chunk_indices(total, shard.size, shard.rank) if shard is not None else np.arange(total)


def _sum_over_loss(values: torch.Tensor, topo: Any) -> torch.Tensor:
    if topo is None:
        return values
    return torch.tensor(topo.sum_over_loss(values.tolist()), dtype=torch.float64)


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: a line of eval.jsonl."""

    step: int
    tokens: int
    phase: str
    phase_index: int
    seq_len: int
    at_phase_end: bool
    seconds: float
    held_out_source: str | None = None
    held_out_loss: float | None = None
    held_out_tokens: int | None = None
    needle_accuracy: float | None = None
    needle_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        names = {
            "phase_index": "phaseIndex",
            "seq_len": "seqLen",
            "at_phase_end": "atPhaseEnd",
            "held_out_source": "heldOutSource",
            "held_out_loss": "heldOutLoss",
            "held_out_tokens": "heldOutTokens",
            "needle_accuracy": "needleAccuracy",
            "needle_samples": "needleSamples",
        }
        return {names.get(k, k): v for k, v in self.__dict__.items() if v is not None}


class Evaluation(Callback):
    """Runs ``plan.phase.eval`` at the phase's end and every ``eval.everyTokens`` (collective: every rank)."""

    def __init__(self, run_dir: Path, exporter: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.exporter = exporter  # exporter.Exporter where this rank serves /progress or /metrics, else None
        self.trainer: Any = None
        self.shards: dict[str, Any] = {}
        self.results: list[EvalResult] = []

    def on_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step(self, record: StepRecord) -> None:
        plan: StepPlan = self.trainer.plan
        spec = plan.phase.eval
        if spec is None or plan.ends_phase or spec.every_tokens is None:
            return
        if checkpoint_due(spec.every_tokens, plan.tokens, plan.tokens_after):
            self.evaluate(plan, spec, record, at_phase_end=False)

    def on_phase_end(self, record: StepRecord) -> None:
        plan: StepPlan = self.trainer.plan
        if plan.phase.eval is not None:
            self.evaluate(plan, plan.phase.eval, record, at_phase_end=True)

    def evaluate(self, plan: StepPlan, spec: EvalSpec, record: StepRecord, *, at_phase_end: bool) -> EvalResult:
        trainer, started = self.trainer, time.perf_counter()
        phase, topo, model = plan.phase, trainer.topo, trainer.model
        values: dict[str, Any] = {}
        with torch.no_grad():
            source: Any = self._source(spec.held_out.source) if spec.held_out is not None else None
            if spec.held_out is not None and source.num_tokens <= phase.seq_len:
                # Every rank decides alike (same shards); a short source must not fail the run at a phase end.
                log.warning(
                    "eval.heldOut: source %s holds %d tokens, less than one sequence of seqLen %d: skipped",
                    spec.held_out.source,
                    source.num_tokens,
                    phase.seq_len,
                )
            elif spec.held_out is not None:
                tokens = source.read(0, min(spec.held_out.tokens + 1, source.num_tokens))
                loss, count = held_out_loss(
                    model, tokens, phase.seq_len, topo, phase.micro_batch_size, trainer.run.training.loss_chunk_tokens
                )
                values.update(held_out_source=spec.held_out.source, held_out_loss=loss, held_out_tokens=count)
            if spec.needle is not None:
                vocab = trainer.run.model.vocab_size
                needles = needle_set(vocab, phase.seq_len, spec.needle)
                accuracy = needle_accuracy(model_predictor(model, topo), needles, topo, phase.micro_batch_size)
                values.update(needle_accuracy=accuracy, needle_samples=spec.needle.samples)
        result = EvalResult(
            step=record.step,
            tokens=record.tokens,
            phase=phase.name,
            phase_index=phase.index,
            seq_len=phase.seq_len,
            at_phase_end=at_phase_end,
            seconds=round(time.perf_counter() - started, 3),
            **values,
        )
        self.results.append(result)
        if topo.is_main:
            with (self.run_dir / EVAL_FILE).open("a") as f:
                f.write(json.dumps(result.to_dict()) + "\n")
            log.warning("eval %s", json.dumps(result.to_dict()))
        self._publish(result)
        return result

    def _publish(self, result: EvalResult) -> None:
        """To /metrics (stagerun_eval_* gauges) and /progress, whose ``evaluation`` the operator copies into the
        TrainingRun's status."""
        exporter = self.exporter
        if exporter is None:
            return
        if exporter.training:
            exporter.metrics.evaluation(result)
        exporter.progress.evaluation = result.to_dict()
        exporter.server.publish(exporter.progress)

    def _source(self, name: str):
        if name not in self.shards:
            from .data.shards import TokenShards

            prepared = PreparedData.from_json((self.run_dir / PreparedData.FILE).read_text())
            self.shards[name] = TokenShards.open(prepared.shard_dirs[name])
        return self.shards[name]
