"""One interface over S3-compatible object stores (MinIO) and the local filesystem.

URIs are ``s3://bucket/key`` for the object store and plain paths for local files. Both go
through :class:`Storage`, so every step of the pipeline works on either.

Guarantees:

* **Atomic writes.** A reader never sees a half-written object. Locally, bytes go to a temporary
  file in the target folder that is renamed into place. On S3, a single PUT or a multipart upload
  is invisible until the server commits it (``CompleteMultipartUpload``); a failed multipart
  upload is aborted, so its parts never become an object.
* **Checksums.** Every object written to S3 carries its sha256 in ``x-amz-meta-sha256``; reads
  verify it and raise :class:`~medseg.errors.ChecksumMismatch` on a difference.
* **Retries.** Connection errors and 5xx answers are retried with exponential backoff for
  ``retry_seconds``; uploads restart from their source, so a server that restarts mid-transfer
  is survived. After the deadline, :class:`~medseg.errors.EndpointUnreachable` names the
  endpoint and the key.
* **No secrets in messages.** Errors name the endpoint, bucket and key only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error, ServerError
from minio.helpers import check_bucket_name

from medseg.errors import (
    AccessDenied,
    BucketNotFound,
    ChecksumMismatch,
    EndpointUnreachable,
    InvalidInput,
    ObjectNotFound,
    StorageError,
)
from medseg.settings import StorageSettings

__all__ = ["ObjectInfo", "Storage", "check_name", "is_s3", "join", "sha256_file", "split_s3"]

SHA_META = "sha256"
_CHUNK = 1024 * 1024
_T = TypeVar("_T")
ProgressFn = Callable[[int], None]


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an object in an S3-compatible store."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into bucket and key (key may be empty).

    Raises:
        InvalidInput: If the URI has no bucket, or not a valid bucket name (a ``ValueError``).
    """
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidInput(f"S3 URI has no bucket: {uri!r} (expected s3://BUCKET/KEY)")
    try:
        check_bucket_name(bucket, strict=True)
    except ValueError as exc:
        raise InvalidInput(f"S3 URI {uri!r}: {exc}") from None
    return bucket, key


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """``name``, if it can be one segment of a key (a dataset, model or run name).

    Args:
        kind: What the name names, for the message (``dataset name``, ``run id``…).
        name: Letters, digits, ``.``, ``_`` and ``-``; starts with a letter or digit; ≤ 128.

    Raises:
        InvalidInput: Otherwise: an empty name, a ``/``, a leading ``.`` (also a ``ValueError``).
    """
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128)"
        )
    return name


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with single slashes.

    Raises:
        InvalidInput: If ``base`` is an ``s3://`` URI without a valid bucket.
    """
    if is_s3(base):
        split_s3(base)
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    """What is known of one stored object.

    Attributes:
        uri: Its full URI or path.
        size: Size in bytes.
        sha256: Recorded sha256 (``None`` in listings, which do not carry metadata).
    """

    uri: str
    size: int
    sha256: str | None = None


class _CountingReader(io.RawIOBase):
    """File wrapper that reports bytes read to a progress callback."""

    def __init__(self, fh: BinaryIO, progress: ProgressFn | None):
        self._fh = fh
        self._progress = progress
        self._seen = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._seen += len(data)
        if self._progress is not None and data:
            self._progress(self._seen)
        return data


class Storage:
    """Read and write objects by URI: ``s3://bucket/key`` or a local path.

    Args:
        settings: Connection settings; read from the environment when omitted. Only needed for
            ``s3://`` URIs: local paths work without any.
    """

    def __init__(self, settings: StorageSettings | None = None):
        self.settings = settings or StorageSettings.from_env()
        self._client: Minio | None = None

    # -- connection ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint as shown in messages."""
        return self.settings.display_endpoint()

    def _s3(self) -> Minio:
        if self._client is None:
            try:
                host, secure = self.settings.host_and_secure()
            except ValueError as exc:
                raise StorageError(str(exc)) from None
            s = self.settings
            # One quick connect retry inside urllib3; longer outages are handled by _retry,
            # which can restart a whole upload from its source.
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5, read=120),
                maxsize=16,
                retries=urllib3.Retry(total=1, backoff_factor=0.1),
            )
            self._client = Minio(
                host,
                access_key=s.access_key.get_secret_value() if s.access_key else None,
                secret_key=s.secret_key.get_secret_value() if s.secret_key else None,
                secure=secure,
                region=s.region,
                http_client=http,
            )
        return self._client

    def _retry(self, what: str, uri: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, retrying connection errors and 5xx with backoff until the deadline."""
        deadline = time.monotonic() + self.settings.retry_seconds
        delay = 0.25
        while True:
            try:
                return fn()
            except S3Error as exc:
                raise self._translate(exc, what, uri) from None
            except ValueError as exc:  # the SDK's check of bucket and object names
                raise StorageError(f"{what} {uri}: {exc}") from None
            except (urllib3.exceptions.HTTPError, ServerError, ConnectionError) as exc:
                if time.monotonic() + delay > deadline:
                    raise EndpointUnreachable(
                        f"{what} {uri}: endpoint {self.endpoint} unreachable after "
                        f"{self.settings.retry_seconds:.0f}s of retries ({type(exc).__name__})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def _translate(self, exc: S3Error, what: str, uri: str) -> StorageError:
        where = f"{what} {uri} at {self.endpoint}"
        if exc.code == "NoSuchBucket":
            bucket = split_s3(uri)[0]
            return BucketNotFound(f"{where}: bucket {bucket!r} does not exist")
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            return ObjectNotFound(f"{where}: no such object")
        if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return AccessDenied(f"{where}: access denied ({exc.code})")
        return StorageError(f"{where}: {exc.code}: {exc.message}")

    # -- buckets ------------------------------------------------------------------------

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an ``s3://`` URI if it does not exist (no-op for paths)."""
        if not is_s3(uri):
            Path(uri).mkdir(parents=True, exist_ok=True)
            return
        bucket, _ = split_s3(uri)
        client = self._s3()

        def make() -> None:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)

        self._retry("create bucket", f"s3://{bucket}", make)

    # -- writes -------------------------------------------------------------------------

    def put_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        """Write ``data`` to ``uri`` atomically, recording its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        if not is_s3(uri):
            _atomic_local_write(Path(uri), lambda fh: fh.write(data))
            return ObjectInfo(uri, len(data), digest)
        bucket, key = split_s3(uri)
        client = self._s3()
        self._retry(
            "write",
            uri,
            lambda: client.put_object(
                bucket, key, io.BytesIO(data), len(data), metadata={SHA_META: digest}
            ),
        )
        return ObjectInfo(uri, len(data), digest)

    def put_file(
        self, uri: str, path: str | Path, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Upload a local file to ``uri`` (multipart above ``part_size``), atomically.

        Args:
            uri: Destination URI or path.
            path: Local source file.
            progress: Called with the bytes sent so far in the current attempt.

        Returns:
            The stored object's size and sha256.
        """
        path = Path(path)
        digest = sha256_file(path)
        size = path.stat().st_size
        if not is_s3(uri):
            with open(path, "rb") as src:
                _atomic_local_write(
                    Path(uri), lambda fh: shutil.copyfileobj(_CountingReader(src, progress), fh)
                )
            return ObjectInfo(uri, size, digest)
        bucket, key = split_s3(uri)
        client = self._s3()

        def upload() -> None:
            with open(path, "rb") as src:
                client.put_object(
                    bucket,
                    key,
                    _CountingReader(src, progress),  # type: ignore[arg-type]
                    size,
                    metadata={SHA_META: digest},
                    part_size=self.settings.part_size,
                    num_parallel_uploads=1,
                )

        self._retry("write", uri, upload)
        return ObjectInfo(uri, size, digest)

    def put_json(self, uri: str, obj: Any) -> ObjectInfo:
        """Write ``obj`` as indented, key-sorted JSON."""
        return self.put_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())

    # -- reads --------------------------------------------------------------------------

    def stat(self, uri: str) -> ObjectInfo:
        """Size and recorded sha256 of one object.

        Raises:
            ObjectNotFound: If there is no such object.
        """
        if not is_s3(uri):
            p = Path(uri)
            if not p.is_file():
                raise ObjectNotFound(f"no such file: {uri}")
            return ObjectInfo(uri, p.stat().st_size, None)
        bucket, key = split_s3(uri)
        client = self._s3()
        st = self._retry("stat", uri, lambda: client.stat_object(bucket, key))
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return ObjectInfo(uri, int(st.size or 0), meta.get(f"x-amz-meta-{SHA_META}"))

    def exists(self, uri: str) -> bool:
        """Whether an object (or local file) exists at ``uri``."""
        try:
            self.stat(uri)
        except ObjectNotFound:
            return False
        return True

    def get_bytes(self, uri: str) -> bytes:
        """Read a whole object, verifying its recorded sha256."""
        if not is_s3(uri):
            try:
                return Path(uri).read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"no such file: {uri}") from None
        buf = io.BytesIO()
        self._download(uri, buf)
        return buf.getvalue()

    def get_json(self, uri: str) -> Any:
        """Read and parse a JSON object."""
        return json.loads(self.get_bytes(uri))

    def get_file(
        self, uri: str, path: str | Path, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Download ``uri`` to a local file atomically, verifying its sha256.

        Args:
            uri: Source URI or path.
            path: Destination file; it appears only once complete and verified.
            progress: Called with the bytes received so far in the current attempt.
        """
        dest = Path(path)
        if not is_s3(uri):
            if not Path(uri).is_file():
                raise ObjectNotFound(f"no such file: {uri}")
            with open(uri, "rb") as src:
                _atomic_local_write(
                    dest, lambda fh: shutil.copyfileobj(_CountingReader(src, progress), fh)
                )
            return ObjectInfo(uri, dest.stat().st_size, sha256_file(dest))
        info: list[ObjectInfo] = []
        _atomic_local_write(dest, lambda fh: info.append(self._download(uri, fh, progress)))
        return info[0]

    def _download(self, uri: str, sink: BinaryIO, progress: ProgressFn | None = None) -> ObjectInfo:
        bucket, key = split_s3(uri)
        client = self._s3()

        def fetch() -> ObjectInfo:
            sink.seek(0)
            sink.truncate()
            digest = hashlib.sha256()
            response = client.get_object(bucket, key)
            try:
                recorded = response.headers.get(f"x-amz-meta-{SHA_META}")
                seen = 0
                for chunk in response.stream(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    seen += len(chunk)
                    if progress is not None:
                        progress(seen)
            finally:
                response.close()
                response.release_conn()
            actual = digest.hexdigest()
            if recorded and recorded != actual:
                raise ChecksumMismatch(
                    f"read {uri} at {self.endpoint}: sha256 {actual[:12]}… does not match "
                    f"the recorded {recorded[:12]}…"
                )
            return ObjectInfo(uri, seen, actual)

        return self._retry("read", uri, fetch)

    # -- listing and deletion -----------------------------------------------------------

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under the folder ``prefix`` (recursively), sorted by URI."""
        if not is_s3(prefix):
            root = Path(prefix)
            if root.is_file():
                yield ObjectInfo(str(root), root.stat().st_size)
                return
            if not root.is_dir():
                return
            for p in sorted(q for q in root.rglob("*") if q.is_file()):
                if not p.name.startswith(".medseg-tmp-"):
                    yield ObjectInfo(str(p), p.stat().st_size)
            return
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"  # a prefix is a folder: runs/1 must not match runs/10
        client = self._s3()
        objects = self._retry(
            "list", prefix, lambda: list(client.list_objects(bucket, prefix=key, recursive=True))
        )
        for obj in sorted(objects, key=lambda o: o.object_name or ""):
            yield ObjectInfo(f"s3://{bucket}/{obj.object_name}", int(obj.size or 0))

    def delete(self, uri: str) -> None:
        """Delete one object; deleting a missing one is not an error."""
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        client = self._s3()
        self._retry("delete", uri, lambda: client.remove_object(bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        if not is_s3(prefix):
            items = list(self.list(prefix))
            if Path(prefix).is_dir():
                shutil.rmtree(prefix)
            return len(items)
        bucket, _ = split_s3(prefix)
        keys = [split_s3(o.uri)[1] for o in self.list(prefix)]
        client = self._s3()

        def remove() -> None:
            errors = list(client.remove_objects(bucket, (DeleteObject(k) for k in keys)))
            if errors:
                raise StorageError(
                    f"delete {prefix} at {self.endpoint}: {len(errors)} objects not deleted, "
                    f"first: {errors[0].name}: {errors[0].message}"
                )

        self._retry("delete", prefix, remove)
        return len(keys)


def _atomic_local_write(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file next to ``dest``, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".medseg-tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
