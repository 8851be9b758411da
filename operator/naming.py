"""Names, labels and well-known values shared by the operator's builders, handlers and tests.

Every child of a TrainingRun attempt (ConfigMap, headless Service, Indexed Job) has the same name,
``<run>-a<attempt>``, so an attempt's objects are found by name and creating one twice is a harmless conflict.
"""

from __future__ import annotations

from stagerun.core.spec.validate import KUBERNETES_MAX_RUN_NAME

GROUP = "stagerun.io"
VERSION = "v1alpha1"
PLURAL = "trainingruns"
KIND = "TrainingRun"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "stagerun.io/run"
LABEL_ATTEMPT = "stagerun.io/attempt"
LABEL_PHASE = "stagerun.io/phase"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

CONTAINER = "trainer"
MANIFEST_DIR = "/etc/stagerun"
MANIFEST_FILE = "trainingrun.yaml"
RUN_DIR = "/var/lib/stagerun/run"
RDZV_PORT = 29400
STATUS_PORT = 8090
# Time between SIGTERM and SIGKILL: the trainer finishes its step and commits a checkpoint in it.
TERMINATION_GRACE_SECONDS = 600
# The trainer image's user (docker/trainer.Dockerfile): pods run as it, so PodSecurity `restricted` admits them and
# fsGroup makes checkpoint volumes writable to it.
TRAINER_UID = 65532
MAX_RUN_NAME = KUBERNETES_MAX_RUN_NAME  # leaves room for "-a<attempt>-<index>" in pod hostnames (63 at most)


def attempt_name(run: str, attempt: int) -> str:
    return f"{run}-a{attempt}"


def run_labels(run: str) -> dict[str, str]:
    return {LABEL_NAME: "stagerun", LABEL_MANAGED_BY: "stagerun-operator", LABEL_RUN: run}


def attempt_labels(run: str, attempt: int, phase: str) -> dict[str, str]:
    return {**run_labels(run), LABEL_ATTEMPT: str(attempt), LABEL_PHASE: phase}
