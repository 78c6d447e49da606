"""What every API router shares: the caller's rights as a dependency, keyset cursors, error helpers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Query, Request
from pydantic import BaseModel

from ...services.auth import Principal
from ..auth import principal_of, require

MAX_LIMIT = 500


def need(right: str) -> Callable[[Request], Principal]:
    """A dependency: the principal, or 401/403 (audited by the middleware) when it lacks ``right``."""

    def dependency(request: Request) -> Principal:
        return require(request, right)

    dependency.__name__ = f"need_{right}"
    return dependency


def caller(request: Request) -> Principal:
    return principal_of(request)


def limit_param(default: int = 50) -> Any:
    return Query(default, ge=1, le=MAX_LIMIT, description=f"page size (1-{MAX_LIMIT})")


def encode_cursor(key: list[Any]) -> str:
    """An opaque keyset cursor: the sort key of the last row of a page."""
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (ValueError, TypeError):
        raise HTTPException(400, "cursor: not a cursor returned by this API") from None
    if not isinstance(key, list) or len(key) != arity:
        raise HTTPException(400, "cursor: not a cursor returned by this API (or for another sort order)")
    return key


class Page(BaseModel):
    """One page of a list: ``next`` is the cursor of the following page, null on the last one."""

    items: list[Any]
    next: str | None = None


def not_found(what: str) -> HTTPException:
    return HTTPException(404, f"{what} not found")


def bad(detail: str) -> HTTPException:
    return HTTPException(400, detail)
