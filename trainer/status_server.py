"""Rank 0's progress endpoint: ``GET /progress`` answers the trainer's latest step as JSON.

The operator polls it (pod IP, port ``STAGERUN_STATUS_PORT``) for the TrainingRun's status columns and as the
heartbeat behind hang detection: ``lastStepAt`` not moving for ``spec.hangTimeout`` means a stuck gang. A plain
stdlib HTTP server in a daemon thread: it must never slow the step loop or outlive the process.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROGRESS_PATH = "/progress"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?")[0] == PROGRESS_PATH:
            body = json.dumps(self.server.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
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

    def __init__(self, address, progress: dict, lock: threading.Lock):
        super().__init__(address, _Handler)
        self._progress, self._lock = progress, lock

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._progress)


class StatusServer:
    """Serves a progress dict; ``update`` replaces fields (thread-safe)."""

    def __init__(self, host: str, port: int):
        self._lock = threading.Lock()
        self._progress: dict = {"state": "starting", "startedAt": time.time(), "lastStepAt": None}
        self._server = _Server((host, port), self._progress, self._lock)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="stagerun-status", daemon=True)
        self._thread.start()

    def update(self, **fields) -> None:
        with self._lock:
            self._progress.update(fields)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
