"""Retention rules (services/retention.py) and the integrity scrub (services/scrub.py), on SQLite and PostgreSQL:
age and recycle rules with protected studies kept, the preview deleting nothing, a run through the ingest delete path
with audit events; a scrub finding missing and corrupt blobs, seen by storage commitment, the figures and doctor."""

from __future__ import annotations

import pytest
from core_factory import instance, store
from sqlalchemy import func, select

from openpacs.index.schema import studies
from openpacs.services.commitment import PROCESSING_FAILURE, CommitmentService, Reference
from openpacs.services.jobs import JobContext
from openpacs.services.retention import KIND as RETENTION
from openpacs.services.retention import RetentionError, RetentionRunner, parse_rule
from openpacs.services.scrub import doctor_check
from openpacs.services.storage_schedule import for_context


def _study(ctx, date: str, modality: str = "CT", pixels: int = 2048) -> str:
    ds = instance(modality=modality, StudyDate=date, pixels=pixels)
    assert store(ctx, ds).ok
    return str(ds.StudyInstanceUID)


def _uids(ctx) -> set[str]:
    with ctx.index.engine.connect() as c:
        return set(c.execute(select(studies.c.study_instance_uid)).scalars())


def _run(ctx, job):
    claimed = ctx.jobs.claim([RETENTION])
    assert claimed.id == job.id
    RetentionRunner(ctx).run(JobContext(claimed, ctx.jobs))
    ctx.jobs.finish(claimed, None)
    return ctx.jobs.get(job.id)


def test_rules_are_checked():
    assert parse_rule({"name": "a", "older_than_years": 2}).older_than_days == pytest.approx(730.5)
    for bad, msg in (({"older_than_years": 1}, "needs a name"), ({"name": "x"}, "either"),
                     ({"name": "x", "older_than_days": 3, "recycle_above": "1GB"}, "either"),
                     ({"name": "x", "recycle_above": "lots"}, "recycle_above"),
                     ({"name": "x", "older_than_days": 3, "colour": "red"}, "unknown field")):
        with pytest.raises(RetentionError, match=msg):
            parse_rule(bad)


def test_age_rule_preview_and_run_keep_protected_and_other_modalities(make_ctx):
    ctx = make_ctx(retention=[{"name": "ct-10y", "older_than_years": 10, "modalities": ["CT"]}])
    old = _study(ctx, "19990101")
    protected = _study(ctx, "19980101")
    old_mr = _study(ctx, "19990101", modality="MR")
    recent = _study(ctx, "20250101")
    svc = for_context(ctx).retention
    assert svc.protect(protected, True) and not svc.protect("1.2.3.4", True)
    prev = svc.preview()
    assert [e["study_instance_uid"] for e in prev["delete"]] == [old]
    assert [e["study_instance_uid"] for e in prev["protected_kept"]] == [protected]
    assert prev["delete"][0]["rule"] == "ct-10y" and "10 years" in prev["delete"][0]["reason"]
    assert _uids(ctx) == {old, protected, old_mr, recent}  # the dry run deleted nothing

    job = svc.submit(user="tester")
    assert job.kind == RETENTION and job.total == 1
    done = _run(ctx, job)
    assert done.state == "done" and done.payload["deleted"] == 1
    assert _uids(ctx) == {protected, old_mr, recent}
    ctx.audit.flush()
    from openpacs.index.security_schema import audit_events

    with ctx.index.engine.connect() as c:
        rows = c.execute(select(audit_events.c.event, audit_events.c.user, audit_events.c.detail)
                         .where(audit_events.c.event == "StudyDeleted")).all()
    assert len(rows) == 1 and rows[0].user == "tester" and "ct-10y" in rows[0].detail


def test_protected_after_the_plan_is_kept_by_the_run(make_ctx):
    ctx = make_ctx(retention=[{"name": "all-old", "older_than_days": 30}])
    uid = _study(ctx, "20000101")
    svc = for_context(ctx).retention
    job = svc.submit()
    svc.protect(uid, True)  # between the plan and the run
    done = _run(ctx, job)
    assert done.payload == {**done.payload, "deleted": 0, "kept": 1}
    assert _uids(ctx) == {uid}


def test_recycle_rule_deletes_the_oldest_until_under_the_limit(make_ctx):
    ctx = make_ctx()
    dates = ["20200101", "20190101", "20210101", "20220101"]
    uids = {d: _study(ctx, d, pixels=8000) for d in dates}
    with ctx.index.engine.connect() as c:
        size = c.execute(select(func.max(studies.c.size_bytes))).scalar_one()
    svc = for_context(ctx).retention
    svc.protect(uids["20190101"], True)
    svc.set_rules([{"name": "recycle", "recycle_above": str(3 * size), "recycle_to": str(2 * size)}])
    assert [r.source for r in svc.rules()] == ["index"]
    prev = svc.preview()
    # over 3 studies' worth: the oldest unprotected go until 2 are left; the protected 2019 study is skipped
    assert [e["study_instance_uid"] for e in prev["delete"]] == [uids["20200101"], uids["20210101"]]
    assert [e["study_instance_uid"] for e in prev["protected_kept"]] == [uids["20190101"]]
    with pytest.raises(RetentionError, match="twice"):
        svc.set_rules([{"name": "a", "older_than_days": 1}, {"name": "a", "older_than_days": 2}])


def _blob_path(ctx, sop: str) -> str:
    return ctx.store.path(ctx.index.find_instance(sop).blob_key)


def test_scrub_finds_missing_and_corrupt_blobs_and_commitment_agrees(ctx):
    a, b, c = instance(), instance(), instance()
    for ds in (a, b, c):
        assert store(ctx, ds).ok
    svc = for_context(ctx).scrub
    result = svc.run()
    assert result["checked"] == 3 and result["failures"] == 0
    assert svc.figures()["scrub_failures"] == 0

    path = _blob_path(ctx, str(a.SOPInstanceUID))
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))
    import os

    os.unlink(_blob_path(ctx, str(b.SOPInstanceUID)))
    result = svc.run(job_id=7)
    assert (result["corrupt"], result["missing"], result["failures"]) == (1, 1, 2)
    found = {f["sop_instance_uid"]: f["problem"] for f in svc.failures()}
    assert found == {str(a.SOPInstanceUID): "corrupt", str(b.SOPInstanceUID): "missing"}
    ctx.figures.ttl = 0
    assert ctx.figures.get()["scrub_failures"] == 2  # the dashboard's figures, /metrics' openpacs_scrub_failures
    from openpacs.services.metrics import exposition

    assert b"openpacs_scrub_failures 2.0" in exposition(ctx.figures)

    # storage commitment answers from the same facts: a blob the scrub found corrupt is not committed, even if
    # the blob were repaired on disk behind its back (until the next scrub)
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))
    refs = [Reference(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in (a, b, c)]
    res = CommitmentService(ctx.store, ctx.index).verify(refs)
    assert [r.sop_instance_uid for r in res.committed] == [str(c.SOPInstanceUID)]
    assert {r.sop_instance_uid: reason for r, reason in res.failed} == {
        str(a.SOPInstanceUID): PROCESSING_FAILURE, str(b.SOPInstanceUID): PROCESSING_FAILURE}

    check = doctor_check(ctx.index)
    assert check.status == "fail" and "2 instance(s)" in check.finding
    # the next scrub sees the repaired blob: committed again; the missing one stays reported
    result = svc.run()
    assert result["corrupt"] == 0 and result["missing"] == 1
    res = CommitmentService(ctx.store, ctx.index).verify(refs)
    assert sorted(r.sop_instance_uid for r in res.committed) == sorted([str(a.SOPInstanceUID), str(c.SOPInstanceUID)])
    assert doctor_check(ctx.index).status == "fail"


def test_toml_retention_rules_are_checked_at_load(tmp_path):
    from openpacs.config import load_settings

    cfg = tmp_path / "openpacs.toml"
    cfg.write_text('[[retention]]\nname = "x"\nolder_than_years = 2\ncolour = "red"\n')
    with pytest.raises(ValueError, match="retention rule 'x': unknown field"):
        load_settings(cfg)
    cfg.write_text('compress = "jpeg-ls-lossless"\n[[retention]]\nname = "x"\nolder_than_years = 2\n')
    s = load_settings(cfg)
    assert s.compress == "jpeg-ls-lossless" and s.retention == [{"name": "x", "older_than_years": 2}]
    cfg.write_text('compress = "jpeg-lossy"\n')
    with pytest.raises(ValueError, match="compress must be"):
        load_settings(cfg)
