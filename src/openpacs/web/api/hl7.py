"""API router: the HL7 v2 message log (search with keyset pages, one message with its raw text and ACK).

Reading it needs the ``admin`` right (web/auth.py api_policy): messages carry patient demographics.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy import select

from ...index.hl7_schema import hl7_messages
from ...services import auth as authsvc
from ...services.auth import Principal
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))
RESULTS = ("AA", "AE", "AR")


class MessageOut(BaseModel):
    id: int
    received_at: datetime
    message_type: str
    control_id: str
    sending_application: str
    sending_facility: str
    version: str
    charset: str
    result: str
    error: str | None
    error_location: str | None
    patient_id: str | None
    peer: str | None
    size: int


class MessageDetail(MessageOut):
    raw: str
    ack: str


def _out(r: Any, detail: bool = False) -> dict[str, Any]:
    fields = MessageDetail.model_fields if detail else MessageOut.model_fields
    return {k: getattr(r, k) for k in fields}


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(prefix="/hl7", tags=["hl7"])

    @router.get("/messages", response_model=Page, summary="Search the HL7 message log, newest first (keyset pages)")
    def search(
        type: str | None = Query(None, max_length=16, description="message type, ADT, or type^trigger, ADT^A08"),
        control_id: str | None = Query(None, max_length=200, description="MSH-10 (exact)"),
        patient: str | None = Query(None, max_length=256, description="patient ID (PID-3, exact)"),
        result: str | None = Query(None, description="AA, AE or AR"),
        sender: str | None = Query(None, max_length=256, description="sending application (MSH-3, exact)"),
        since: datetime | None = Query(None, description="ISO 8601 date-time (inclusive)"),
        until: datetime | None = Query(None, description="ISO 8601 date-time (exclusive)"),
        limit: int = limit_param(100), cursor: str | None = Query(None), p: Principal = ADMINISTRATOR,
    ) -> Page:
        t = hl7_messages.c
        stmt = select(*[t[k] for k in MessageOut.model_fields])
        if result:
            if result.upper() not in RESULTS:
                raise bad("result: AA, AE or AR")
            stmt = stmt.where(t.result == result.upper())
        if type:
            kind = type.strip().upper()
            stmt = stmt.where(t.message_type == kind if "^" in kind else t.message_type.startswith(kind + "^")
                              | (t.message_type == kind))
        for col, v in ((t.control_id, control_id), (t.patient_id, patient), (t.sending_application, sender)):
            if v:
                stmt = stmt.where(col == v)
        if since:
            stmt = stmt.where(t.received_at >= since)
        if until:
            stmt = stmt.where(t.received_at < until)
        key = decode_cursor(cursor, 1)
        if key is not None:
            if not isinstance(key[0], int):
                raise bad("cursor: not a cursor returned by this API")
            stmt = stmt.where(t.id < key[0])
        with ctx.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(t.id.desc()).limit(limit + 1)).all()
        items = [_out(r) for r in rows[:limit]]
        return Page(items=items, next=encode_cursor([items[-1]["id"]]) if len(rows) > limit else None)

    @router.get("/messages/{message_id}", response_model=MessageDetail,
                summary="One HL7 message: the raw message as received (decoded) and the ACK sent")
    def one(message_id: int, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        with ctx.index.engine.connect() as c:
            r = c.execute(select(hl7_messages).where(hl7_messages.c.id == message_id)).first()
        if r is None:
            raise not_found("HL7 message")
        return _out(r, detail=True)

    return router
