"""``stagerun tokenize --upgrade``: a stagerun-tokens/v1 set, as the old writer wrote it, converted to v2 in place
(issue 15 item 4), locally and on a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import stagerun
from test_data_remote import BUCKET, s3  # noqa: F401 - the moto fixture

from stagerun.trainer.data import PackedMixLoader, TokenShards

ARGS = dict(phase_index=0, weights={"web": 1.0}, seq_len=32, global_sequences=4, micro_batch_size=2)


def write_v1_set(folder, seed: int = 0) -> list[np.ndarray]:
    """What the v1 writer produced: .bin/.idx pairs and a manifest without hashes (and its ``source`` key)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards, documents = [], []
    for i in range(3):
        docs = [np.append(rng.integers(1, 500, size=int(n)), 0).astype("<u2") for n in rng.integers(1, 40, size=50)]
        documents += docs
        tokens = np.concatenate(docs)
        (folder / f"shard-{i:05d}.bin").write_bytes(tokens.tobytes())
        (folder / f"shard-{i:05d}.idx").write_bytes(np.cumsum([len(d) for d in docs], dtype="<i8").tobytes())
        shards.append(
            {
                "tokens": f"shard-{i:05d}.bin",
                "index": f"shard-{i:05d}.idx",
                "numTokens": len(tokens),
                "numDocuments": len(docs),
            }
        )
    manifest = {
        "format": "stagerun-tokens/v1",
        "dtype": "uint16",
        "eosId": 0,
        "vocabSize": 512,
        "tokenizerSha256": "0" * 64,
        "numTokens": sum(s["numTokens"] for s in shards),
        "numDocuments": sum(s["numDocuments"] for s in shards),
        "shards": shards,
        "source": {"path": "builtin:python-docs"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return documents


def test_upgrade_converts_a_v1_set_in_place(tmp_path):
    folder = tmp_path / "web"
    documents = write_v1_set(folder)
    before = {p.name: p.read_bytes() for p in folder.glob("shard-*")}
    v1 = TokenShards.open(folder)
    assert v1.format == "stagerun-tokens/v1" and v1.order == "permutation"
    state = PackedMixLoader({"web": v1}, 0)
    state.next_step(dp_rank=0, dp_size=1, **ARGS)
    saved = state.state_dict()

    result = stagerun("tokenize", "--upgrade", str(folder))  # none of tokenize's required options
    assert result.returncode == 0, result.stdout
    assert f"{folder}: converted to stagerun-tokens/v2 (" in result.stdout and "in 3 shards" in result.stdout
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*")} == before  # only the manifest changes
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "stagerun-tokens/v2" and manifest["source"] == {"path": "builtin:python-docs"}
    assert all(len(s["sha256"]) == 64 and len(s["indexSha256"]) == 64 for s in manifest["shards"])
    v2 = TokenShards.open(folder, verify="all")  # every hash matches
    assert v2.order == "blocks" and np.array_equal(v2.read(0, v2.num_tokens), np.concatenate(documents))
    with pytest.raises(ValueError, match="converted to v2 reads its documents in another order"):
        PackedMixLoader({"web": v2}, 0).load_state_dict(saved)

    again = stagerun("tokenize", "--upgrade", str(folder))
    assert again.returncode == 0 and "already stagerun-tokens/v2, nothing to do" in again.stdout


def test_upgrade_refuses_a_damaged_set_naming_the_file(tmp_path):
    folder = tmp_path / "web"
    write_v1_set(folder)
    (folder / "shard-00001.bin").write_bytes((folder / "shard-00001.bin").read_bytes()[:-2])
    result = stagerun("tokenize", "--upgrade", str(folder))
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert "error: " in result.stdout and "shard-00001.bin" in result.stdout and "truncated" in result.stdout
    assert json.loads((folder / "manifest.json").read_text())["format"] == "stagerun-tokens/v1"


def test_upgrade_a_remote_set(s3, tmp_path):  # noqa: F811
    folder = tmp_path / "web"
    documents = write_v1_set(folder, seed=1)
    for path in sorted(folder.iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"upgrade/web/{path.name}", Body=path.read_bytes())
    url = f"s3://{BUCKET}/upgrade/web"
    result = stagerun("tokenize", "--upgrade", url)
    assert result.returncode == 0 and f"{url}: converted to stagerun-tokens/v2" in result.stdout, result.stdout
    remote = TokenShards.open(url, cache_dir=tmp_path / "cache", verify="all")
    assert remote.format == "stagerun-tokens/v2"
    assert np.array_equal(remote.read(0, remote.num_tokens), np.concatenate(documents))
