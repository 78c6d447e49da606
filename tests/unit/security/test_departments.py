"""services.departments: rules by modality / calling AE / institution / department name, applied at ingest."""

from __future__ import annotations

from sqlalchemy import select

from openpacs.index.schema import studies
from openpacs.services.types import Source

from .conftest import part10


def dept_of(ctx, study_uid: str) -> str | None:
    with ctx.index.engine.connect() as c:
        return c.execute(select(studies.c.department).where(studies.c.study_instance_uid == study_uid)).scalar_one()


def test_rules_assign_departments_at_ingest(world) -> None:
    ctx = world.ctx
    assert dept_of(ctx, world.studies["radiology"][0]) == "radiology"
    assert dept_of(ctx, world.studies["cardiology"][0]) == "cardiology"
    ctx.departments.add_rule("nuclear-medicine", calling_aet="NM_*", priority=10)
    ctx.departments.add_rule("pathology", institution_name="*PATHOLOGY*", priority=20)
    data, st, _, _ = part10("CT", "NM0001")
    assert ctx.ingest.store_file(data, Source(protocol="DIMSE", calling_aet="NM_CAMERA1")).ok
    assert dept_of(ctx, st) == "nuclear-medicine"
    data, st, _, _ = part10("CT", "PA0001", institution="City Pathology Lab")
    assert ctx.ingest.store_file(data, Source(protocol="TEST")).ok
    assert dept_of(ctx, st) == "pathology"
    data, st, _, _ = part10("OT", "OT0001")
    assert ctx.ingest.store_file(data, Source(protocol="TEST")).ok
    assert dept_of(ctx, st) is None  # no rule: only every-department users see it


def test_reapply_after_rule_change(world) -> None:
    ctx = world.ctx
    rid = [r.id for r in ctx.departments.rules() if r.department == "cardiology"][0]
    ctx.departments.delete_rule(rid)
    ctx.departments.add_rule("radiation-therapy", modality="US")
    assert ctx.departments.reapply() == 1
    assert dept_of(ctx, world.studies["cardiology"][0]) == "radiation-therapy"


def test_rule_matching_is_case_insensitive_with_lists() -> None:
    from openpacs.services.departments import Rule

    r = Rule(1, 1, "cardiology", modality="us, ecg", institution_name="st*")
    assert r.matches("US", "", "St Mary", "")
    assert not r.matches("CT", "", "St Mary", "")
    assert not r.matches("ECG", "", "General", "")
