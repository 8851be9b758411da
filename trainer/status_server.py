"""The trainer's HTTP endpoint: ``GET /progress`` (rank 0's latest step as JSON) and ``GET /metrics`` (Prometheus).

The operator polls /progress (pod IP, port ``STAGERUN_STATUS_PORT``) for the TrainingRun's status columns and as the
heartbeat behind hang detection: ``lastStepAt`` not moving for ``spec.hangTimeout`` means a stuck gang. Prometheus
scrapes /metrics (trainer/metrics.py). A plain stdlib HTTP server in a daemon thread: it must never slow the step
loop or outlive the process.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROGRESS_PATH = "/progress"
METRICS_PATH = "/metrics"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?")[0]
        if path == PROGRESS_PATH and self.server.serves_progress:
            body = json.dumps(self.server.snapshot()).encode()
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

    def log_message(self, format, *args) -> None:  # quiet: one poll every few seconds is not news
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, progress: dict, lock: threading.Lock, registry, serves_progress: bool):
        super().__init__(address, _Handler)
        self._progress, self._lock = progress, lock
        self.registry, self.serves_progress = registry, serves_progress

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._progress)


class StatusServer:
    """Serves a progress dict (``update`` replaces fields, thread-safe) and, given a registry, its metrics."""

    def __init__(self, host: str, port: int, *, registry=None, serves_progress: bool = True):
        self._lock = threading.Lock()
        self._progress: dict = {"state": "starting", "startedAt": time.time(), "lastStepAt": None}
        self._server = _Server((host, port), self._progress, self._lock, registry, serves_progress)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="stagerun-status", daemon=True)
        self._thread.start()

    def update(self, **fields) -> None:
        with self._lock:
            self._progress.update(fields)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
