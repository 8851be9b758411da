"""What the tests' gloo worker scripts share (each runs under torchrun on CPU; this folder is on their sys.path):
the layout flags, the process group, the Topology of a layout, and the one JSON file of results rank 0 writes."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from stagerun.core.layout import ParallelLayout
from stagerun.trainer import distributed as D


def layout_args(cp: int | None = None) -> argparse.Namespace:
    """``out`` (the results file), ``--dp``, ``--tp`` and, where ``cp`` gives its default, ``--cp``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    if cp is not None:
        parser.add_argument("--cp", type=int, default=cp)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    return parser.parse_args()


def topology(layout: ParallelLayout) -> D.Topology:
    """This process's CPU Topology of ``layout`` (the process group is up), with FSDP's dp_shard x cp mesh when
    cp > 1, as the trainer builds it."""
    mesh, batch, loss = D.build_mesh(layout, "cpu")
    rank = dist.get_rank()
    shard_cp = D.build_shard_cp_mesh(mesh, layout)
    return D.Topology(rank, dist.get_world_size(), rank, torch.device("cpu"), layout, mesh, batch, loss, shard_cp)


def start(args: argparse.Namespace) -> D.Topology:
    """The gloo process group, seed 0, and the Topology of the flags' layout."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    return topology(ParallelLayout(dp_shard=args.dp, cp=getattr(args, "cp", 1), tp=args.tp))


def finish(out: str, results: object) -> None:
    """Rank 0 writes ``results`` as JSON to ``out``; every rank waits for it, then leaves the group."""
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
