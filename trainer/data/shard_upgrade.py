"""``stagerun tokenize --upgrade DIR_OR_URL``: convert a ``stagerun-tokens/v1`` shard set into v2 in place.

The set is checked first as any reader checks it (``TokenShards.open``: sizes against the manifest, document
ends), then every shard file is hashed and the manifest rewritten with the hashes and the v2 format, atomically
(the manifest is the only file written; a remote one is one PUT). Tokens and index files stay as they are, so the
conversion costs one read of the set. A v2 set is left alone. Convert between runs: a run begun on the v1 set reads
it in another order once it is v2, and its checkpoints then refuse to resume on it (saying so).

The action runs while the command line is parsed (as ``--help`` does), so ``--upgrade`` needs none of the
options ``tokenize`` otherwise requires. This module imports nothing heavy until it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def upgrade_set(path: str | os.PathLike[str], log=lambda message: None) -> tuple[dict, bool]:
    """(the v2 manifest, whether it was converted now) of the shard set at ``path`` (local folder or URL)."""
    import tempfile

    import fsspec

    from stagerun.core import storage

    from .shard_format import FORMAT, FORMAT_V1, HASH_KEYS, MANIFEST, parse_manifest
    from .shard_verify import sha256_of
    from .shards import TokenShards

    shown = str(path)
    fs, root = fsspec.core.url_to_fs(shown.removeprefix("file://"))
    root = root.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="stagerun-upgrade-") as cache:
        TokenShards.open(shown, cache_dir=cache, verify="off")  # a damaged set stops here, naming the file
    manifest = parse_manifest(fs.cat_file(f"{root}/{MANIFEST}"), f"{shown}/{MANIFEST}")
    if manifest["format"] == FORMAT:
        return manifest, False
    assert manifest["format"] == FORMAT_V1
    for i, shard in enumerate(manifest["shards"]):
        for key, field in HASH_KEYS.items():
            with fs.open(f"{root}/{shard[key]}", "rb") as handle:
                shard[field] = sha256_of(iter(lambda: handle.read(8 << 20), b""))
        log(f"hashed shard {i + 1} of {len(manifest['shards'])}: {shard['tokens']}")
    manifest["format"] = FORMAT
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    storage.write_bytes_atomic(fs, f"{root}/{MANIFEST}", data)
    return manifest, True


class UpgradeAction(argparse.Action):
    """``--upgrade DIR_OR_URL``: convert, report, exit (status 1 with the reason when the set is unusable)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .corpora import DataError

        def log(message: str) -> None:
            print(f"upgrade: {message}", file=sys.stderr, flush=True)

        try:
            manifest, converted = upgrade_set(str(values), log)
        except DataError as exc:
            parser.exit(1, f"error: {exc}\n")
        except OSError as exc:
            parser.exit(1, f"error: {values}: {exc}: check the path, its permissions and the storage endpoint\n")
        counts = f"{manifest['numDocuments']:,} documents, {manifest['numTokens']:,} tokens"
        if converted:
            shards = len(manifest["shards"])
            parser.exit(0, f"{values}: converted to {manifest['format']} ({counts} in {shards} shards)\n")
        parser.exit(0, f"{values}: already {manifest['format']}, nothing to do ({counts})\n")
