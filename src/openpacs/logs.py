"""Logging: text (default) or JSON lines (``log_format = "json"``), each line of an association or an HTTP request
carrying its id, and a ring buffer of recent lines for the console's System page (``/api/system/log``).

The ids live in context variables: the HTTP middleware sets ``request_id`` for the request (Starlette's thread pool
copies the context, so the routes' threads have it too); the DIMSE association sets ``association_id`` whenever it
handles bytes from its peer, and the tasks it starts inherit it.
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import json
import logging
import sys
import threading
import time
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("openpacs_request_id", default="")
association_id: contextvars.ContextVar[str] = contextvars.ContextVar("openpacs_association_id", default="")

RING_SIZE = 2000


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``association_id`` and a ready-made ``ctx`` (`` [req=…]``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid, aid = request_id.get(), association_id.get()
        record.request_id = rid
        record.association_id = aid
        record.ctx = f" [req={rid}]" if rid else f" [assoc={aid}]" if aid else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key in ("request_id", "association_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ctx)s: %(message)s"


class RingHandler(logging.Handler):
    """The last ``RING_SIZE`` records of this process, numbered, for ``/api/system/log?after=N``."""

    def __init__(self, size: int = RING_SIZE) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._seq = itertools.count(1)
        self._lock2 = threading.Lock()
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {
                "seq": 0,
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "request_id": getattr(record, "request_id", ""),
                "association_id": getattr(record, "association_id", ""),
            }
        except Exception:  # a bad format argument must not break logging
            return
        with self._lock2:
            entry["seq"] = next(self._seq)
            self.records.append(entry)

    def since(self, after: int = 0, level: int = logging.DEBUG, limit: int = 500) -> list[dict[str, Any]]:
        with self._lock2:
            items = [r for r in self.records if r["seq"] > after and logging.getLevelName(r["level"]) >= level]
        return items[-limit:]


ring = RingHandler()


def install_ring() -> None:
    """Keep recent lines for the System page (idempotent; ``configure`` does it, and so does the API)."""
    root = logging.getLogger()
    if ring not in root.handlers:
        root.addHandler(ring)


def configure(level: str = "INFO", fmt: str = "text", process_tag: str = "") -> None:
    """Root logging for a process of OpenPACS (``openpacs`` commands and DIMSE workers)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        pattern = TEXT_FORMAT if not process_tag else TEXT_FORMAT.replace("%(name)s", f"%(name)s[{process_tag}]")
        handler.setFormatter(logging.Formatter(pattern))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    install_ring()
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.getLogger("alembic").setLevel(logging.WARNING)
