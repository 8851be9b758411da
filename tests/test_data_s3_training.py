"""Training from remote shard sets with no local copy (issue 15 item 6): the real `stagerun run` (two torchrun
workers) reads the tiny run's shard sets from a real S3 API (moto's server on 127.0.0.1) through a loopback proxy
that counts what it serves and, in the second run, fails some requests with a 503 or a reset connection.

What must hold: no token file is ever fetched whole or copied to the node; every transient error is retried and
counted in the data read-retry metric (``stagerun_data_read_retries``: remote_io.STATS, read by a test callback in
each worker); and the faulty run (reading whole blocks a window ahead) trains on exactly the same tokens, with
exactly the same losses, as the fault-free one (reading only each rank's ranges)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_tiny, tiny_run, write_manifest
from test_data_remote import BUCKET, s3  # noqa: F401 - the moto fixture

from stagerun.trainer.telemetry import read_metrics

STATS_CALLBACK = """
    import atexit, json, os
    from stagerun.trainer.callback_api import Callback
    from stagerun.trainer.data import remote_io

    def dump():
        stats = remote_io.STATS
        path = os.path.join(os.environ["READ_STATS_DIR"], f"rank-{os.environ['RANK']}.json")
        with open(path + ".tmp", "w") as out:
            json.dump({"retries": stats.retries, "requests": stats.requests, "bytes": stats.bytes_fetched}, out)
        os.replace(path + ".tmp", path)

    class DumpReadStats(Callback):
        def on_step(self, record):
            dump()

    def install(trainer):
        # Also at exit: the read-ahead threads (joined before atexit runs) may fetch after the last step.
        atexit.register(dump)
        return [DumpReadStats()]
"""


class FaultyProxy(ThreadingHTTPServer):
    """Forwards every request to moto; counts the token-file GETs it serves; fails every ``fail_every``-th of them
    (alternately a 503 and a reset connection) when ``fail_every`` is set."""

    daemon_threads = True

    def __init__(self, upstream: str, fail_every: int | None = None):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream.removeprefix("http://")
        self.fail_every = fail_every
        self.lock = threading.Lock()
        self.gets = 0  # GETs of .bin objects
        self.bytes_served = 0  # their body bytes
        self.whole = 0  # GETs of .bin objects without a Range header
        self.injected = {"503": 0, "reset": 0}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args):  # quiet
        pass

    def _forward(self) -> None:
        server: FaultyProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        token_get = self.command == "GET" and self.path.split("?")[0].endswith(".bin")
        fault = None
        if token_get:
            with server.lock:
                server.gets += 1
                server.whole += "Range" not in self.headers
                if server.fail_every and server.gets % server.fail_every == 0:
                    fault = "503" if (server.gets // server.fail_every) % 2 else "reset"
                    server.injected[fault] += 1
        if fault == "503":
            error = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        upstream = http.client.HTTPConnection(server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        sent = data[: len(data) // 2] if fault == "reset" else data
        if token_get:
            with server.lock:
                server.bytes_served += len(sent)
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(sent)
        if fault == "reset":
            # The connection drops mid-body (SO_LINGER 0: close() sends a TCP RST). A reset before any response
            # byte would be retried by aiohttp itself on a reused connection, out of stagerun's sight.
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def proxy_factory(s3):  # noqa: F811
    started: list[FaultyProxy] = []

    def start(fail_every: int | None = None) -> FaultyProxy:
        proxy = FaultyProxy(os.environ["AWS_ENDPOINT_URL_S3"], fail_every)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.shutdown()
        proxy.server_close()


@pytest.fixture(scope="module")
def remote_sets(s3, shared_data):  # noqa: F811
    """The tiny run's two shard sets, uploaded; their token files' total size."""
    total = 0
    for name in ("docs", "code"):
        for path in sorted((shared_data / "data" / name).iterdir()):
            if path.is_file():
                s3.put_object(Bucket=BUCKET, Key=f"train/{name}/{path.name}", Body=path.read_bytes())
                total += path.stat().st_size if path.suffix == ".bin" else 0
    return {name: f"s3://{BUCKET}/train/{name}" for name in ("docs", "code")}, total


def train(tmp: Path, shared_data: Path, sources: dict[str, str], proxy: FaultyProxy, **env: str):
    run_dir, cache, stats = tmp / "run", tmp / "cache", tmp / "stats"
    for folder in (run_dir, cache, stats, tmp / "ext"):
        folder.mkdir(parents=True)
    (tmp / "ext" / "read_stats.py").write_text(textwrap.dedent(STATS_CALLBACK))
    (tmp / "ext" / "sitecustomize.py").write_text("import s3fs\n\ns3fs.S3FileSystem.retries = 1\n")
    manifest = tiny_run(
        tokenizer={"path": str(shared_data / "tokenizer.json")},
        data={
            "sources": {
                "docs": {"path": sources["docs"], "weight": 0.6, "format": "tokens"},
                "code": {"path": sources["code"], "weight": 0.4, "format": "tokens"},
            }
        },
    )
    full_env = {
        "AWS_ENDPOINT_URL_S3": proxy.url,
        # Neither botocore nor s3fs (sitecustomize below) retries on its own: every transient error reaches
        # stagerun's retry, and its metric.
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "STAGERUN_CACHE": str(cache),
        "STAGERUN_DATA_VERIFY": "off",  # sampled hashing reads whole shards, on purpose; not what is tested here
        "STAGERUN_DATA_BLOCK_TOKENS": "4096",  # the same block order in both runs, several blocks per set
        "PYTHONPATH": os.pathsep.join([str(tmp / "ext"), os.environ.get("PYTHONPATH", "")]),
        "STAGERUN_CALLBACKS": "read_stats:install",
        "READ_STATS_DIR": str(stats),
        **env,
    }
    result = run_tiny(write_manifest(tmp / "tiny.yaml", manifest), run_dir, env=full_env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert not (run_dir / "data").exists()  # nothing was tokenized or copied into the run
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and not any(p.suffix == ".bin" for p in cached)  # manifests and indexes only
    per_rank = [json.loads(p.read_text()) for p in sorted(stats.glob("rank-*.json"))]
    assert len(per_rank) == 2
    return read_metrics(run_dir / "metrics.jsonl"), per_rank


def test_training_reads_remote_sets_in_place_and_survives_transient_errors(
    remote_sets, shared_data, proxy_factory, tmp_path
):
    sources, token_bytes = remote_sets
    clean = proxy_factory()
    expected, clean_stats = train(tmp_path / "clean", shared_data, sources, clean, STAGERUN_DATA_READ_AHEAD="ranges")
    assert clean.gets > 0 and clean.whole == 0  # every token read was a ranged GET
    assert clean.bytes_served < token_bytes / 4, (clean.bytes_served, token_bytes)
    assert sum(s["retries"] for s in clean_stats) == 0
    assert sum(s["bytes"] for s in clean_stats) == clean.bytes_served  # the metric counts what the store served

    faulty = proxy_factory(fail_every=4)
    metrics, stats = train(tmp_path / "faulty", shared_data, sources, faulty, STAGERUN_DATA_READ_AHEAD="blocks")
    assert faulty.injected["503"] >= 1 and faulty.injected["reset"] >= 1, faulty.injected
    assert faulty.whole == 0 and faulty.bytes_served < token_bytes / 2, (faulty.bytes_served, token_bytes)
    # Every injected failure was retried by stagerun and counted in the metric of the worker that saw it (the
    # launcher's own reads of manifests and indexes are not token GETs).
    assert sum(s["retries"] for s in stats) == sum(faulty.injected.values())
    assert [m["batchChecksum"] for m in metrics] == [m["batchChecksum"] for m in expected]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in expected]
