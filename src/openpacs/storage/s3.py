"""S3-compatible object store (boto3): ``s3://bucket/prefix`` as the primary blob store or as the cold tier.

Durability: :meth:`S3BlobStore.put` returns only once the server answered 200 to the PUT (or to the
CompleteMultipartUpload of a large blob); for an object store that answer is the durability point, so the group
commit's :meth:`sync_pending` has nothing left to do. Keys have the filesystem store's shape (the UTC hour, then 32
random hex digits), are chosen here and never derive from DICOM content; the object name is ``prefix + key``.
Blobs above ``multipart_threshold`` go up as a multipart upload (aborted on failure, so no part is left billed);
reads with a range are ranged GETs, so a frame or a header costs only its bytes.

Every S3 or connection error surfaces as :class:`OSError` (missing objects as :class:`FileNotFoundError`), which is
what the callers of a blob store already handle (ingest answers 0xA700, retrieval a failure, ``/readyz`` not ready).
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from .base import StoredBlob

MULTIPART_THRESHOLD = 8 << 20
PART_SIZE = 8 << 20  # S3 wants parts of at least 5 MiB but the last


def _boto() -> tuple[Any, Any, Any]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    return boto3, Config, (BotoCoreError, ClientError)


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, max_pool: int = 64,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE) -> None:
        if not bucket:
            raise ValueError("an s3:// storage URL names a bucket: s3://bucket/prefix")
        boto3, Config, errors = _boto()
        self._errors = errors
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.multipart_threshold = max(multipart_threshold, 5 << 20)
        self.part_size = max(part_size, 5 << 20)
        config = Config(max_pool_connections=max(1, max_pool), retries={"max_attempts": 5, "mode": "standard"},
                        connect_timeout=10, read_timeout=60,
                        # no CRC32 of every body on top of the SigV4 payload hash (and the server's MD5): the tier
                        # move verifies SHA-256 on read-back; ingest stores its own SHA-256 in the index
                        request_checksum_calculation="when_required", response_checksum_validation="when_required",
                        s3={"addressing_style": "path" if endpoint_url else "auto"})
        # credentials: explicit settings, else boto3's usual chain (AWS_ACCESS_KEY_ID ..., ~/.aws, instance roles)
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                                     aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
                                     config=config)
        self._stale_uploads_checked = False

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    # -- keys ---------------------------------------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        if len(key) != 42 or not key[:10].isdigit() or not all(c in "0123456789abcdef" for c in key[10:]):
            raise KeyError(f"invalid blob key {key!r}")
        return self.prefix + key

    def _oserror(self, e: Exception, key: str = "") -> OSError:
        code = ""
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"blob {key} not in s3://{self.bucket}/{self.prefix}")
        return OSError(f"s3://{self.bucket}/{self.prefix}{key}: {e}")

    # -- writing ------------------------------------------------------------------------------------------------------
    def put(self, chunks: list[bytes | memoryview]) -> StoredBlob:
        key = time.strftime("%Y%m%d%H", time.gmtime()) + uuid.uuid4().hex
        name = self._name(key)
        size = sum(len(c) for c in chunks)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            if size > self.multipart_threshold:
                self._multipart(name, memoryview(data))
            else:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))
        except self._errors as e:
            raise self._oserror(e, key) from e
        return StoredBlob(key=key, size=size)

    def _multipart(self, name: str, data: memoryview) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            parts = []
            for n, off in enumerate(range(0, len(data), self.part_size), start=1):
                r = self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=n,
                                            Body=bytes(data[off : off + self.part_size]))
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
            except Exception:  # noqa: S110 - best effort; clean_temp aborts leftovers
                pass
            raise

    def sync_pending(self) -> None:
        """Nothing to do: a blob is durable when its PUT was answered."""

    # -- reading ------------------------------------------------------------------------------------------------------
    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        name = self._name(key)
        if end is not None and end <= start:
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if start or end is not None:
            args["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            body = self.client.get_object(**args)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except self._errors as e:
            if _code(e) == "InvalidRange":  # start at or past the end, as a file read there: nothing
                return b""
            raise self._oserror(e, key) from e

    def stream(self, key: str, start: int = 0, end: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        name = self._name(key)
        if end is not None and end <= start:
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if start or end is not None:
            args["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            body = self.client.get_object(**args)["Body"]
        except self._errors as e:
            if _code(e) == "InvalidRange":
                return
            raise self._oserror(e, key) from e
        try:
            while True:
                try:
                    b = body.read(chunk)
                except self._errors as e:
                    raise self._oserror(e, key) from e
                if not b:
                    return
                yield b
        finally:
            body.close()

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except self._errors as e:
            raise self._oserror(e, key) from e

    def open(self, key: str, buffer: int = 256 << 10) -> RangedReader:
        """A seekable file object over ranged GETs (frames of a large multi-frame object without reading it all)."""
        return RangedReader(_RangedFile(self, key, self.size(key)), buffer)

    def path(self, key: str) -> str | None:
        return None

    # -- housekeeping -------------------------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors as e:
            if _code(e) in ("NoSuchKey", "404"):
                return
            raise self._oserror(e, key) from e

    def keys_older_than(self, epoch: float) -> Iterator[str]:
        """ListObjectsV2 over the prefix; LastModified is the server's write time (the end of the upload)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if len(key) == 42 and key[:10].isdigit() and obj["LastModified"].timestamp() < epoch:
                        yield key
        except self._errors as e:
            raise self._oserror(e) from e

    def clean_temp(self) -> int:
        """Abort multipart uploads left unfinished under the prefix (a crash during a large PUT) once a day old:
        younger ones may be in flight on another node."""
        n = 0
        cutoff = time.time() - 86400
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                  Prefix=self.prefix)
            for page in pages:
                for u in page.get("Uploads", ()):
                    if u["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                        n += 1
        except self._errors:
            return n
        return n

    def usage(self) -> tuple[int | None, int | None]:
        return None, None

    def probe(self) -> None:
        name = f"{self.prefix}.probe-{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=b"openpacs")
            got = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except self._errors as e:
            raise self._oserror(e) from e
        if got != b"openpacs":
            raise OSError(f"s3://{self.bucket}/{self.prefix}: probe object read back wrong")


class _RangedFile(io.RawIOBase):
    def __init__(self, store: S3BlobStore, key: str, size: int) -> None:
        self.store, self.key, self.length, self.pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        if self.pos >= self.length:
            return 0
        data = self.store.read(self.key, self.pos, min(self.length, self.pos + len(b)))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class RangedReader(io.BufferedIOBase):
    """A buffered, seekable reader of one object over ranged GETs, plus ``read_at`` (bytes by position, one GET of
    just those, the reader's position untouched). Deliberately not an ``io.BufferedReader``: pydicom takes one of
    those for a file on disk, asks its name and reopens it by name for deferred values; this one it reads as a
    buffer."""

    def __init__(self, raw: _RangedFile, buffer: int) -> None:
        super().__init__()
        self._raw = raw
        self._inner = io.BufferedReader(raw, buffer_size=buffer)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._inner.read(size)

    def read1(self, size: int = -1) -> bytes:
        return self._inner.read1(size)

    def readinto(self, b: Any) -> int:
        return self._inner.readinto(b)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def read_at(self, offset: int, size: int) -> bytes:
        if offset >= self._raw.length or size <= 0:
            return b""
        return self._raw.store.read(self._raw.key, offset, min(self._raw.length, offset + size))

    def close(self) -> None:
        self._inner.close()
        super().close()


def _code(e: Exception) -> str:
    resp = getattr(e, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


def from_url(url: str, settings: Any = None) -> S3BlobStore:
    """``s3://bucket/prefix`` with the s3_* settings (endpoint, region, credentials, pool size)."""
    u = urlparse(url)

    def g(name: str, default: Any = None) -> Any:
        return getattr(settings, name, default) if settings is not None else default

    return S3BlobStore(u.netloc, u.path, endpoint_url=g("s3_endpoint_url") or None, region=g("s3_region") or None,
                       access_key=g("s3_access_key") or None, secret_key=g("s3_secret_key") or None,
                       max_pool=int(g("s3_max_pool", 64) or 64))
