"""Composition root: the only place that picks backends. Builds storage, index and services from Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import Settings
from .index.db import Index
from .services.ingest import IngestService
from .services.query import QueryService
from .services.retrieve import RetrieveService
from .storage import BlobStore, open_store

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: Settings
    store: BlobStore
    index: Index
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService

    def close(self) -> None:
        self.ingest.close()
        self.index.close()


def build_context(settings: Settings, *, migrate: bool = True) -> Context:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.resolved_storage_url)
    index = Index(settings.resolved_index_url)
    if migrate:
        index.migrate()
    ingest = IngestService(settings, store, index)
    query = QueryService(settings, store, index)
    retrieve = RetrieveService(settings, store, index)
    return Context(settings, store, index, ingest, query, retrieve)
