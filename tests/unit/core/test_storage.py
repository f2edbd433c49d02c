"""Storage against a real MinIO server on loopback, and on the local filesystem."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest

from medseg.apps.minio_server import MinioServer, free_port
from medseg.core.errors import (
    AccessDenied,
    BucketNotFound,
    ChecksumMismatch,
    EndpointUnreachable,
    ObjectNotFound,
)
from medseg.core.settings import StorageSettings
from medseg.core.storage import Storage, join, split_s3

MiB = 1024 * 1024


@pytest.fixture(params=["s3", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("bucket")
    return str(tmp_path / "store")


@pytest.fixture
def any_storage(storage: Storage) -> Storage:
    return storage


def _big_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_bytes_round_trip_and_listing(any_storage: Storage, root: str) -> None:
    s = any_storage
    a, b = join(root, "x", "a.bin"), join(root, "x", "sub", "b.json")
    info = s.put_bytes(a, b"hello")
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest()
    s.put_json(b, {"k": [1, 2]})
    assert s.get_bytes(a) == b"hello"
    assert s.get_json(b) == {"k": [1, 2]}
    assert s.exists(a) and not s.exists(join(root, "x", "nope"))
    s.put_bytes(join(root, "xy", "other"), b"not under x/")
    assert [o.uri for o in s.list(join(root, "x"))] == [a, b]
    assert s.stat(a).size == 5
    s.delete(a)
    assert not s.exists(a)
    s.delete(a)  # deleting a missing object is fine
    assert s.delete_prefix(join(root, "x")) == 1
    assert list(s.list(join(root, "x"))) == []


def test_missing_object(any_storage: Storage, root: str) -> None:
    with pytest.raises(ObjectNotFound):
        any_storage.get_bytes(join(root, "missing"))


def test_multipart_upload_and_download(
    minio_server: MinioServer, bucket: str, tmp_path: Path
) -> None:
    s = Storage(minio_server.settings(part_size=5 * MiB))
    src = _big_file(tmp_path / "big.bin", 12 * MiB + 123)
    seen: list[int] = []
    info = s.put_file(join(bucket, "big.bin"), src, progress=seen.append)
    assert seen[-1] == src.stat().st_size
    # A real multipart object: S3 etags of multipart uploads end in -<number of parts>.
    b, key = split_s3(join(bucket, "big.bin"))
    assert s._s3().stat_object(b, key).etag.endswith("-3")
    assert s.stat(join(bucket, "big.bin")).sha256 == info.sha256
    out = s.get_file(join(bucket, "big.bin"), tmp_path / "out" / "big.bin")
    assert out.sha256 == info.sha256
    assert (tmp_path / "out" / "big.bin").read_bytes() == src.read_bytes()


def test_checksum_verified_on_read(storage: Storage, bucket: str, tmp_path: Path) -> None:
    # An object whose recorded sha256 does not match its bytes (bit rot, a foreign writer).
    b, key = split_s3(join(bucket, "tampered"))
    storage._s3().put_object(b, key, io.BytesIO(b"actual bytes"), 12, metadata={"sha256": "0" * 64})
    with pytest.raises(ChecksumMismatch, match="tampered"):
        storage.get_bytes(join(bucket, "tampered"))
    with pytest.raises(ChecksumMismatch):
        storage.get_file(join(bucket, "tampered"), tmp_path / "t")
    assert not (tmp_path / "t").exists()  # nothing half-written locally either


class _Interrupted(Exception):
    pass


def _interrupt_after(limit: int):
    def progress(sent: int) -> None:
        if sent > limit:
            raise _Interrupted(f"interrupted after {sent} bytes")

    return progress


def test_interrupted_upload_leaves_no_object(
    minio_server: MinioServer, bucket: str, tmp_path: Path
) -> None:
    s = Storage(minio_server.settings(part_size=5 * MiB))
    src = _big_file(tmp_path / "big.bin", 15 * MiB)
    uri = join(bucket, "partial.bin")
    s.put_bytes(uri, b"previous version")
    with pytest.raises(_Interrupted):
        s.put_file(uri, src, progress=_interrupt_after(7 * MiB))
    # The previous version is intact; no part of the new one is visible or left pending.
    assert s.get_bytes(uri) == b"previous version"
    b, key = split_s3(uri)
    pending = s._s3()._list_multipart_uploads(b, prefix=key)
    assert list(pending.uploads) == []


def test_interrupted_local_write_leaves_nothing(tmp_path: Path) -> None:
    s = Storage(StorageSettings())
    src = _big_file(tmp_path / "src.bin", 3 * MiB)
    dest = tmp_path / "store" / "dest.bin"
    with pytest.raises(_Interrupted):
        s.put_file(str(dest), src, progress=_interrupt_after(MiB))
    assert not dest.exists()
    assert list((tmp_path / "store").iterdir()) == []


def test_missing_bucket_is_named(storage: Storage, minio_server: MinioServer) -> None:
    with pytest.raises(BucketNotFound) as err:
        storage.put_bytes("s3://no-such-bucket-here/k", b"x")
    msg = str(err.value)
    assert "no-such-bucket-here" in msg and minio_server.endpoint in msg


def test_denied_access_names_no_secret(minio_server: MinioServer, bucket: str) -> None:
    bad_secret = "definitely-wrong-secret-123"
    s = Storage(minio_server.settings(secret_key=bad_secret))
    with pytest.raises(AccessDenied) as err:
        s.get_bytes(join(bucket, "k"))
    msg = str(err.value)
    assert minio_server.endpoint in msg and "k" in msg
    assert bad_secret not in msg and minio_server.access_key not in msg
    assert bad_secret not in repr(s.settings)


def test_unreachable_endpoint_is_a_clear_error() -> None:
    port = free_port()  # nothing listens here
    s = Storage(
        StorageSettings(
            endpoint=f"http://127.0.0.1:{port}",
            access_key="a",
            secret_key="secret-value",
            retry_seconds=1,
        )
    )
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachable) as err:
        s.get_bytes("s3://bkt/some/key")
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "s3://bkt/some/key" in msg and "secret" not in msg


def _restart_later(server: MinioServer, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), server.start()))
    thread.start()
    return thread


def test_upload_survives_server_restart_mid_transfer(
    own_minio: MinioServer, tmp_path: Path
) -> None:
    s = Storage(own_minio.settings(part_size=5 * MiB, retry_seconds=60))
    s.ensure_bucket("s3://restart")
    src = _big_file(tmp_path / "big.bin", 16 * MiB)
    restarts: list[threading.Thread] = []

    def progress(sent: int) -> None:
        # First attempt only: the server dies after 6 MiB and comes back 1.5 s later.
        if sent > 6 * MiB and not restarts:
            own_minio.kill()
            restarts.append(_restart_later(own_minio, 1.5))

    info = s.put_file("s3://restart/big.bin", src, progress=progress)
    restarts[0].join()
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert s.get_bytes("s3://restart/big.bin") == src.read_bytes()


def test_download_survives_server_restart(own_minio: MinioServer, tmp_path: Path) -> None:
    s = Storage(own_minio.settings(retry_seconds=60))
    s.ensure_bucket("s3://restart")
    s.put_bytes("s3://restart/k", b"payload" * 1000)
    own_minio.kill()
    thread = _restart_later(own_minio, 1.5)
    assert s.get_bytes("s3://restart/k") == b"payload" * 1000
    thread.join()


def test_server_that_stays_away_gives_clear_error(own_minio: MinioServer) -> None:
    s = Storage(own_minio.settings(retry_seconds=2))
    s.ensure_bucket("s3://gone")
    own_minio.kill()
    with pytest.raises(EndpointUnreachable, match="unreachable after"):
        s.put_bytes("s3://gone/k", b"x")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "minio.env"
    env_file.write_text("S3_ENDPOINT=http://127.0.0.1:1234\nAWS_ACCESS_KEY_ID=fromfile\n")
    monkeypatch.setenv("MEDSEG_ENV_FILE", str(env_file))
    for var in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "S3_USE_HTTPS", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(var, raising=False)
    s = StorageSettings.from_env()
    assert s.host_and_secure() == ("127.0.0.1:1234", False)
    assert s.access_key is not None and s.access_key.get_secret_value() == "fromfile"
    # Real environment variables win over the file; KServe's host:port + S3_USE_HTTPS form.
    monkeypatch.setenv("S3_ENDPOINT", "minio.svc:9000")
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    assert StorageSettings.from_env().host_and_secure() == ("minio.svc:9000", False)


def test_minio_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A SIGKILLed owner (no ``finally`` runs) does not leave its MinIO behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from medseg.apps.minio_server import MinioServer\n"
        "s = MinioServer(sys.argv[1]).start()\n"
        "print(s._proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    minio_pid = int(owner.stdout.readline())
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(minio_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(minio_pid, signal.SIGKILL)
        raise AssertionError("MinIO outlived its owner")


# -- retries of what stores and proxies answer under load (a real MinIO behind a proxy) ----------

RETRYABLE = ["slowdown", "internal", "bad-gateway", "gateway-timeout", "reset"]


@pytest.mark.parametrize("fault", RETRYABLE)
def test_transient_answers_are_retried_until_they_pass(
    minio_server: MinioServer, bucket: str, fault: str
) -> None:
    from tests.unit.core.faulty_proxy import faulty_proxy

    with faulty_proxy(minio_server.endpoint) as (endpoint, plan):
        s = Storage(minio_server.settings(endpoint=endpoint, retry_seconds=30))
        uri = join(bucket, f"retry-{fault}")
        plan.fault, plan.times = fault, 3
        s.put_bytes(uri, b"payload under load")
        assert (plan.injected, plan.forwarded) == (3, 1)  # three faults, then the real PUT
        plan.injected = plan.forwarded = 0
        assert s.get_bytes(uri) == b"payload under load"
        assert (plan.injected, plan.forwarded) == (3, 1)


@pytest.mark.parametrize(
    ("fault", "shown"), [("forbidden-html", "HTTP 403"), ("invalid-argument", "InvalidArgument")]
)
def test_other_answers_fail_at_once_and_clearly(
    minio_server: MinioServer, bucket: str, fault: str, shown: str
) -> None:
    from medseg.core.errors import StorageError
    from tests.unit.core.faulty_proxy import faulty_proxy

    with faulty_proxy(minio_server.endpoint) as (endpoint, plan):
        s = Storage(minio_server.settings(endpoint=endpoint, retry_seconds=30))
        plan.fault, plan.times = fault, 100
        with pytest.raises(StorageError) as err:
            s.get_bytes(join(bucket, "k"))
        assert plan.injected == 1  # not retried
        msg = str(err.value)
        assert shown in msg and endpoint in msg and join(bucket, "k") in msg
        assert minio_server.secret_key not in msg
        assert type(err.value) is StorageError  # a MedsegError: the CLI prints one line


def test_a_store_that_keeps_shedding_load_gives_a_clear_error(
    minio_server: MinioServer, bucket: str
) -> None:
    from tests.unit.core.faulty_proxy import faulty_proxy

    with faulty_proxy(minio_server.endpoint) as (endpoint, plan):
        s = Storage(minio_server.settings(endpoint=endpoint, retry_seconds=1.5))
        plan.fault, plan.times = "slowdown", 10_000
        with pytest.raises(EndpointUnreachable, match=r"still failing .* \(last: 503 SlowDown\)"):
            s.put_bytes(join(bucket, "k"), b"x")
        assert 2 <= plan.injected < 20  # backed off: a few tries, not a busy loop


# -- checksums the caller knows (manifest, index), exclusive creation, disk full ----------------


def test_expected_checksum_is_verified_without_metadata(
    storage: Storage, root: str, tmp_path: Path
) -> None:
    uri = join(root, "case.npz")
    good = storage.put_bytes(uri, b"the right case").sha256
    # Replaced by a writer that records no checksum (any S3 client, or a plain file copy).
    if uri.startswith("s3://"):
        b, key = split_s3(uri)
        storage._s3().put_object(b, key, io.BytesIO(b"another case"), 12)
    else:
        Path(uri).write_bytes(b"another case")
    with pytest.raises(ChecksumMismatch, match=r"case\.npz"):
        storage.get_bytes(uri, sha256=good)
    with pytest.raises(ChecksumMismatch, match="expected"):
        storage.get_file(uri, tmp_path / "out" / "case.npz", sha256=good)
    assert not (tmp_path / "out" / "case.npz").exists()


def test_create_is_exclusive(storage: Storage, root: str) -> None:
    uri = join(root, "models", "m", "v1", "claim.json")
    assert storage.create_bytes(uri, b"first") is True
    assert storage.create_bytes(uri, b"second") is False
    assert storage.get_bytes(uri) == b"first"
    assert storage.stat(uri).size == 5


def test_disk_full_is_a_clear_error(storage: Storage, bucket: str, tiny_disk: Path) -> None:
    from medseg.core.errors import DiskFull

    big = os.urandom(2 * MiB)
    storage.put_bytes(join(bucket, "big"), big)
    dest = tiny_disk / "cache" / "big"
    with pytest.raises(DiskFull) as err:
        storage.get_file(join(bucket, "big"), dest)
    msg = str(err.value)
    assert str(tiny_disk / "cache") in msg and "needs 2.0 MiB" in msg and "MiB free" in msg
    with pytest.raises(DiskFull, match=r"needs 2\.0 MiB"):
        storage.put_bytes(str(tiny_disk / "local" / "big"), big)
    assert [p.name for p in tiny_disk.rglob("*") if p.is_file()] == []  # nothing half-written
