"""``GET /api/me``: who the console is signed in as, with the rights it should offer and the CSRF token to send."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from ...services.auth import Principal
from .common import caller


class Me(BaseModel):
    username: str
    role: str
    rights: list[str]
    departments: list[str] | None
    csrf_token: str | None
    authenticated: bool
    auth_enabled: bool


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["session"])

    @router.get("/me", response_model=Me, summary="The signed-in principal")
    def me(p: Principal = Depends(caller)) -> Me:
        return Me(
            username=p.name,
            role=p.role,
            rights=sorted(p.rights),
            departments=list(p.departments) if p.departments is not None else None,
            csrf_token=p.csrf_token or None,
            authenticated=p.authenticated,
            auth_enabled=bool(ctx.settings.auth_enabled),
        )

    return router
