"""Storage commitment: which of the instances a peer names are safely kept here (PS3.4 J.3, protocol-free).

An instance is committed only when the index has it under the SOP class the peer gave, its blob is readable and the
SHA-256 recorded at ingest still matches the blob's data set. Anything else is a failure with the PS3.4 J.3.2.1.1
Failure Reason, so that the requester keeps its copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from ..index.db import Index
from ..index.schema import instances, series, studies
from ..storage import BlobStore
from .doctor import blob_digest

log = logging.getLogger("openpacs.commitment")

# Failure Reason (0008,1197), PS3.4 J.3.2.1.1.2
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
SOP_CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119

_LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class CommitmentResult:
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)  # studies of the committed instances (audit trail)

    @property
    def all_committed(self) -> bool:
        return not self.failed


class CommitmentService:
    def __init__(self, store: BlobStore, index: Index) -> None:
        self.store = store
        self.index = index

    def _rows(self, uids: Sequence[str], departments: tuple[str, ...] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        join = instances.join(series, instances.c.series_fk == series.c.id).join(
            studies, series.c.study_fk == studies.c.id
        )
        with self.index.engine.connect() as conn:
            for start in range(0, len(uids), _LOOKUP_CHUNK):
                stmt = (
                    select(instances.c.sop_instance_uid, instances.c.sop_class_uid, instances.c.blob_key,
                           instances.c.sha256, studies.c.study_instance_uid)
                    .select_from(join)
                    .where(instances.c.sop_instance_uid.in_(uids[start : start + _LOOKUP_CHUNK]))
                )
                if departments is not None:
                    stmt = stmt.where(studies.c.department.in_(departments))
                for r in conn.execute(stmt):
                    out[r[0]] = r
        return out

    def verify(
        self,
        refs: Sequence[Reference],
        *,
        departments: tuple[str, ...] | None = None,
        supported: Callable[[str], bool] = lambda _uid: True,
    ) -> CommitmentResult:
        """Check every reference (blocking: reads each blob). ``departments`` limits what the peer may see: an
        instance of another department is "no such object instance"; ``supported`` tells the SOP classes this node
        stores at all."""
        result = CommitmentResult()
        try:
            rows = self._rows(sorted({r.sop_instance_uid for r in refs if r.sop_instance_uid}), departments)
        except Exception:  # noqa: BLE001 - the index unreachable: nothing can be confirmed
            log.exception("storage commitment: index lookup failed")
            result.failed = [(r, RESOURCE_LIMITATION) for r in refs]
            return result
        studies_seen: dict[str, None] = {}
        try:  # the same facts as the integrity scrub (services/scrub.py): what it found corrupt is not committed
            from .scrub import flagged

            scrubbed_bad = flagged(self.index, list(rows))
        except Exception:  # noqa: BLE001 - an index without the scrub table: the blob checks below still hold
            scrubbed_bad = set()
        for ref in refs:
            if ref.sop_instance_uid in scrubbed_bad and supported(ref.sop_class_uid):
                log.warning("storage commitment: %s was found missing or corrupt by the last integrity scrub",
                            ref.sop_instance_uid)
                result.failed.append((ref, PROCESSING_FAILURE))
                continue
            reason = self._check(ref, rows.get(ref.sop_instance_uid), supported)
            if reason is None:
                result.committed.append(ref)
                studies_seen[rows[ref.sop_instance_uid][4]] = None
            else:
                result.failed.append((ref, reason))
        result.study_uids = list(studies_seen)
        return result

    def _check(self, ref: Reference, row: Any, supported: Callable[[str], bool]) -> int | None:
        if not supported(ref.sop_class_uid):
            return SOP_CLASS_NOT_SUPPORTED
        if row is None:
            return NO_SUCH_OBJECT_INSTANCE
        if row[1] != ref.sop_class_uid:
            return CLASS_INSTANCE_CONFLICT
        try:
            digest = blob_digest(self.store, row[2])
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or not a Part 10 file: not committed
            log.warning("storage commitment: blob of %s unreadable: %s", ref.sop_instance_uid, exc)
            return PROCESSING_FAILURE
        if digest != row[3]:
            log.warning("storage commitment: blob of %s does not match its recorded SHA-256", ref.sop_instance_uid)
            return PROCESSING_FAILURE
        return None


def for_context(ctx: Any) -> CommitmentService:
    """The context's commitment service, made on first use (shared by the associations of a process)."""
    svc = getattr(ctx, "commitment", None)
    if svc is None:
        svc = CommitmentService(ctx.store, ctx.index)
        ctx.commitment = svc
    return svc


# -- the SCU side: results of the storage commitment our send jobs asked a peer for ------------------------------------

def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def record_report(index: Index, transaction: str, reporter_aet: str, committed: Sequence[str],
                  failed: Sequence[tuple[str, int | None]]) -> bool:
    """Hand a peer's N-EVENT-REPORT to the running send job waiting for ``transaction`` (its payload's
    ``commit_transaction``; it polls for ``commit_report``). Through the index, so that it reaches the job whichever
    process of the node received the report. False when no running job waits for it from ``reporter_aet``."""
    import json

    from sqlalchemy import update

    from ..index.db import now
    from ..index.schema import jobs

    if not valid_uid(transaction):  # digits and dots only: safe inside the LIKE pattern
        return False
    with index.write_engine.begin() as c:
        rows = c.execute(select(jobs.c.id, jobs.c.payload).where(
            jobs.c.kind == "send", jobs.c.state == "running",
            jobs.c.payload.like(f'%"commit_transaction": "{transaction}"%'))).all()
        for job_id, raw in rows:
            try:
                payload = json.loads(raw)
            except ValueError:
                continue
            if payload.get("commit_transaction") != transaction:
                continue
            if str(payload.get("commit_aet", "")).strip() != reporter_aet.strip():
                log.warning("storage commitment %s: report from %s, but job %d asked %s: ignored", transaction,
                            reporter_aet, job_id, payload.get("commit_aet"))
                return False
            payload["commit_report"] = {"transaction": transaction, "committed": list(committed),
                                        "failed": [[uid, reason] for uid, reason in failed]}
            c.execute(update(jobs).where(jobs.c.id == job_id).values(payload=json.dumps(payload), updated_at=now()))
            return True
    return False


FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    RESOURCE_LIMITATION: "resource limitation",
    SOP_CLASS_NOT_SUPPORTED: "referenced SOP class not supported",
    CLASS_INSTANCE_CONFLICT: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


def describe_failure(reason: int | None) -> str:
    if reason is None:
        return "not committed (no Failure Reason)"
    return f"not committed: Failure Reason 0x{reason:04X}" + (
        f" ({FAILURE_REASONS[reason]})" if reason in FAILURE_REASONS else "")
