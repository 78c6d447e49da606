"""The blob store interface: opaque keys chosen by the store, never derived from DICOM content."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredBlob:
    key: str
    size: int


class BlobStore(Protocol):
    def put(self, chunks: list[bytes | memoryview]) -> StoredBlob:
        """Write the concatenated chunks durably under a new key; return once the data is on stable storage
        (the containing directory entry may still need :meth:`sync_pending`)."""

    def sync_pending(self) -> None:
        """Make every rename done by :meth:`put` since the last call durable (one directory fsync per directory)."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes: ...

    def stream(self, key: str, start: int = 0, end: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]: ...

    def path(self, key: str) -> str | None:
        """A local filesystem path for zero-copy serving, or None for remote stores."""

    def delete(self, key: str) -> None: ...

    def keys_older_than(self, epoch: float) -> Iterator[str]:
        """Keys of blobs written before ``epoch`` (used by the orphan sweep)."""

    def clean_temp(self) -> int:
        """Remove partial writes left by a crash; return how many."""

    def usage(self) -> tuple[int | None, int | None]:
        """(total, free) bytes of the space the blobs live on; None where the store cannot tell (object stores)."""

    def probe(self) -> None:
        """Write, read back and remove a small object: raises OSError when the store is not writable (``/readyz``)."""
