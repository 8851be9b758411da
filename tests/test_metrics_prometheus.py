"""A real Prometheus server scrapes a real trainer run and the real operator; every documented metric and every
dashboard query must come back with data through Prometheus' HTTP API.

GPU telemetry is exercised with a test double of NVML (tests/stubs/nvml/pynvml.py) on this GPU-less machine; the
absence of NVML is covered by tests/test_metrics.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import faults
import pytest
import yaml
from conftest import ROOT, run_tiny, tiny_run, write_manifest

from stagerun.trainer.metrics import GPU_GAUGES, SOURCE_GAUGE, STEP_GAUGES

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs a Prometheus server binary (Debian: apt-get install prometheus; .ci/run does)"
)
DASHBOARD = ROOT / "charts" / "stagerun" / "dashboards" / "stagerun.json"
NVML_STUB = Path(__file__).parent / "stubs" / "nvml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prometheus(targets: dict[str, str], folder: Path):
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((folder / "prometheus.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(url: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
    reply = urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10)
    body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$namespace", ".*").replace("$run", ".*")
            found.append((panel["title"], expr))
    return found


def operator_scenario(plane, namespace: str, monkeypatch, port: int) -> None:
    """The real operator on the test control plane with its metrics on ``port``: a run, a failed pod (restart), a
    phase relaunch."""
    from cluster.operator import operator_harness
    from test_operator import relaunch_message

    monkeypatch.setenv("STAGERUN_METRICS_PORT", str(port))
    monkeypatch.setenv("STAGERUN_METRICS_ADDRESS", "127.0.0.1")  # loopback only, as every test server
    with operator_harness(plane, namespace, monkeypatch) as h:
        doc = h.manifest()
        doc["spec"]["phases"][1]["parallelism"] = {"tensorParallel": 2}
        doc["spec"]["phases"][1]["microBatchSize"] = 16
        h.create(doc)
        h.pods.fail(h.pods.wait_for_pods(1, job="quickstart-a1")[0], exit_code=1)
        h.wait(lambda: h.status().get("attempt") == 2, "no restart")
        h.pods.wait_for_pods(1, job="quickstart-a2")
        h.pods.succeed_job("quickstart-a2", message=relaunch_message(1, 42))
        h.wait(lambda: h.status().get("attempt") == 3, "no relaunch")
        time.sleep(3)  # a few scrapes of the settled state


def test_prometheus_scrapes_every_documented_metric_and_every_dashboard_query_has_data(
    control_plane, trainingrun_crd, namespace, monkeypatch, run_dir, tmp_path
):
    trainer_port, operator_port = free_port(), free_port()
    targets = {"trainer": f"127.0.0.1:{trainer_port}", "operator": f"127.0.0.1:{operator_port}"}
    with prometheus(targets, tmp_path) as url:
        operator_scenario(control_plane, namespace, monkeypatch, operator_port)

        manifest = tiny_run(metrics={"peakTflops": 0.05})  # CPU has no known peak: set one so MFU is reported
        manifest["spec"]["phases"][0]["tokens"] = "96Ki"
        path = write_manifest(tmp_path / "tiny.yaml", manifest)
        env = {"PYTHONPATH": str(NVML_STUB)}
        killed = run_tiny(path, run_dir, "--metrics-port", str(trainer_port), env=faults.env(env, kill_after_step=20))
        assert killed.returncode != 0
        resumed = run_tiny(path, run_dir, "--metrics-port", str(trainer_port), env=env)  # restarts and load metrics
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        time.sleep(2)

        values = {}
        for name in [*STEP_GAUGES, SOURCE_GAUGE[0], *GPU_GAUGES]:
            result = query(url, f'last_over_time({name}{{job="trainer"}}[5m])')
            assert result, f"{name} never reached Prometheus"
            values[name] = [float(r["value"][1]) for r in result]
            assert all(r["metric"]["run"] == "tiny" and r["metric"]["rank"] == "0" for r in result), result
        assert 0 < values["stagerun_loss"][0] < 10
        assert values["stagerun_tokens_seen"][0] > 0 and values["stagerun_tokens_per_second"][0] > 0
        assert 0 < values["stagerun_mfu"][0] < 1
        assert values["stagerun_restarts"][0] >= 1 and values["stagerun_checkpoint_load_seconds"][0] > 0
        assert values["stagerun_checkpoint_save_bytes"][0] > 10_000
        assert values["stagerun_checkpoint_load_bytes"][0] == pytest.approx(
            values["stagerun_checkpoint_save_bytes"][0], rel=0.05
        )
        assert sorted(values["stagerun_gpu_power_watts"]) == [350.0, 351.0]  # the NVML double's two GPUs
        assert values["stagerun_gpu_utilization_ratio"] == [0.87, 0.87]
        phases = {r["metric"]["phase"] for r in query(url, 'stagerun_loss{job="trainer"}[5m]')}
        assert phases <= {"core", "long", "anneal"} and "core" in phases

        restarts = query(url, 'stagerun_operator_restarts_total{job="operator"}')
        assert {r["metric"]["reason"] for r in restarts} >= {"PodFailed"}
        assert query(url, 'stagerun_operator_reconcile_duration_seconds_count{job="operator"} > 0')
        states = {r["metric"]["state"]: float(r["value"][1]) for r in query(url, "stagerun_operator_runs")}
        assert states["Running"] >= 1 and set(states) == {
            "Pending",
            "Queued",
            "Starting",
            "Running",
            "Restarting",
            "Suspending",
            "Suspended",
            "Succeeded",
            "Failed",
        }

        # The trainer has exited, so its series are stale now: look at the dashboard as of its last scrape.
        last_scrape = max(float(series["values"][-1][0]) for series in query(url, 'stagerun_step{job="trainer"}[10m]'))
        empty = [(title, expr) for title, expr in dashboard_queries() if not query(url, expr, at=last_scrape)]
        assert not empty, f"dashboard queries without data: {empty}"
