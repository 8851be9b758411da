"""`stagerun operator`: run the kopf operator that reconciles TrainingRuns.

One replica acts at a time. With ``--peering NAME`` (what the Helm chart runs) the replicas find each other through
kopf's peering object NAME (``kopf.dev`` ClusterKopfPeering with ``-A``, KopfPeering in each namespace with ``-n``)
and every one but the highest-priority live one pauses as a hot standby; ``--standalone`` is a single process
without peering (a workstation, tests). With neither, kopf peers through an object named ``default`` if one exists
and runs standalone otherwise.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time

TIEBREAK_RANGE = 1000


def seniority_priority(started_at: float, tiebreak: int) -> int:
    """The peering priority of an operator started at ``started_at`` (seconds since the epoch): the earlier it
    started, the higher, so the replica that acts keeps acting and a replacement pod (a restart, a rolling update)
    always joins as the standby instead of taking over. kopf pauses *every* operator that sees a live peer of its own
    priority, so two replicas of one Deployment (same arguments) must never tie: started within the same millisecond
    they differ by ``tiebreak`` (0 <= tiebreak < 1000, random per process). The values are negative (about -1.8e15,
    within JSON's exact integers), so any explicit ``--priority`` >= 0, e.g. an operator on a workstation, outranks
    the chart's replicas and pauses them."""
    if not 0 <= tiebreak < TIEBREAK_RANGE:
        raise ValueError(f"tiebreak must be in [0, {TIEBREAK_RANGE}), got {tiebreak}")
    return -(int(started_at * 1000) * TIEBREAK_RANGE + tiebreak)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone",
        action="store_true",
        help="no peering with other operator replicas (a single process: a workstation, tests)",
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="peer with the other replicas through kopf's peering object NAME (ClusterKopfPeering with -A, "
        "KopfPeering in each namespace with -n; it must exist): only the highest-priority live replica acts",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (the highest live one acts; equal priorities pause each other). Default: by start "
        "time, the oldest replica first (negative numbers, so any priority >= 0 outranks every default)",
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
    for flag, what in (
        ("service-accounts", "ServiceAccounts"),
        ("secrets", "Secrets"),
        ("volume-claims", "PersistentVolumeClaims"),
    ):
        parser.add_argument(
            f"--allowed-{flag}",
            metavar="PATTERNS",
            default=None,
            help=f"the only {what} a TrainingRun may name: comma-separated fnmatch patterns, NAME or NAMESPACE/NAME "
            "('' for none); default: all (docs/security.md)",
        )
    parser.add_argument(
        "--allowed-mount-prefixes",
        metavar="PATHS",
        default=None,
        help="comma-separated absolute paths a TrainingRun's volumes may be mounted under; default: anywhere",
    )
    network = parser.add_mutually_exclusive_group()
    network.add_argument(
        "--no-network-policy",
        action="store_true",
        help="create no NetworkPolicy per attempt (the trainer pods' ports stay open to every pod of the cluster)",
    )
    network.add_argument(
        "--network-policy-status-from",
        metavar="JSON",
        default=None,
        help="who may reach the trainer pods' status port 8090 (the operator, Prometheus): a JSON list of Kubernetes "
        "NetworkPolicyPeers; default: pods labelled as the chart's operator or as Prometheus, in any namespace",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _settings_to_env(args: argparse.Namespace, env) -> None:
    """The flags as the environment variables the handlers read (the chart sets those directly)."""
    from . import allow_list, network_policy

    for field, variable in allow_list.ENV.items():
        value = getattr(args, f"allowed_{field}", None)
        if value is not None:
            env[variable] = value
    if args.no_network_policy:
        env[network_policy.ENABLED_ENV] = "false"
    if args.network_policy_status_from is not None:
        env[network_policy.STATUS_FROM_ENV] = args.network_policy_status_from
    allow_list.from_env(env)  # a malformed setting stops the operator here, with its name
    network_policy.settings_from_env(env)


def run(args: argparse.Namespace) -> int:
    import os

    import kopf

    started_at = time.time()
    if args.metrics_port:
        os.environ["STAGERUN_METRICS_PORT"] = str(args.metrics_port)  # read by the startup handler
        os.environ["STAGERUN_METRICS_ADDRESS"] = args.metrics_address
    try:
        _settings_to_env(args, os.environ)
    except ValueError as exc:
        print(f"stagerun operator: {exc}", file=sys.stderr)
        return 2
    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    priority = args.priority
    if priority is None and not args.standalone:
        priority = seniority_priority(started_at, secrets.randbelow(TIEBREAK_RANGE))
    if priority is not None and not args.standalone:
        logging.getLogger("stagerun.operator").info(
            "peering %s with priority %d", args.peering or "'default' (if it exists)", priority
        )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True if args.standalone else None,  # None: kopf's auto-detection, or mandatory with a name
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
    )
    return 0
