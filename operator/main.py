"""`stagerun operator`: run the kopf operator that reconciles TrainingRuns.

Run one active instance per cluster (or per watched namespace set). Without ``--standalone`` kopf's peering makes
extra replicas wait as hot standbys, which needs kopf's peering CRD (``kopf.dev`` ClusterKopfPeering/KopfPeering).
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no peering with other operator replicas (single-replica deployments, tests)",
    )
    parser.add_argument(
        "--liveness", default=None, metavar="URL", help="serve kopf's health endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        help="the address the metrics endpoint binds (in a pod every interface, so Prometheus reaches the pod IP; "
        "127.0.0.1 on a workstation or in tests)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import os

    import kopf

    if args.metrics_port:
        os.environ["STAGERUN_METRICS_PORT"] = str(args.metrics_port)  # read by the startup handler
        os.environ["STAGERUN_METRICS_ADDRESS"] = args.metrics_address
    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        liveness_endpoint=args.liveness,
    )
    return 0
