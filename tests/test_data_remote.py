"""Remote filesystems: tokenize from and to fsspec `memory://` and an S3 API served locally by moto (server mode),
open the result with `TokenShards.open(url)` (copied to a local cache) and read it with the loader."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stagerun.trainer.cli import main
from stagerun.trainer.data import DataError, PackedMixLoader, TokenShards, load_tokenizer, train_tokenizer
from stagerun.trainer.data import tokenize as tokenize_module
from stagerun.trainer.data.tokenize import tokenize

BUCKET = "stagerun-test-data"


def make_docs(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["remote", "bucket", "object", "Grüße", "1234", "def f():\n    pass", "🙂"]
    return [f"{seed}/{i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for i in range(count)]


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def parquet_bytes(docs: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), sink, row_group_size=25)
    return sink.getvalue()


DOCS = {"in/a.jsonl": make_docs(1, 120), "in/b.jsonl": make_docs(2, 80), "in/rows.parquet": make_docs(3, 100)}


def content(name: str) -> bytes:
    return parquet_bytes(DOCS[name]) if name.endswith(".parquet") else jsonl_bytes(DOCS[name])


ALL_DOCS = DOCS["in/a.jsonl"] + DOCS["in/b.jsonl"] + DOCS["in/rows.parquet"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(ALL_DOCS * 2, 350, path)
    return path


@pytest.fixture(scope="module")
def local_reference(tokenizer_path, tmp_path_factory):
    """The same inputs tokenized from a local folder: what every remote run must reproduce."""
    root = tmp_path_factory.mktemp("local")
    for name in DOCS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content(name))
    tokenize(
        [str(root / "in" / "*.jsonl"), str(root / "in" / "rows.parquet")],
        tokenizer_path,
        root / "out",
        processes=1,
        progress=False,
    )
    return TokenShards.open(root / "out")


def assert_same_set(a: TokenShards, b: TokenShards) -> None:
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    assert np.array_equal(a.doc_ends, b.doc_ends)


def decoded(shards: TokenShards, tokenizer) -> list[str]:
    starts = np.concatenate([[0], shards.doc_ends[:-1]])
    return [tokenizer.decode(shards.read(int(a), int(b) - 1).tolist()) for a, b in zip(starts, shards.doc_ends)]


def read_with_loader(shards: TokenShards) -> np.ndarray:
    """Two data-parallel ranks read one step each; their slices together are the one-rank batch."""
    args = dict(phase_index=0, weights={"web": 1.0}, seq_len=32, global_sequences=4, micro_batch_size=2)
    one = PackedMixLoader({"web": shards}, 0).next_step(dp_rank=0, dp_size=1, **args)
    two = [
        mb for rank in range(2) for mb in PackedMixLoader({"web": shards}, 0).next_step(dp_rank=rank, dp_size=2, **args)
    ]
    assert np.array_equal(np.concatenate([mb.inputs for mb in one]), np.concatenate([mb.inputs for mb in two]))
    return np.concatenate([mb.inputs for mb in one])


# --- memory:// ---------------------------------------------------------------------------------------------------


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = "memory://stagerun-remote-test"
    for name in DOCS:
        fs.pipe_file(f"{root}/{name}", content(name))
    yield root
    fs.rm("/stagerun-remote-test", recursive=True)


def test_memory_in_and_out(memory_root, tokenizer_path, local_reference, tmp_path):
    messages = []
    inputs = [f"{memory_root}/in/*.jsonl", f"{memory_root}/in/rows.parquet"]
    result = tokenize(
        inputs, tokenizer_path, f"{memory_root}/out", processes=2, unit_bytes=2048, progress=False, log=messages.append
    )
    assert result.units > 3 and result.processes == 1
    assert any("lives in this process's memory: tokenizing in 1 process" in m for m in messages)
    shards = TokenShards.open(f"{memory_root}/out", cache_dir=tmp_path / "cache")
    assert shards.path.is_relative_to(tmp_path / "cache")
    assert_same_set(shards, local_reference)
    assert decoded(shards, load_tokenizer(tokenizer_path)) == ALL_DOCS
    assert read_with_loader(shards).shape == (4, 32)
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/stagerun-remote-test/out/.stagerun-tokenize")  # the work folder is gone
    assert [i["numDocuments"] for i in result.manifest["tokenize"]["inputs"]] == [200, 100]


def test_memory_tokenizer_train_and_resume(memory_root, tokenizer_path, tmp_path, monkeypatch):
    code = main(
        [
            "tokenizer",
            "train",
            "--input",
            f"{memory_root}/in/*.jsonl",
            "--vocab-size",
            "300",
            "--out",
            f"{memory_root}/tok.json",
            "--no-progress",
        ]
    )
    assert code == 0
    assert load_tokenizer(f"{memory_root}/tok.json").token_to_id("<|endoftext|>") == 0

    real, calls = tokenize_module.run_unit, []

    def interrupted(unit, *args, **kwargs):
        calls.append(unit.key)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "run_unit", interrupted)
    out = f"{memory_root}/out"
    with pytest.raises(KeyboardInterrupt):
        tokenize([f"{memory_root}/in/*.jsonl"], tokenizer_path, out, processes=1, unit_bytes=2048, progress=False)
    with pytest.raises(DataError, match="manifest.json not found: .* is not a complete shard set"):
        TokenShards.open(out, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    result = tokenize([f"{memory_root}/in/*.jsonl"], tokenizer_path, out, processes=1, unit_bytes=2048, progress=False)
    assert result.reused_units == 2
    shards = TokenShards.open(out, cache_dir=tmp_path / "cache")
    assert decoded(shards, load_tokenizer(tokenizer_path)) == DOCS["in/a.jsonl"] + DOCS["in/b.jsonl"]


# --- S3 (moto's server, on 127.0.0.1) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; s3fs (and the spawned tokenize workers) find it through AWS_ENDPOINT_URL_S3."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for name in DOCS:
            client.put_object(Bucket=BUCKET, Key=name, Body=content(name))
        try:
            yield client
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def keys(client, prefix: str) -> list[str]:
    response = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in response.get("Contents", []))


def test_s3_to_s3_with_worker_processes(s3, local_reference, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert (
            main(
                [
                    "tokenizer",
                    "train",
                    "--input",
                    f"s3://{BUCKET}/in/*.jsonl",
                    "--input",
                    f"s3://{BUCKET}/in/rows.parquet",
                    "--vocab-size",
                    "350",
                    "--out",
                    f"s3://{BUCKET}/tok.json",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert "tokens trained on 300 documents" in out.getvalue()
    assert keys(s3, "tok") == ["tok.json"]

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = main(
            [
                "tokenize",
                "--input",
                f"s3://{BUCKET}/in/*.jsonl",
                "--input",
                f"s3://{BUCKET}/in/rows.parquet",
                "--tokenizer",
                f"s3://{BUCKET}/tok.json",
                "--out",
                f"s3://{BUCKET}/tokens/web",
                "--processes",
                "2",
                "--unit-bytes",
                "2K",
                "--no-progress",
            ]
        )
    assert code == 0, out.getvalue()
    assert "2 processes" in out.getvalue() and "tokens/s" in out.getvalue()
    stored = keys(s3, "tokens/web/")
    assert "tokens/web/manifest.json" in stored and not any(".stagerun-tokenize" in k for k in stored)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="tokens/web/manifest.json")["Body"].read())
    assert len(stored) == 1 + 2 * len(manifest["shards"]) and manifest["tokenize"]["units"] > 3

    shards = TokenShards.open(f"s3://{BUCKET}/tokens/web", cache_dir=tmp_path / "cache")
    assert shards.path.is_relative_to(tmp_path / "cache") and shards.source == f"s3://{BUCKET}/tokens/web"
    tokenizer = load_tokenizer(f"s3://{BUCKET}/tok.json")
    assert decoded(shards, tokenizer) == ALL_DOCS
    assert read_with_loader(shards).max() < tokenizer.get_vocab_size()


def test_s3_interrupted_run_resumes(s3, tokenizer_path, local_reference, tmp_path, monkeypatch):
    real, calls = tokenize_module.run_unit, []

    def interrupted(unit, *args, **kwargs):
        calls.append(unit.key)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    inputs = [f"s3://{BUCKET}/in/*.jsonl", f"s3://{BUCKET}/in/rows.parquet"]
    out = f"s3://{BUCKET}/tokens/resumed"
    monkeypatch.setattr(tokenize_module, "run_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize(inputs, tokenizer_path, out, processes=1, unit_bytes=2048, progress=False)
    stored = keys(s3, "tokens/resumed/")
    assert "tokens/resumed/manifest.json" not in stored
    assert sum(".stagerun-tokenize/units/" in k for k in stored) == 3
    with pytest.raises(DataError, match="not a complete shard set"):
        TokenShards.open(out, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    result = tokenize(inputs, tokenizer_path, out, processes=2, unit_bytes=2048, progress=False)
    assert result.reused_units == 3 and result.processes == 2
    assert_same_set(TokenShards.open(out, cache_dir=tmp_path / "cache"), local_reference)


# --- http(s):// --------------------------------------------------------------------------------------------------


def test_http_inputs_are_streamed(tokenizer_path, local_reference, tmp_path):
    """A plain HTTP server need not support range requests: its files are read front to back, never split (and
    a Parquet file is read into memory for its footer)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    for name in DOCS:
        (tmp_path / "www" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "www" / name).write_bytes(content(name))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        inputs = [f"{base}/in/a.jsonl", f"{base}/in/b.jsonl", f"{base}/in/rows.parquet"]
        result = tokenize(inputs, tokenizer_path, tmp_path / "out", processes=2, unit_bytes=1024, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert result.units == 3  # one per file: nothing split
    assert_same_set(TokenShards.open(tmp_path / "out"), local_reference)
