"""Object-store credentials as files: what the operator mounts from ``spec.checkpoint.credentialsSecret``, and the
AWS shared-credentials file the pod entrypoint (``stagerun launch``) writes from it.

Why files and not environment variables: a Secret loaded whole with ``envFrom`` puts every key of it (whatever else
the Secret holds) into the environment of every process of the pod, where crash reports, ``/proc/<pid>/environ``
and any subprocess inherit it. Instead the operator mounts a read-only projected volume with only the keys below;
botocore (and so s3fs, through aiobotocore) cannot read a key from a file of its own, but it reads an AWS
shared-credentials file named by ``AWS_SHARED_CREDENTIALS_FILE``, so the entrypoint writes one (mode 0600, on the
pod's memory-backed ``/dev/shm``) from the mounted keys. The file's *path* is in the environment, never a key.

The non-secret settings an S3-compatible store needs (region, endpoint) may sit in the same Secret, as the examples
always had them; they are mounted too and exported as environment variables, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .protocol import PodEnv

# Where the operator mounts the keys (read-only) and where the entrypoint writes the shared-credentials file; both
# reach the pod as environment variables so that a pod run as local processes (the tests' process kubelet) can
# relocate them.
CREDENTIALS_VOLUME = "credentials"
CREDENTIALS_MOUNT = "/var/run/secrets/stagerun/credentials"
CREDENTIALS_DIR_ENV = PodEnv.CREDENTIALS_DIR
SHARED_CREDENTIALS_FILE_ENV = "AWS_SHARED_CREDENTIALS_FILE"
SHARED_CREDENTIALS_FILE = "/dev/shm/stagerun/aws-credentials"

# Keys the Secret must hold (the volume does not mount without them: the pod stays ContainerCreating with the
# missing key named in its Events) and keys it may hold.
REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)
# Not secrets: exported as environment variables when present.
SETTING_KEYS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# The shared-credentials file's names for the secret keys (botocore's profile keys).
_PROFILE_KEYS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


VOLUME_MOUNT = {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_MOUNT, "readOnly": True}


def projected_volume(secret: str) -> dict:
    """The pod volume (stagerun.operator.builders) with only the keys above of the Secret, as files: the rest of
    the Secret stays out of the pod. Required keys missing: the kubelet does not mount it and its Events say which."""

    def items(keys: tuple[str, ...]) -> list[dict]:
        return [{"key": key, "path": key} for key in keys]

    return {
        "name": CREDENTIALS_VOLUME,
        "projected": {
            "sources": [
                {"secret": {"name": secret, "items": items(REQUIRED_KEYS)}},
                {"secret": {"name": secret, "items": items(OPTIONAL_SECRET_KEYS + SETTING_KEYS), "optional": True}},
            ]
        },
    }


class CredentialsError(ValueError):
    """The mounted credentials cannot be used (a missing or malformed key)."""


def write_shared_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """When the operator mounted credentials (``STAGERUN_CREDENTIALS_DIR``), write the AWS shared-credentials file
    at ``AWS_SHARED_CREDENTIALS_FILE`` from them; returns the environment variables to add (the settings keys that
    are present and not set already). Nothing mounted: ``{}``, nothing written."""
    folder = env.get(CREDENTIALS_DIR_ENV)
    if not folder:
        return {}
    target = env.get(SHARED_CREDENTIALS_FILE_ENV)
    if not target:
        raise CredentialsError(
            f"{CREDENTIALS_DIR_ENV} is set but {SHARED_CREDENTIALS_FILE_ENV} is not: the pod was not made by this "
            "operator version; recreate the TrainingRun's attempt (delete its pods)"
        )
    values = _read_keys(Path(folder), REQUIRED_KEYS + OPTIONAL_SECRET_KEYS + SETTING_KEYS)
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise CredentialsError(
            f"the Secret of spec.checkpoint.credentialsSecret has no {' or '.join(missing)} (mounted at {folder}): "
            f"add {', '.join(REQUIRED_KEYS)} to it"
        )
    lines = ["[default]"]
    for key, profile_key in _PROFILE_KEYS.items():
        if key in values:
            if "\n" in values[key] or "\r" in values[key]:
                raise CredentialsError(f"key {key} of the Secret of spec.checkpoint.credentialsSecret spans lines")
            lines.append(f"{profile_key} = {values[key]}")
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 before anything is written: the keys are never readable by another user, even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    return {key: values[key] for key in SETTING_KEYS if key in values and not env.get(key)}


def _read_keys(folder: Path, keys: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for key in keys:
        try:
            text = (folder / key).read_text()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"cannot read the mounted credential {folder / key}: {exc}") from None
        value = text.strip()  # a trailing newline is what `kubectl create secret --from-file` often leaves
        if value:
            values[key] = value
    return values
