"""Blob storage backends. ``open_store`` is called only by the composition root (openpacs.context)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from .base import BlobStore, StoredBlob
from .filesystem import FilesystemBlobStore

__all__ = ["BlobStore", "StoredBlob", "FilesystemBlobStore", "open_store"]


def _open_one(url: str, sync: str, settings: Any) -> BlobStore:
    u = urlparse(url)
    if u.scheme in ("file", ""):
        return FilesystemBlobStore(u.path if u.scheme else url, sync=sync)
    if u.scheme == "s3":
        from .s3 import from_url

        return from_url(url, settings)
    raise ValueError(f"unsupported storage URL {url!r} (supported: file://, s3://bucket/prefix)")


def open_store(url: str, sync: str = "auto", settings: Any = None) -> BlobStore:
    """The store for ``url`` (file:// or s3://; the s3_* settings); with ``settings.tier_url`` set, a
    :class:`~.tiered.TieredBlobStore` of that store and the cold tier (storage/tiered.py)."""
    store = _open_one(url, sync, settings)
    tier_url = str(getattr(settings, "tier_url", "") or "")
    if not tier_url:
        return store
    from .tiered import TieredBlobStore

    return TieredBlobStore(store, _open_one(tier_url, sync, settings),
                           cache_dir=str(getattr(settings, "tier_cache_dir", "") or "") or None,
                           cache_max=int(float(getattr(settings, "tier_cache_max_gb", 10) or 0) * 1e9))
