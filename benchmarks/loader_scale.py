"""The data path's growth law (issue 15 item 5): open time, per-process memory and loader throughput of shard sets
of growing document counts, and bytes fetched from an S3 API against the bytes the batches need.

    python benchmarks/loader_scale.py [--docs 10000,1000000] [--huge] [--steps 50] [--s3] [--s3-steps 200]

Each set is generated directly as a stagerun-tokens/v2 set (~16 tokens per document, or ``--doc-tokens``; one shard
per ~128Mi tokens: 8M documents of 16; uint16, hashes computed) in a temporary folder; ``--huge`` adds the
100M-document set (4 GB of disk, minutes to generate). Every measurement runs in a fresh subprocess: open (wall
time), anonymous RSS (RssAnon: the process's own memory, not the page cache that memory-mapped files share) before
open and after ``--steps`` loader steps (seqLen 4096, 64 sequences, dp 8: rank 0's share), and the loader's
tokens/s (this rank's tokens). With ``--s3`` the smallest and the middle set are served by moto on 127.0.0.1 and
read in place, ``--s3-steps`` steps: bytes fetched vs the bytes the process's batches need, and tokens/s at dp 1
(whole blocks read a window ahead) and as rank 0 of dp 8 (only its ranges) against two raw fsspec sequential reads
of as many bytes from the same endpoint, objects cycled: one GET per whole object, and ranged GETs of one block's
bytes (the loader's request size). The second is the fair one on moto, which copies the whole object to serve any
range (an S3 serves a range in the range's time): against whole objects a ranged reader pays object / range times
the bytes on moto alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stagerun.trainer.data.block_order import BLOCK_TOKENS

DOCS_PER_SHARD = 8 << 20
SEQ_LEN, SEQUENCES, DP = 4096, 64, 8


def generate(folder: Path, n_docs: int, seed: int = 0, doc_tokens: int = 16) -> None:
    """A v2 set of ``n_docs`` documents of 2 .. 2 x doc_tokens - 2 tokens (uniform: mean ~doc_tokens)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards = []
    per_shard = max(1, DOCS_PER_SHARD * 16 // doc_tokens)  # ~128Mi tokens per shard, whatever the length
    for i, first in enumerate(range(0, n_docs, per_shard)):
        count = min(per_shard, n_docs - first)
        lengths = rng.integers(2, 2 * doc_tokens - 1, size=count, dtype=np.int64)
        ends = np.cumsum(lengths, dtype="<i8")
        tokens = rng.integers(1, 50_000, size=int(ends[-1]), dtype="<u2")
        tokens[ends - 1] = 0  # EOS closes every document
        names = {"tokens": f"shard-{i:05d}.bin", "index": f"shard-{i:05d}.idx"}
        (folder / names["tokens"]).write_bytes(tokens.tobytes())
        (folder / names["index"]).write_bytes(ends.tobytes())
        shards.append(
            {
                **names,
                "numTokens": int(ends[-1]),
                "numDocuments": count,
                "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                "indexSha256": hashlib.sha256(ends.tobytes()).hexdigest(),
            }
        )
    manifest = {
        "format": "stagerun-tokens/v2",
        "dtype": "uint16",
        "eosId": 0,
        "vocabSize": 50_000,
        "tokenizerSha256": "benchmark",
        "numTokens": sum(s["numTokens"] for s in shards),
        "numDocuments": n_docs,
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


MEASURE = r"""
import json, sys, time
import numpy as np
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from stagerun.trainer.data import PackedMixLoader, TokenShards, remote_io
path, cache, steps, seq, sequences, dp = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
base = anon()
start = time.perf_counter()
shards = TokenShards.open(path, cache_dir=cache, verify="off")
opened = time.perf_counter() - start
loader = PackedMixLoader({"a": shards}, 0)
args = dict(phase_index=0, weights={"a": 1.0}, seq_len=seq, global_sequences=sequences, dp_rank=0, dp_size=dp,
            micro_batch_size=sequences // dp)
loader.next_step(**args)
fetched = remote_io.STATS.bytes_fetched
start = time.perf_counter()
for _ in range(steps):
    loader.next_step(**args)
    loader.state_dict()
seconds = time.perf_counter() - start
tokens = steps * sequences // dp * seq
needed = steps * sequences // dp * (seq + 1) * 2
print(json.dumps({"open": opened, "rss": anon() - base, "tps": tokens / seconds,
                  "fetched": remote_io.STATS.bytes_fetched - fetched, "needed": needed}))
"""

RAW = r"""
import sys, time, fsspec
url, count, request = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fs, root = fsspec.core.url_to_fs(url)
files = sorted(p for p in fs.ls(root) if p.endswith(".bin"))
sizes = {p: fs.size(p) for p in files}
done, i = 0, 0
start = time.perf_counter()
while done < count:
    path = files[i % len(files)]
    if request == 0:  # one GET of the whole object (up to what is still needed)
        done += len(fs.cat_file(path, start=0, end=min(count - done, sizes[path])))
    else:  # the object in order, one ranged GET of `request` bytes after another
        at = 0
        while at < sizes[path] and done < count:
            size = min(request, sizes[path] - at, count - done)
            done += len(fs.cat_file(path, start=at, end=at + size))
            at += size
    i += 1
print(done / 2 / (time.perf_counter() - start))
"""


def measure(path: str, cache: str, steps: int, dp: int = DP) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, path, cache, str(steps), str(SEQ_LEN), str(SEQUENCES), str(dp)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="10000,1000000")
    parser.add_argument("--huge", action="store_true", help="add the 100M-document set")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--s3", action="store_true")
    parser.add_argument("--s3-steps", type=int, default=200)
    parser.add_argument(
        "--doc-tokens",
        type=int,
        default=16,
        help="mean document length (16: the index's growth with few tokens; ~1000: web text, where the per-document "
        "work of the shuffle no longer dominates)",
    )
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.docs.split(",")] + ([100_000_000] if args.huge else [])
    with tempfile.TemporaryDirectory(prefix="loader-scale-") as tmp:
        root = Path(tmp)
        rows = []
        for n in sizes:
            started = time.perf_counter()
            generate(root / f"set-{n}", n, doc_tokens=args.doc_tokens)
            generated = time.perf_counter() - started
            first = measure(str(root / f"set-{n}"), str(root / "cache"), args.steps)  # builds a node index if needed
            warm = measure(str(root / f"set-{n}"), str(root / "cache"), args.steps)
            rows.append((n, generated, first, warm))
        print("| documents | open (first, s) | open (warm, s) | RssAnon growth (MB) | loader tokens/s (rank 0) |")
        print("|---:|---:|---:|---:|---:|")
        for n, _, first, warm in rows:
            rss, tps = warm["rss"] / 1e6, warm["tps"] / 1e6
            print(f"| {n:,} | {first['open']:.3f} | {warm['open']:.3f} | {rss:.1f} | {tps:.1f}M |")
        if args.s3:
            s3_rows(root, sizes[: min(2, len(sizes))], args.s3_steps)
    return 0


def s3_rows(root: Path, sizes: list[int], steps: int) -> None:
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    request = BLOCK_TOKENS * 2  # uint16: the bytes of one block, the loader's read-ahead request
    print(
        "\n| documents (S3) | dp (read) | bytes fetched / needed | loader tokens/s | raw, whole objects "
        f"| ratio to whole | raw, {request >> 20} MiB GETs | ratio to {request >> 20} MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    try:
        for n in sizes:
            for path in sorted((root / f"set-{n}").iterdir()):
                client.upload_file(str(path), "bench", f"set-{n}/{path.name}")
            for dp, read in ((1, "whole blocks"), (DP, "own ranges")):
                # Own ranges: ~1,000 small GETs per step (moto copies the whole object for each): fewer steps.
                result = measure(f"s3://bench/set-{n}", str(root / "s3cache"), steps if dp == 1 else 3, dp)
                raw = [
                    float(
                        subprocess.run(
                            [sys.executable, "-c", RAW, f"s3://bench/set-{n}", str(int(result["needed"])), str(size)],
                            check=True,
                            capture_output=True,
                            text=True,
                        ).stdout.strip()
                    )
                    for size in (0, request)
                ]
                print(
                    f"| {n:,} | {dp} ({read}) | {result['fetched'] / result['needed']:.3f} | "
                    f"{result['tps'] / 1e6:.3g}M | {raw[0] / 1e6:.3g}M | {result['tps'] / raw[0]:.3g} | "
                    f"{raw[1] / 1e6:.3g}M | {result['tps'] / raw[1]:.3g} |",
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
