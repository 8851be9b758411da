"""The trainer's HTTP endpoint: ``GET /progress`` (rank 0's latest step as JSON) and ``GET /metrics`` (Prometheus).

The operator polls /progress (pod IP, port ``STAGERUN_STATUS_PORT``) for the TrainingRun's status columns and as the
heartbeat behind hang detection: ``lastStepAt`` not moving for ``spec.hangTimeout`` means a stuck gang. Prometheus
scrapes /metrics (trainer/metrics.py). A plain stdlib HTTP server in a daemon thread: it must never slow the step
loop or outlive the process.
"""

from __future__ import annotations

import dataclasses
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stagerun.core.protocol import CheckpointRef, Progress

PROGRESS_PATH = Progress.PATH
METRICS_PATH = "/metrics"
# /progress key -> Progress attribute, for update(**fields) given the JSON names.
_ATTRIBUTE = {str(f.metadata.get("json", f.name)): f.name for f in dataclasses.fields(Progress)}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?")[0]
        if path == PROGRESS_PATH and self.server.serves_progress:
            body = self.server.snapshot().to_json().encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        elif path == METRICS_PATH and self.server.registry is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest(self.server.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
        else:
            body = b"not found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one poll every few seconds is not news
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: StatusServer, registry: Any, serves_progress: bool) -> None:
        super().__init__(address, _Handler)
        self.snapshot = owner.snapshot
        self.registry, self.serves_progress = registry, serves_progress


class StatusServer:
    """Serves a ``Progress`` (``publish`` or ``update`` replace it, thread-safe) and, given a registry, its metrics."""

    def __init__(self, host: str, port: int, *, registry: Any = None, serves_progress: bool = True) -> None:
        self._lock = threading.Lock()
        self._progress = Progress()
        self._server = _Server((host, port), self, registry, serves_progress)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="stagerun-status", daemon=True)
        self._thread.start()

    def publish(self, progress: Progress) -> None:
        """Serve a copy of ``progress`` from now on (the caller may go on changing its own)."""
        with self._lock:
            self._progress = dataclasses.replace(progress)

    def update(self, **fields: Any) -> None:
        """Replace the fields given under their /progress (JSON) names, e.g. ``update(step=10, lastStepAt=t)``."""
        changes = {_ATTRIBUTE[key]: value for key, value in fields.items()}
        if isinstance(changes.get("last_checkpoint"), dict):
            changes["last_checkpoint"] = CheckpointRef(**changes["last_checkpoint"])
        with self._lock:
            self._progress = dataclasses.replace(self._progress, **changes)

    def snapshot(self) -> Progress:
        with self._lock:
            return self._progress

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
