"""Prefetch: when a study arrives or an order is placed, fetch the patient's prior studies from other archives, so
that they are here before the radiologist opens the new one.

A prefetch rule is a routing rule of ``kind = "prefetch"`` (services/routing.py: same conditions, storage, API and
console); instead of destinations it names ``sources`` (remote archives: DICOM nodes or DICOMweb peers) and which
priors to take: ``prior_modalities`` (``"same"``: the modality of the new study or order; a list; empty: any),
``same_body_part``, ``max_priors`` (the newest ones), ``max_age_days`` and the retrieve ``method``. ``on`` says
when: ``["study"]`` (a new study arrives), ``["order"]`` (a new scheduled procedure step from the RIS or the API).

The router only queues a ``prefetch`` job (in its cursor transaction: exactly once); the job does the network work:
a C-FIND (or QIDO-RS) per source for the patient, skipping studies already in this archive and the new study
itself, then one ``retrieve`` job (services/remote_qr.py) per source for the chosen priors.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from ..index.schema import studies
from . import remote_qr
from .jobs import JobContext, JobQueue, PermanentError

log = logging.getLogger("openpacs.prefetch")

KIND = "prefetch"


def _first(j: dict[str, Any], tag: str) -> str:
    v = (j.get(tag) or {}).get("Value") or [""]
    first = v[0]
    if isinstance(first, dict):  # PN
        return str(first.get("Alphabetic", ""))
    return str(first)


def _all(j: dict[str, Any], tag: str) -> list[str]:
    return [str(v) for v in (j.get(tag) or {}).get("Value") or []]


class Prefetcher:
    """Runs ``prefetch`` jobs: find the priors on each source, queue their retrieval."""

    def __init__(self, ctx: Any, queue: JobQueue) -> None:
        self.ctx = ctx
        self.queue = queue

    async def __call__(self, jc: JobContext) -> None:
        await asyncio.to_thread(self.run, jc)

    def _local(self, uids: list[str]) -> set[str]:
        if not uids:
            return set()
        with self.ctx.index.engine.connect() as c:
            rows = c.execute(select(studies.c.study_instance_uid)
                             .where(studies.c.study_instance_uid.in_(uids))).all()
        return {r[0] for r in rows}

    def run(self, jc: JobContext) -> None:
        p = jc.job.payload
        pid = str(p.get("PatientID") or "")
        if not pid:
            raise PermanentError("no PatientID to look for priors of")
        params: list[tuple[str, str]] = [("PatientID", pid), ("limit", "200")]
        if p.get("IssuerOfPatientID"):
            params.append(("IssuerOfPatientID", str(p["IssuerOfPatientID"])))
        if p.get("max_age_days"):
            since = (datetime.now(UTC) - timedelta(days=float(p["max_age_days"]))).strftime("%Y%m%d")
            params.append(("StudyDate", f"{since}-"))
        params.append(("includefield", "ModalitiesInStudy"))
        params.append(("includefield", "StudyDescription"))
        mods = [m for m in p.get("prior_modalities") or [] if m]
        body_part = str(p.get("BodyPartExamined") or "") if p.get("same_body_part") else ""
        exclude = {str(u) for u in p.get("exclude") or []}
        report: dict[str, Any] = {}
        errors: list[str] = []
        for source in p.get("sources") or []:
            remote = remote_qr.find_remote(self.ctx.settings, source)
            if remote is None:
                errors.append(f"{source}: unknown archive")
                continue
            try:
                q = remote_qr.build_query("STUDY", params)
                found, _ = remote_qr.query(self.ctx.settings, remote, q)
            except remote_qr.RemoteUnavailable as e:
                errors.append(f"{source}: {e}")
                continue
            candidates = []
            for j in found:
                uid = _first(j, "0020000D")
                if not uid or uid in exclude:
                    continue
                study_mods = set(_all(j, "00080061"))
                if mods and study_mods and not study_mods & set(mods):
                    continue
                candidates.append((_first(j, "00080020"), uid, j))
            if body_part:
                candidates = [c for c in candidates if self._body_part_matches(remote, c[1], body_part)]
            local = self._local([c[1] for c in candidates])
            candidates = [c for c in candidates if c[1] not in local]
            candidates.sort(key=lambda c: c[0], reverse=True)  # newest first (YYYYMMDD sorts as text)
            chosen = candidates[: int(p.get("max_priors") or 3)]
            entry: dict[str, Any] = {"found": len(found), "already_here": len(local),
                                     "chosen": [c[1] for c in chosen]}
            if chosen:
                method = p.get("method") or None
                try:
                    req = remote_qr.validate_request(remote, "STUDY", [c[1] for c in chosen],
                                                     method=method if method in remote.methods else None)
                except remote_qr.RemoteQueryError as e:
                    errors.append(f"{source}: {e}")
                    continue
                job = remote_qr.submit_retrieve(self.queue, remote, req, user=f"prefetch:{p.get('rule', '')}")
                entry["retrieve_job"] = job.id
                log.info("prefetch rule %s: %d prior(s) of %s from %s (job %d)", p.get("rule"), len(chosen), pid,
                         source, job.id)
            report[source] = entry
        self._save(jc, report)
        if errors and not report:
            raise ConnectionError("; ".join(errors))  # retried with backoff: the archives may come back
        if errors:
            raise PermanentError("; ".join(errors))  # what could be queued is; the rest is reported

    def _body_part_matches(self, remote: remote_qr.Remote, study_uid: str, body_part: str) -> bool:
        """Whether any series of the remote study has this BodyPartExamined (a series-level query)."""
        try:
            q = remote_qr.build_query("SERIES", [("includefield", "BodyPartExamined")],
                                      path={"StudyInstanceUID": study_uid})
            series, _ = remote_qr.query(self.ctx.settings, remote, q)
        except (remote_qr.RemoteUnavailable, remote_qr.RemoteQueryError):
            return False
        parts = {_first(s, "00180015").upper() for s in series}
        return body_part.upper() in parts or not any(parts)

    def _save(self, jc: JobContext, report: dict[str, Any]) -> None:
        self.queue.update_payload(jc.job.id, {"result": report})
