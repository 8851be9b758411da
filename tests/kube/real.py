"""The operator tests' API facade over a *real* cluster (``STAGERUN_TEST_KUBECONFIG``), in a fresh namespace.

It offers the helpers of ``emulator.Api`` that the operator tests use (get, list, patch, delete, events, wait_for,
custom). No simulated kubelet runs here: scenarios that need one skip; the others (objects created, invalid specs,
an image that cannot be pulled, deletion cleanup) run against the real API server, job controller and kubelets.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException

KUBECONFIG_ENV = "STAGERUN_TEST_KUBECONFIG"
KINDS = {
    "trainingruns": ("stagerun.io/v1alpha1", "TrainingRun"),
    "jobs": ("batch/v1", "Job"),
    "pods": ("v1", "Pod"),
    "services": ("v1", "Service"),
    "configmaps": ("v1", "ConfigMap"),
    "events": ("v1", "Event"),
    "nodes": ("v1", "Node"),
}


def real_kubeconfig() -> str | None:
    return os.environ.get(KUBECONFIG_ENV)


class RealApi:
    def __init__(self, kubeconfig: str):
        self.kubeconfig_path = Path(kubeconfig)
        self._client = config.new_client_from_config(config_file=kubeconfig)
        self._dynamic = dynamic.DynamicClient(self._client)
        self.namespace = f"stagerun-test-{uuid.uuid4().hex[:8]}"

    def _resource(self, resource: str):
        api_version, kind = KINDS[resource]
        return self._dynamic.resources.get(api_version=api_version, kind=kind)

    def client(self) -> client.ApiClient:
        return self._client

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self._client)

    def get(self, resource: str, namespace: str | None, name: str | None = None) -> dict | None:
        try:
            return self._resource(resource).get(name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, resource: str, namespace: str | None = None, label_selector: Any = None, field_selector=None):
        if isinstance(label_selector, dict):
            label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        found = self._resource(resource).get(
            namespace=namespace, label_selector=label_selector, field_selector=field_selector
        )
        return [item.to_dict() for item in found.items]

    def patch(self, resource: str, namespace: str | None, name: str, patch: Any, **_):
        return (
            self._resource(resource)
            .patch(body=patch, name=name, namespace=namespace, content_type="application/merge-patch+json")
            .to_dict()
        )

    def delete(self, resource: str, namespace: str | None, name: str, **_):
        try:
            self._resource(resource).delete(name=name, namespace=namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def events(self, namespace: str | None = None, **_):
        return self.list("events", namespace)

    def wait_for(self, predicate, timeout: float = 10, interval: float = 0.5, message: Any = None):
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                text = message() if callable(message) else message
                raise TimeoutError(f"not true within {timeout} s: {text}")
            time.sleep(interval)

    @contextlib.contextmanager
    def use_kubeconfig(self) -> Iterator[Path]:
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.kubeconfig_path)
        core = client.CoreV1Api(self._client)
        core.create_namespace({"metadata": {"name": self.namespace}})
        try:
            yield self.kubeconfig_path
        finally:
            core.delete_namespace(self.namespace)
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous
