"""Weight-init time of one rank: the old full-draw init against the counter-based block init (trainer/model/init.py).

    python benchmarks/init_time.py [--preset llama3-8b] [--ranks 8] [--layers-timed 1] [--device cpu|cuda]

Layout: one rank (rank 0) of an ``--ranks``-way FSDP shard over dim 0, the llama3-8b preset's shapes.

- old: what init did before (kept here as a private reference, not in the product): every rank draws every FULL
  parameter on CPU from its own generator, then keeps its shard (the slice is free; the draw is the cost).
- new: ``fill_local_shard`` on rank 0's shard box, on ``--device``: only the row blocks that overlap the shard.

Timed: the embedding, the output head and ``--layers-timed`` transformer blocks; the other blocks have the same
shapes, so their time is extrapolated (blocks x per-block time), as the table says. The norms are constants and
cost nothing measurable in either scheme.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time

import torch

from stagerun.core.spec.model import ModelSpec
from stagerun.core.spec.presets import resolve_model
from stagerun.trainer.model import Transformer
from stagerun.trainer.model.init import canonical_name, fill_local_shard, init_rule


def _old_full_draw(shape: tuple[int, ...], std: float, seed: int, fqn: str) -> torch.Tensor:
    """The pre-block init: one generator per parameter, the whole tensor drawn on CPU (every rank did this)."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(fqn)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _shard_box(shape: tuple[int, ...], ranks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rank 0's box under FSDP2's Shard(0) (torch.chunk sizes: ceil(rows / ranks) rows)."""
    rows = math.ceil(shape[0] / ranks)
    return (min(rows, shape[0]), *shape[1:]), (0,) * len(shape)


def _timed(device: str, fn, *args) -> float:
    """CPU seconds of the process on CPU (the machine may be shared: wall time would count other jobs), wall
    seconds up to a synchronize on CUDA."""
    if device == "cpu":
        start = time.process_time()
        fn(*args)
        return time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def random_parameters(model: Transformer, layers_timed: int):
    """(group, fqn, shape, std) of the random parameters timed: embedding, head, the first ``layers_timed`` blocks."""
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            std = init_rule(model, module_name, module, leaf)
            if std is None:
                continue
            parts = module_name.split(".")
            if parts[0] == "layers" and int(parts[1]) >= layers_timed:
                continue
            group = "block" if parts[0] == "layers" else module_name
            yield group, f"{module_name}.{leaf}", tuple(param.shape), std


def measure(preset: str, ranks: int, layers_timed: int, device: str) -> dict[str, dict[str, float]]:
    spec = resolve_model(ModelSpec(preset=preset))
    with torch.device("meta"):
        model = Transformer(spec)
    times: dict[str, dict[str, float]] = {}
    for group, fqn, shape, std in random_parameters(model, layers_timed):
        row = times.setdefault(group, {"old": 0.0, "new": 0.0, "elements": 0.0})
        row["old"] += _timed("cpu", _old_full_draw, shape, std, 0, fqn)
        local_shape, offset = _shard_box(shape, ranks)
        local = torch.empty(local_shape, device=device)
        row["new"] += _timed(device, fill_local_shard, local, shape, offset, std, 0, fqn)
        row["elements"] += math.prod(shape)
    block = times.pop("block")
    scale = spec.layers / layers_timed
    times[f"blocks ({layers_timed} timed, x{scale:g})"] = {key: value * scale for key, value in block.items()}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--ranks", type=int, default=8, help="FSDP degree: rank 0 of this many is timed")
    parser.add_argument("--layers-timed", type=int, default=1, help="blocks timed; the rest are extrapolated")
    parser.add_argument("--device", default="cpu", help="where the new init draws (the old one drew on CPU)")
    args = parser.parse_args()
    times = measure(args.preset, args.ranks, args.layers_timed, args.device)
    unit = "CPU s" if args.device == "cpu" else "wall s"
    threads = torch.get_num_threads()
    print(f"init of rank 0 of {args.ranks}-way FSDP, {args.preset}, torch {torch.__version__}, {threads} threads")
    print(f"old: every full parameter drawn on CPU (CPU s); new: rank 0's blocks drawn on {args.device} ({unit})")
    print(f"{'parameters':<28}{'elements':>14}{'old s':>10}{'new s':>10}{'speed-up':>10}")
    rows = list(times.items())
    rows.append(("total", {key: sum(row[key] for row in times.values()) for key in ("old", "new", "elements")}))
    for name, row in rows:
        speed_up = row["old"] / row["new"]
        print(f"{name:<28}{row['elements']:>14,.0f}{row['old']:>10.2f}{row['new']:>10.2f}{speed_up:>9.1f}x")


if __name__ == "__main__":
    main()
