"""One gang per run (issue 19 item 3): the run lock (a flock locally, a lease object on S3) and gangs that die with
their parent. Real processes throughout: a second process holds the lock, `stagerun run` is refused, and a
`stagerun run` killed with SIGKILL takes torchrun and its workers with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import SAMPLE_BYTES, run_tiny, tiny_run, write_manifest

from stagerun.trainer.gang_life import descendants
from stagerun.trainer.run_lock import LEASE_FILE, LOCK_FILE, RunLocked, acquire

HOLDER = textwrap.dedent(
    """
    import sys, time
    from stagerun.trainer.run_lock import acquire
    lock = acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
    """
)


def hold_lock(url) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(url)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_holder_is_refused_with_the_holder_named_and_a_dead_one_leaves_no_lock(tmp_path):
    holder = hold_lock(tmp_path / "ck")
    try:
        with pytest.raises(RunLocked, match=rf"locked by pid {holder.pid} on host .*\(kill {holder.pid}\)"):
            acquire(str(tmp_path / "ck"))
    finally:
        holder.kill()
        holder.wait()
    lock = acquire(str(tmp_path / "ck"))  # SIGKILL of the holder released it: never stale
    assert (tmp_path / "ck" / LOCK_FILE).exists()
    lock.release()


def test_a_second_stagerun_run_on_the_same_run_fails_at_once(tmp_path):
    manifest = write_manifest(tmp_path / "tiny.yaml", tiny_run())
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir / "checkpoints")
    try:
        started = time.monotonic()
        result = run_tiny(manifest, run_dir)
        assert result.returncode == 1, result.stdout[-3000:]
        assert f"locked by pid {holder.pid}" in result.stdout and "another gang trains it" in result.stdout
        assert "Traceback" not in result.stdout
        assert time.monotonic() - started < 60
        assert not (run_dir / "prepared.json").exists() and not (run_dir / "data").exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()


# --- S3 lease (moto's server, on 127.0.0.1) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_root():
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="runs")
        try:
            yield "s3://runs"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def test_s3_lease_is_exclusive_renewed_released_and_taken_over_only_after_expiry(s3_root):
    url = f"{s3_root}/lease-demo"
    first = acquire(url, ttl=3.0)
    with pytest.raises(
        RunLocked, match=rf"locked by pid {os.getpid()} on host .*lease s3://runs/lease-demo/{LEASE_FILE}"
    ):
        acquire(url, ttl=3.0)
    time.sleep(4.0)  # longer than the ttl: the holder's renewals keep it
    with pytest.raises(RunLocked):
        acquire(url, ttl=3.0)
    first.release()  # deletes the lease
    second = acquire(url, ttl=2.0)
    second._stop.set()  # the holder dies without releasing (kill -9): no more renewals
    with pytest.raises(RunLocked, match="expires within"):
        acquire(url, ttl=2.0)
    third = acquire(url, ttl=3.0, wait_seconds=10.0)  # waits for the expiry, then takes it over
    assert third.holder["owner"] != second.holder["owner"]
    third.release()


def test_s3_lease_holder_notices_a_takeover(s3_root):
    import fsspec

    url = f"{s3_root}/takeover"
    lost = []
    lock = acquire(url, ttl=1.5, on_lost=lambda: lost.append(True))
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"runs/takeover/{LEASE_FILE}", b'{"owner": "someone-else", "pid": 1, "expiresAt": 1e12}')
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lost and lock.lost.is_set()
    lock.release()  # a lost lease is not deleted: it is someone else's now
    assert fs.exists(f"runs/takeover/{LEASE_FILE}")


# --- the gang dies with its parent ----------------------------------------------------------------------------


def test_kill_9_of_stagerun_run_stops_torchrun_and_the_workers(run_dir, tmp_path):
    long_run = tiny_run()
    long_run["spec"]["phases"][0]["tokens"] = "160Ki"
    manifest = write_manifest(tmp_path / "tiny.yaml", long_run)
    cmd = [sys.executable, "-m", "stagerun.trainer.cli", "run", str(manifest), "--run-dir", str(run_dir)]
    parent = subprocess.Popen(
        [*cmd, "--max-source-bytes", str(SAMPLE_BYTES)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    gang = descendants(parent.pid)
    assert len(gang) >= 3, gang  # torchrun and its two workers
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 45  # torchrun got SIGTERM: the workers checkpoint after their step, then exit
    alive = gang
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    assert not alive, f"orphans still running: {alive}"
    deadline, lock = time.monotonic() + 15, None
    while lock is None:  # the lock goes with the last process of the gang: a rerun may start
        try:
            lock = acquire(str(run_dir / "checkpoints"))
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    lock.release()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
