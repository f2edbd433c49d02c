"""One interface over S3-compatible object stores (MinIO) and the local filesystem.

URIs are ``s3://bucket/key`` for the object store and plain paths for local files. Both go
through :class:`Storage`, so every step of the pipeline works on either.

Guarantees:

* **Atomic writes.** A reader never sees a half-written object. Locally, bytes go to a temporary
  file in the target folder that is renamed into place. On S3, a single PUT or a multipart upload
  is invisible until the server commits it (``CompleteMultipartUpload``); a failed multipart
  upload is aborted, so its parts never become an object.
* **Checksums.** Every object written to S3 carries its sha256 in ``x-amz-meta-sha256``; reads
  verify it and raise :class:`~medseg.core.errors.ChecksumMismatch` on a difference. A caller that
  knows the hash from elsewhere (a manifest, an index) passes it as ``sha256=``: that check
  holds on both backends, and whether or not the object carries metadata (any plain S3 client
  can replace an object without it).
* **Exclusive creation.** :meth:`Storage.create_bytes` writes an object only if none exists
  (S3 ``If-None-Match: *``; locally an atomic hard link), so two writers can never both win.
* **Retries.** What object stores answer under load or mid-restart is retried with bounded
  exponential backoff and jitter for ``retry_seconds``: connection errors and resets, any 5xx
  (``500 InternalError``, ``503 SlowDown``, a proxy's ``502``/``504``, with or without an XML
  body), ``429`` and S3's ``RequestTimeout``. Uploads restart from their source, so a server
  that restarts mid-transfer is survived. After the deadline,
  :class:`~medseg.core.errors.EndpointUnreachable` names the endpoint, the key and the last answer.
  Everything else (access denied, a missing key, a 4xx from a proxy) fails at once.
* **Disk full.** A local write that runs out of space raises :class:`~medseg.core.errors.DiskFull`
  naming the folder, the bytes needed and the bytes free.
* **No secrets in messages.** Errors name the endpoint, bucket and key only.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
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
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from medseg.core.errors import (
    AccessDenied,
    BucketNotFound,
    ChecksumMismatch,
    DiskFull,
    EndpointUnreachable,
    InvalidInput,
    ObjectNotFound,
    StorageError,
)
from medseg.core.settings import StorageSettings

__all__ = ["ObjectInfo", "Storage", "is_s3", "join", "sha256_file", "split_s3", "write_local"]

SHA_META = "sha256"
_CHUNK = 1024 * 1024
_T = TypeVar("_T")
ProgressFn = Callable[[int], None]
log = logging.getLogger(__name__)


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


#: Backoff of :meth:`Storage._retry`: the first pause, and the cap each pause doubles up to.
_FIRST_DELAY = 0.25
_MAX_DELAY = 4.0
#: S3 error codes that mean "try again" whatever their status.
#: S3 error codes of a conditional PUT that found the key taken.
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_RETRY_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}
)


def _status(exc: Exception) -> int | None:
    """The HTTP status carried by a minio SDK error, when it carries one."""
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, S3Error) and exc.response is not None:
        return int(exc.response.status)
    if isinstance(exc, InvalidResponseError):
        # The SDK keeps the status only in a private field (minio 7.2.x; pinned).
        code = getattr(exc, "_code", None)
        return code if isinstance(code, int) else None
    return None


def _retryable(exc: Exception) -> str | None:
    """Why ``exc`` is worth retrying (``"connection"`` or the answer), or ``None`` if not."""
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError):
        return "connection"  # refused, reset, timed out, broken mid-body
    status = _status(exc)
    code = exc.code if isinstance(exc, S3Error) else None
    if code in _RETRY_CODES or (status is not None and (status >= 500 or status == 429)):
        return " ".join(str(x) for x in (status, code) if x is not None)
    return None


@dataclass(frozen=True)
class ObjectInfo:
    """What is known of one stored object.

    Attributes:
        uri: Its full URI or path.
        size: Size in bytes.
        sha256: Recorded sha256 (``None`` in listings, which do not carry metadata).
        etag: The object store's ETag, in S3 listings (a content fingerprint the store keeps).
    """

    uri: str
    size: int
    sha256: str | None = None
    etag: str | None = None


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
        """Run ``fn``; retry what :func:`_retryable` accepts, with backoff, until the deadline."""
        deadline = time.monotonic() + self.settings.retry_seconds
        delay = _FIRST_DELAY
        while True:
            try:
                return fn()
            except ValueError as exc:  # the SDK's check of bucket and object names
                raise StorageError(f"{what} {uri}: {exc}") from None
            except (MinioException, urllib3.exceptions.HTTPError, ConnectionError) as exc:
                answer = _retryable(exc)
                if answer is None:
                    raise self._translate(exc, what, uri) from None
                # Full backoff would synchronise the clients a server just shed: jitter it.
                pause = delay * random.uniform(0.5, 1.0)
                if time.monotonic() + pause > deadline:
                    verb = "unreachable" if answer == "connection" else "still failing"
                    raise EndpointUnreachable(
                        f"{what} {uri}: endpoint {self.endpoint} {verb} after "
                        f"{self.settings.retry_seconds:.0f}s of retries (last: {answer})"
                    ) from None
                log.info("%s %s: %s; retrying in %.2fs", what, uri, answer, pause)
                time.sleep(pause)
                delay = min(delay * 2, _MAX_DELAY)

    def _translate(self, exc: Exception, what: str, uri: str) -> StorageError:
        """A clear, secret-free error for an answer that is not worth retrying."""
        where = f"{what} {uri} at {self.endpoint}"
        if not isinstance(exc, S3Error):
            status = _status(exc)
            got = f"HTTP {status}" if status is not None else type(exc).__name__
            return StorageError(f"{where}: unexpected answer ({got}), not retried")
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
            _atomic_local_write(Path(uri), lambda fh: fh.write(data), len(data))
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

    def create_bytes(self, uri: str, data: bytes) -> bool:
        """Write ``data`` to ``uri`` only if nothing is there yet, atomically.

        Of several writers racing for the same key, exactly one succeeds: S3 checks
        ``If-None-Match: *`` on the server (MinIO and AWS S3 support it); locally the complete
        temporary file is hard-linked into place, which fails if the name exists.

        Returns:
            True if this call created the object, False if one already existed.
        """
        digest = hashlib.sha256(data).hexdigest()
        if not is_s3(uri):
            return _exclusive_local_write(Path(uri), data)
        bucket, key = split_s3(uri)
        client = self._s3()
        # put_object() turns every header it does not know into user metadata, so the
        # conditional PUT goes through the SDK's PutObject call (minio 7.2.x; pinned).
        if not callable(getattr(client, "_put_object", None)):
            raise StorageError(
                f"create {uri}: this minio SDK has no PutObject call with headers; "
                "install the version pyproject.toml pins"
            )
        headers: dict[str, str | list[str] | tuple[str]] = {
            "If-None-Match": "*",
            "Content-Type": "application/octet-stream",
            f"x-amz-meta-{SHA_META}": digest,
        }

        def put() -> bool:
            try:
                client._put_object(bucket, key, data, headers=headers)
            except S3Error as exc:
                if exc.code not in _EXISTS_CODES:
                    raise
                # A retried PUT whose first attempt did land finds its own bytes: still ours.
                return self.stat(uri).sha256 == digest
            return True

        return self._retry("create", uri, put)

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
                    Path(uri),
                    lambda fh: shutil.copyfileobj(_CountingReader(src, progress), fh),
                    size,
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

    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        """Read a whole object, verifying its sha256.

        Args:
            uri: Source URI or path.
            sha256: The hash the caller expects (from a manifest or an index); checked on both
                backends. The hash recorded in the object's metadata is always checked too.

        Raises:
            ObjectNotFound: If there is no such object.
            ChecksumMismatch: If the bytes do not hash to the expected or recorded sha256.
        """
        if not is_s3(uri):
            try:
                data = Path(uri).read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"no such file: {uri}") from None
            self._verify(uri, hashlib.sha256(data).hexdigest(), sha256, None)
            return data
        buf = io.BytesIO()
        self._download(uri, buf, expected=sha256)
        return buf.getvalue()

    def get_json(self, uri: str) -> Any:
        """Read and parse a JSON object."""
        return json.loads(self.get_bytes(uri))

    def get_file(
        self,
        uri: str,
        path: str | Path,
        progress: ProgressFn | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Download ``uri`` to a local file atomically, verifying its sha256.

        Args:
            uri: Source URI or path.
            path: Destination file; it appears only once complete and verified.
            progress: Called with the bytes received so far in the current attempt.
            sha256: The hash the caller expects (see :meth:`get_bytes`).

        Raises:
            ObjectNotFound: If there is no such object.
            ChecksumMismatch: If the bytes do not hash to the expected or recorded sha256;
                nothing is left at ``path`` then.
            DiskFull: If the destination folder has no room for the object.
        """
        dest = Path(path)
        if not is_s3(uri):
            src_path = Path(uri)
            if not src_path.is_file():
                raise ObjectNotFound(f"no such file: {uri}")

            digest = hashlib.sha256()

            def copy(fh: BinaryIO) -> None:
                with open(src_path, "rb") as src:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        digest.update(chunk)
                        fh.write(chunk)
                        if progress is not None:
                            progress(fh.tell())
                self._verify(uri, digest.hexdigest(), sha256, None)

            size = src_path.stat().st_size
            _atomic_local_write(dest, copy, size)
            return ObjectInfo(uri, size, digest.hexdigest())
        info: list[ObjectInfo] = []
        size = self.stat(uri).size  # checked against the free space before the transfer
        _atomic_local_write(
            dest, lambda fh: info.append(self._download(uri, fh, progress, sha256)), size
        )
        return info[0]

    def _verify(self, uri: str, actual: str, expected: str | None, recorded: str | None) -> None:
        """Raise :class:`ChecksumMismatch` if ``actual`` differs from what was expected."""
        for want, source in ((expected, "expected"), (recorded, "recorded")):
            if want and want != actual:
                where = f" at {self.endpoint}" if is_s3(uri) else ""
                raise ChecksumMismatch(
                    f"read {uri}{where}: sha256 {actual[:12]}… does not match the {source} "
                    f"{want[:12]}…"
                )

    def _download(
        self,
        uri: str,
        sink: BinaryIO,
        progress: ProgressFn | None = None,
        expected: str | None = None,
    ) -> ObjectInfo:
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
            self._verify(uri, actual, expected, recorded)
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
            etag = (obj.etag or "").strip('"') or None
            yield ObjectInfo(f"s3://{bucket}/{obj.object_name}", int(obj.size or 0), etag=etag)

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


def write_local(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a local file atomically (see :class:`Storage`; disk full is clear).

    Raises:
        DiskFull: If the folder has no room for ``data``.
    """
    _atomic_local_write(Path(path), lambda fh: fh.write(data), len(data))


def _atomic_local_write(
    dest: Path, write: Callable[[BinaryIO], object], size: int | None = None
) -> None:
    """Write through a temporary file next to ``dest``, then rename it into place.

    Args:
        dest: The final path.
        write: Writes the content to the open temporary file.
        size: Bytes about to be written, when known: checked against the free space first.

    Raises:
        DiskFull: If the folder has no room (before writing when ``size`` is known).
    """
    tmp = _temp_write(dest, write, size)
    try:
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _exclusive_local_write(dest: Path, data: bytes) -> bool:
    """Create ``dest`` with ``data`` unless it exists; True if this call created it."""
    tmp = _temp_write(dest, lambda fh: fh.write(data), len(data))
    try:
        os.link(tmp, dest)  # atomic, fails if dest exists, and dest is complete when it appears
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _temp_write(dest: Path, write: Callable[[BinaryIO], object], size: int | None) -> Path:
    """Write a complete, synced temporary file next to ``dest``; returns its path."""
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if size is not None:
            free = shutil.disk_usage(folder).free
            if size > free:
                raise DiskFull(_disk_full(folder, dest, size, free))
        fd, name = tempfile.mkstemp(prefix=".medseg-tmp-", dir=folder)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(_disk_full(folder, dest, size, None)) from None
        raise
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(_disk_full(folder, dest, size, None)) from None
        raise
    return tmp


def _disk_full(folder: Path, dest: Path, size: int | None, free: int | None) -> str:
    """The message of :class:`DiskFull`: the folder, the file, the space needed and free."""
    if free is None:
        free = shutil.disk_usage(folder).free
    need = f"{size / 2**20:.1f} MiB" if size is not None else "more space"
    return (
        f"no space left in {folder}: writing {dest.name} needs {need}, "
        f"{free / 2**20:.1f} MiB free; free some space or point the folder elsewhere"
    )
