"""A Kubernetes API on loopback plus simulated controllers, for testing the operator without a cluster.

- ``emulator``: ``running_api()`` serves a Kubernetes API over HTTP (kmock's scaffold + an in-memory store with the
  API server's semantics: resourceVersions, conflicts, status subresource, finalizers, graceful pod deletion, GC).
- ``kubelet``: ``FakeCluster`` plays the nodes, the Job controller, the scheduler and a kubelet whose pods run nothing
  (tests drive them: ``succeed``, ``fail``, ``oom_kill``, ``lose_pod``, ``node_not_ready``, ...).
- ``processes``: ``ProcessCluster`` is the same with a kubelet that runs each pod's command as a local process.

Running the real operator against it (test files import ``kube.*``: pytest's rootdir-prepend import mode)::

    from kopf.testing import KopfRunner
    from kube.emulator import running_api
    from kube.kubelet import FakeCluster

    def test_run(monkeypatch):
        monkeypatch.setattr("stagerun.operator.kube._api", None)  # the operator caches its client: new API, new port
        with running_api() as api, api.use_kubeconfig(), FakeCluster(api, pod_ip_prefix="127.10") as cluster, \\
                KopfRunner(["run", "--standalone", "-A", "-m", "stagerun.operator.handlers"]) as runner:
            api.custom().create_namespaced_custom_object("stagerun.io", "v1alpha1", "default", "trainingruns", manifest)
            cluster.wait_for_pods(2, run="tiny")
            cluster.succeed_job("tiny-a1", message='{...}')
            api.wait_for(lambda: api.get("trainingruns", "default", "tiny")["status"].get("state") == "Succeeded")
        assert runner.exception is None, runner.output

Context managers exit in reverse: kopf stops first, then the cluster, then the API. ``api.use_kubeconfig()`` points
``$KUBECONFIG`` (and the kubernetes client's import-time default) at the emulator for kopf's login and
``config.load_kube_config()``.
"""
