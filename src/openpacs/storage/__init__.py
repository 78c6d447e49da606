"""Blob storage backends. ``open_store`` is called only by the composition root (openpacs.context)."""

from __future__ import annotations

from urllib.parse import urlparse

from .base import BlobStore, StoredBlob
from .filesystem import FilesystemBlobStore

__all__ = ["BlobStore", "StoredBlob", "FilesystemBlobStore", "open_store"]


def open_store(url: str, sync: str = "auto") -> BlobStore:
    u = urlparse(url)
    if u.scheme in ("file", ""):
        return FilesystemBlobStore(u.path if u.scheme else url, sync=sync)
    raise ValueError(f"unsupported storage URL {url!r} (supported: file://)")
