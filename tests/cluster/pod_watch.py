"""The pods bound to one node, kept current by list-and-watch, as a kubelet's pod source (an informer) does.

`PodWatch(plane, node, on_change)` lists `spec.nodeName=<node>` and then watches from the list's resourceVersion
(with bookmarks), in a thread of its own; after an expired version (410) or a broken connection it lists again.
`pods()` is a snapshot of the pods it knows, `on_change()` is called after every change. It talks to the apiserver
over its own HTTPS connection so that `stop()` can end a watch that is waiting for the next event.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from .control_plane import ApiError, ControlPlane

WATCH_SECONDS = 60  # the server ends each watch after this long; the next one goes on from the last version


class PodWatch:
    def __init__(self, plane: ControlPlane, node: str, on_change: Callable[[], None], log: Callable[[str], None]):
        self.plane, self.node, self.on_change, self.log = plane, node, on_change, log
        self._selector = urllib.parse.quote(f"spec.nodeName={node}")
        self._ssl = ssl.create_default_context(cafile=str(plane.pki.ca_cert))
        self._lock = threading.Lock()
        self._pods: dict[str, dict] = {}  # uid -> the newest version seen
        self._stopping = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"pod-watch-{node}", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._conn is not None and self._conn.sock is not None:
                try:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read; close() alone would not
                except OSError:
                    pass
        self._thread.join(timeout=30)

    def pods(self) -> list[dict]:
        with self._lock:
            return list(self._pods.values())

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                listing = self.plane.request("GET", f"/api/v1/pods?fieldSelector={self._selector}")
                with self._lock:
                    self._pods = {p["metadata"]["uid"]: p for p in listing["items"]}
                self.on_change()
                version = listing["metadata"]["resourceVersion"]
                while version and not self._stopping.is_set():
                    version = self._watch(version)
            except (OSError, http.client.HTTPException, ApiError, ValueError) as exc:
                if not self._stopping.is_set():
                    self.log(f"watch of {self.node} broke ({exc}); listing again")
                    time.sleep(1)

    def _watch(self, version: str) -> str | None:
        """One watch request; the version to go on from, or None to list again."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.plane.api_port, context=self._ssl, timeout=2 * WATCH_SECONDS
        )
        with self._lock:
            if self._stopping.is_set():
                return None
            self._conn = conn
        try:
            path = (
                f"/api/v1/pods?fieldSelector={self._selector}&watch=1&allowWatchBookmarks=true"
                f"&timeoutSeconds={WATCH_SECONDS}&resourceVersion={version}"
            )
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.plane.token}"})
            response = conn.getresponse()
            if response.status != 200:
                raise ApiError(response.status, response.read().decode(errors="replace"), "WATCH", path)
            for line in response:
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":  # a Status, usually 410 Gone: the version is too old
                    return None
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                with self._lock:
                    if kind == "DELETED":
                        self._pods.pop(obj["metadata"]["uid"], None)
                    else:
                        self._pods[obj["metadata"]["uid"]] = obj
                self.on_change()
            return version
        finally:
            with self._lock:
                self._conn = None
            conn.close()
