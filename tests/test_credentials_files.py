"""Object-store credentials as files (issue 19 item 7): the keys the operator mounts from
spec.checkpoint.credentialsSecret become an AWS shared-credentials file that botocore and s3fs really sign with.

The S3 check runs moto's server with authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``: the first requests create
an IAM user and its access key, every later one must be signed with a key moto issued), and the client in a fresh
interpreter whose environment holds no AWS key at all: a write and a read through s3fs succeed with the issued key in
the files, and fail with InvalidAccessKeyId when the files hold another one (so the file is what signs).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagerun.core.credentials import (
    CREDENTIALS_DIR_ENV,
    SHARED_CREDENTIALS_FILE_ENV,
    CredentialsError,
    write_shared_credentials,
)

BUCKET = "stagerun-ckpt"


def mounted(folder: Path, **keys: str) -> Path:
    """A folder as the kubelet projects the Secret's items: one file per key."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in keys.items():
        (folder / key).write_text(value)
    return folder


def env_for(tmp_path: Path, folder: Path) -> dict[str, str]:
    return {CREDENTIALS_DIR_ENV: str(folder), SHARED_CREDENTIALS_FILE_ENV: str(tmp_path / "shm" / "aws-credentials")}


# -- the file --------------------------------------------------------------------------------------------------------
def test_nothing_mounted_writes_nothing(tmp_path):
    assert write_shared_credentials({SHARED_CREDENTIALS_FILE_ENV: str(tmp_path / "c")}) == {}
    assert not (tmp_path / "c").exists()


def test_the_file_holds_the_keys_and_only_its_owner_reads_it(tmp_path):
    folder = mounted(
        tmp_path / "mount",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLE\n",  # `kubectl create secret --from-file` keeps a trailing newline
        AWS_SECRET_ACCESS_KEY="s3cr3t",
        AWS_SESSION_TOKEN="tok",
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_ENDPOINT_URL_S3="http://minio:9000",
        UNRELATED="never read",
    )
    env = env_for(tmp_path, folder)
    env["AWS_DEFAULT_REGION"] = "us-east-2"  # the pod's own setting wins
    exported = write_shared_credentials(env)
    path = Path(env[SHARED_CREDENTIALS_FILE_ENV])
    assert path.read_text() == (
        "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = s3cr3t\naws_session_token = tok\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Settings, not secrets, go to the environment; the keys never do.
    assert exported == {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}


def test_missing_keys_name_the_field_and_the_fix(tmp_path):
    env = env_for(tmp_path, mounted(tmp_path / "mount", AWS_ACCESS_KEY_ID="AKIA"))
    with pytest.raises(CredentialsError, match=r"spec\.checkpoint\.credentialsSecret has no AWS_SECRET_ACCESS_KEY"):
        write_shared_credentials(env)
    env = {CREDENTIALS_DIR_ENV: str(tmp_path / "mount")}
    with pytest.raises(CredentialsError, match=SHARED_CREDENTIALS_FILE_ENV):
        write_shared_credentials(env)
    broken = env_for(tmp_path, mounted(tmp_path / "m2", AWS_ACCESS_KEY_ID="A\nB", AWS_SECRET_ACCESS_KEY="x"))
    with pytest.raises(CredentialsError, match="spans lines"):
        write_shared_credentials(broken)


# -- botocore and s3fs sign with it, against moto with authentication ------------------------------------------------
@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory) -> Iterator[tuple[str, dict]]:
    """(endpoint, an access key moto issued) of a moto server that checks every request's key and signature."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # create_user, put_user_policy, create_access_key
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"moto's server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        anonymous = dict(
            endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        )
        iam = boto3.client("iam", **anonymous)
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint, key
    finally:
        server.terminate()
        server.wait(timeout=30)


CLIENT = textwrap.dedent(
    """
    import json, os, sys
    import botocore.session
    import fsspec
    from stagerun.core.credentials import write_shared_credentials

    os.environ.update(write_shared_credentials(os.environ))  # what `stagerun launch` does before anything else
    credentials = botocore.session.Session().get_credentials()
    result = {"method": credentials.method, "access_key": credentials.access_key}
    try:
        with fsspec.open("s3://%s/runs/demo/step-1/.metadata" % sys.argv[1], "wb") as f:
            f.write(b"committed")
        with fsspec.open("s3://%s/runs/demo/step-1/.metadata" % sys.argv[1], "rb") as f:
            result["read"] = f.read().decode()
    except Exception as exc:
        result["error"] = "%s: %s" % (type(exc).__name__, exc)
    print(json.dumps(result))
    """
)


def run_client(tmp_path: Path, endpoint: str, key_id: str, secret: str) -> dict:
    folder = mounted(
        tmp_path / "mount",
        AWS_ACCESS_KEY_ID=key_id,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    # No AWS key anywhere in the environment, no ~/.aws: only the files can sign.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(env_for(tmp_path, folder), HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, BUCKET], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_s3fs_signs_with_the_mounted_keys(tmp_path, s3_with_auth):
    endpoint, key = s3_with_auth
    result = run_client(tmp_path, endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    assert result["method"] == "shared-credentials-file"
    assert result["access_key"] == key["AccessKeyId"]
    assert result.get("read") == "committed", result


def test_other_keys_in_the_files_are_refused_by_the_store(tmp_path, s3_with_auth):
    endpoint, key = s3_with_auth
    result = run_client(tmp_path, endpoint, "AKIANOTISSUED0000000", key["SecretAccessKey"])
    assert result["method"] == "shared-credentials-file"
    assert "read" not in result, result
    assert result["error"] == "PermissionError: The AWS Access Key Id you provided does not exist in our records."


# -- `stagerun launch` -----------------------------------------------------------------------------------------------
def test_launch_refuses_a_secret_without_the_keys_with_the_field_named(tmp_path, monkeypatch):
    """The pod entrypoint writes the file before anything else; a Secret lacking a required key (the kubelet would
    not even mount it; a hand-made pod could) ends as a permanent InvalidSpec naming the field, not a traceback."""
    import yaml

    from stagerun.core.protocol import TerminationMessage
    from stagerun.core.spec import read_manifest
    from stagerun.trainer import launch

    raw = read_manifest(Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml")
    raw["spec"].update(image="ghcr.io/example/stagerun:0.1")
    raw["spec"]["checkpoint"] = {"path": "s3://bucket/runs/quickstart", "credentialsSecret": "s3-credentials"}
    manifest = tmp_path / "trainingrun.yaml"
    manifest.write_text(yaml.safe_dump(raw))
    termination = tmp_path / "termination-log"
    env = {
        "STAGERUN_MANIFEST": str(manifest),
        "STAGERUN_RUN_DIR": str(tmp_path / "run"),
        "STAGERUN_PHASE_INDEX": "0",
        "STAGERUN_NNODES": "1",
        "STAGERUN_NPROC_PER_NODE": "2",
        "STAGERUN_TERMINATION_LOG": str(termination),
        **env_for(tmp_path, mounted(tmp_path / "mount", AWS_ACCESS_KEY_ID="AKIA")),
    }
    assert launch.launch(env) == launch.EXIT_INVALID
    message = TerminationMessage.from_json(termination.read_text())
    assert message.reason == "InvalidSpec" and message.permanent
    assert "spec.checkpoint.credentialsSecret has no AWS_SECRET_ACCESS_KEY" in message.message
    assert not Path(env[SHARED_CREDENTIALS_FILE_ENV]).exists()
