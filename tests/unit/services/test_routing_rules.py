"""services/routing.py: rule parsing and validation, condition matching, schedules, and the router following the
change feed (jobs submitted per rule and destination, exactly once; stable studies; rules on file attributes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from core_factory import instance, store
from pydicom.uid import generate_uid

from openpacs.services import routing as R
from openpacs.services.jobs import PENDING


def rule(**spec):
    spec.setdefault("destinations", ["WS1"])
    return R.parse_rule(spec.pop("name", "r1"), spec)


# ---- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ({"destinations": []}, "destinations"),
    ({"conditions": [{"attribute": "NoSuchKeyword", "value": "x"}]}, "neither a DICOM keyword"),
    ({"conditions": [{"attribute": "Modality", "op": "like", "value": "x"}]}, "op"),
    ({"conditions": [{"attribute": "Modality", "op": "regex", "value": "(unclosed"}]}, "regular expression"),
    ({"conditions": [{"attribute": "StudyDate", "op": "range", "value": "x"}]}, "low, high"),
    ({"conditions": [{"attribute": "Modality", "value": "x" * 600}]}, "at most"),
    ({"trigger": "weekly"}, "trigger"),
    ({"schedule": ["25:00-06:00"]}, "schedule"),
    ({"days": ["someday"]}, "days"),
    ({"stable_seconds": -1}, "stable_seconds"),
    ({"transfer_syntax": "jpeg"}, "transfer_syntax"),
    ({"colour": "red"}, "unknown field"),
])
def test_invalid_rules_name_the_field(spec, message):
    with pytest.raises(R.RouteError, match=message):
        rule(**spec)


def test_bad_name_and_unknown_destination():
    with pytest.raises(R.RouteError, match="name"):
        R.parse_rule("bad name!", {"destinations": ["WS1"]})
    with pytest.raises(R.RouteError, match="unknown node"):
        R.parse_rule("ok", {"destinations": ["WS1", "NOPE"]}, known_destinations=["WS1"])


def test_toml_shorthand_and_aliases():
    r = R.parse_rule("ct", {"destinations": "WS1, WS2", "match": {"Modality": "CT", "StationName": "CT*",
                                                                   "calling_aet": ["MOD1", "MOD2"]}})
    assert r.destinations == ("WS1", "WS2")
    assert [(c.attribute, c.op) for c in r.conditions] == [("Modality", "equals"), ("StationName", "wildcard"),
                                                           ("CallingAETitle", "in")]
    assert r.spec()["conditions"][2]["value"] == ["MOD1", "MOD2"]


# ---- matching --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cond", "value", "expected"), [
    ({"attribute": "Modality", "value": "CT"}, "CT", True),
    ({"attribute": "Modality", "value": "CT"}, "MR", False),
    ({"attribute": "Modality", "value": "CT"}, None, False),
    ({"attribute": "Modality", "value": "ct", "ignore_case": True}, "CT", True),
    ({"attribute": "Modality", "value": "CT", "negate": True}, "MR", True),
    ({"attribute": "ImageType", "value": "DERIVED"}, "ORIGINAL\\PRIMARY", False),
    ({"attribute": "ImageType", "value": "PRIMARY"}, "ORIGINAL\\PRIMARY", True),  # any value of a multi-valued one
    ({"attribute": "StationName", "op": "wildcard", "value": "CT?-*"}, "CT1-ROOM2", True),
    ({"attribute": "StationName", "op": "wildcard", "value": "CT?-*"}, "MR1-ROOM2", False),
    ({"attribute": "InstitutionName", "op": "regex", "value": "^St\\.? Mary"}, "St. Mary's", True),
    ({"attribute": "InstitutionName", "op": "regex", "value": "^St\\.? Mary"}, "General", False),
    ({"attribute": "StudyDate", "op": "range", "value": "20240101-20241231"}, "20240615", True),
    ({"attribute": "StudyDate", "op": "range", "value": "20240101-20241231"}, "20250101", False),
    ({"attribute": "StudyDate", "op": "range", "value": ["20240101", ""]}, "20990101", True),
    ({"attribute": "SliceThickness", "op": "range", "value": ["0.5", "2"]}, "1.25", True),
    ({"attribute": "SliceThickness", "op": "range", "value": ["0.5", "2"]}, "10", False),  # numeric, not text
    ({"attribute": "Modality", "op": "in", "value": ["CT", "MR"]}, "MR", True),
    ({"attribute": "00080080", "value": "X"}, "X", True),
])
def test_condition(cond, value, expected):
    c = R.parse_condition(cond)
    assert c.matches(value) is expected


def test_hostile_values_are_bounded_and_never_raise():
    c = R.parse_condition({"attribute": "InstitutionName", "op": "regex", "value": "(a+)+$"})
    hostile = "a" * 60 + "!"  # Python's re backtracks ~2^60 steps here (the router would hang); RE2 is linear
    assert c.matches(hostile) is False
    assert c.matches("a" * 5000) is True
    with pytest.raises(R.RouteError, match="lookaround"):
        R.parse_condition({"attribute": "InstitutionName", "op": "regex", "value": "(?<=x)y"})
    for v in ("'; DROP TABLE instances; --", "\x00\x01\x02", "é" * 10000, b"\xff\xfe".decode("latin-1"), 12, ["a"]):
        R.parse_condition({"attribute": "InstitutionName", "value": "x"}).matches(v)


def test_all_or_any():
    conds = [{"attribute": "Modality", "value": "CT"}, {"attribute": "CallingAETitle", "value": "MOD1"}]
    both = rule(conditions=conds)
    either = rule(conditions=conds, match="any")
    attrs = {"Modality": "CT", "CallingAETitle": "MOD2"}
    assert not both.matches(attrs) and either.matches(attrs)
    assert rule().matches({})  # no condition: every instance


def test_schedule_windows_overnight_and_days():
    night = rule(schedule=["22:00-06:00"])
    local = datetime(2026, 12, 7, 12, 0).astimezone()  # a Monday, local time
    assert not night.open_at(local)
    assert night.open_at(local.replace(hour=23))
    assert night.open_at(local.replace(hour=5, minute=59))
    nxt = night.next_open(local)
    assert (nxt.hour, nxt.minute) == (22, 0) and nxt.date() == local.date()
    weekend = rule(schedule=["22:00-06:00"], days=["sat"])
    sat = datetime(2026, 12, 12, 23, 0).astimezone()
    assert weekend.open_at(sat)
    assert weekend.open_at(sat + timedelta(hours=2))  # Sunday 01:00 is Saturday night's window
    assert not weekend.open_at(sat + timedelta(hours=24))  # Sunday 23:00 is not
    assert rule().open_at(local)


# ---- the router --------------------------------------------------------------------------------------------------


def _jobs(ctx):
    return ctx.jobs.list_jobs()


def test_router_submits_per_rule_and_destination_exactly_once(make_ctx):
    ctx = make_ctx(remote_aes={})
    ctx.routing._config_rules = [
        R.parse_rule("ct", {"destinations": ["WS1", "AI"], "match": {"Modality": "CT"}}, source="config"),
        R.parse_rule("mr", {"destinations": ["WS2"], "match": {"Modality": "MR"}}, source="config"),
    ]
    router = R.Router(ctx, ctx.routing)
    assert router.step() is False  # first step: the cursor starts at the head of the feed
    before = instance(modality="CT")
    store(ctx, before)  # after the cursor was set: routed
    st = generate_uid()
    cts = [instance(modality="CT", study_uid=st) for _ in range(3)]
    mr = instance(modality="MR")
    for ds in (*cts, mr):
        assert store(ctx, ds).status == 0
    router.step()
    router.step()  # nothing new: no second job
    jobs = _jobs(ctx)
    by_dest = {j.destination: j for j in jobs}
    assert sorted(by_dest) == ["AI", "WS1", "WS2"]
    assert by_dest["WS1"].total == 4 and by_dest["AI"].total == 4 and by_dest["WS2"].total == 1
    assert by_dest["WS1"].payload["rule"] == "ct" and by_dest["WS1"].kind == "send"
    assert {i.sop_instance_uid for i in ctx.jobs.items(by_dest["WS2"].id)} == {str(mr.SOPInstanceUID)}
    assert ctx.routing.cursor()["behind"] == 0


def test_disabled_rule_and_no_rules_advance_the_cursor(make_ctx):
    ctx = make_ctx()
    router = R.Router(ctx, ctx.routing)
    router.step()
    store(ctx, instance(modality="CT"))
    router.step()
    assert _jobs(ctx) == [] and ctx.routing.cursor()["behind"] == 0
    ctx.routing._config_rules = [R.parse_rule("off", {"destinations": ["WS1"], "enabled": False}, source="config")]
    store(ctx, instance(modality="CT"))
    router.step()
    assert _jobs(ctx) == [] and ctx.routing.cursor()["behind"] == 0


def test_stable_study_waits_then_sends_the_whole_study_once(make_ctx):
    ctx = make_ctx()
    ctx.routing._config_rules = [R.parse_rule("st", {"destinations": ["ARCH"], "trigger": "stable",
                                                     "stable_seconds": 30}, source="config")]
    router = R.Router(ctx, ctx.routing)
    t0 = datetime.now(UTC)
    router.step(t0)
    st = generate_uid()
    for _ in range(2):
        store(ctx, instance(study_uid=st))
    router.step(t0 + timedelta(seconds=1))
    assert _jobs(ctx) == [] and len(ctx.routing.pending()) == 1
    store(ctx, instance(study_uid=st))
    router.step(t0 + timedelta(seconds=20))
    router.step(t0 + timedelta(seconds=45))  # 25 s after the last instance: not yet stable
    assert _jobs(ctx) == []
    router.step(t0 + timedelta(seconds=60))
    (job,) = _jobs(ctx)
    assert job.total == 3 and job.payload["level"] == "STUDY" and job.payload["uids"] == [st]
    router.step(t0 + timedelta(seconds=200))
    assert len(_jobs(ctx)) == 1 and ctx.routing.pending() == []


def test_schedule_defers_the_job_to_the_window(make_ctx):
    ctx = make_ctx()
    now = datetime.now(UTC)
    closed_window = (now.astimezone() + timedelta(hours=2)).strftime("%H:00") + "-" + \
        (now.astimezone() + timedelta(hours=3)).strftime("%H:00")
    ctx.routing._config_rules = [R.parse_rule("night", {"destinations": ["WS1"], "schedule": [closed_window]},
                                              source="config")]
    router = R.Router(ctx, ctx.routing)
    router.step(now)
    store(ctx, instance())
    router.step(now)
    (job,) = _jobs(ctx)
    assert job.state == PENDING
    with ctx.index.engine.connect() as c:
        from sqlalchemy import select

        from openpacs.index.schema import jobs
        nb = c.execute(select(jobs.c.not_before).where(jobs.c.id == job.id)).scalar()
    nb = nb if nb.tzinfo else nb.replace(tzinfo=UTC)
    assert nb > now + timedelta(minutes=59)


def test_rule_on_a_file_attribute_and_dry_run(make_ctx):
    ctx = make_ctx()
    ctx.routing._config_rules = [R.parse_rule("kernel", {"destinations": ["WS1"], "conditions": [
        {"attribute": "ConvolutionKernel", "op": "wildcard", "value": "B3*"}]}, source="config")]
    router = R.Router(ctx, ctx.routing)
    router.step()
    st = generate_uid()
    a = instance(study_uid=st, ConvolutionKernel="B30f")
    b = instance(study_uid=st, ConvolutionKernel="B70s")
    for ds in (a, b):
        store(ctx, ds)
    dry = ctx.routing.dry_run(st, reader=lambda key, full=False: R.read_header(ctx.store, key, full))
    assert dry[0]["instances"] == 1 and dry[0]["of"] == 2 and dry[0]["would_send"]
    assert _jobs(ctx) == []  # a dry run sends nothing
    router.step()
    (job,) = _jobs(ctx)
    assert [i.sop_instance_uid for i in ctx.jobs.items(job.id)] == [str(a.SOPInstanceUID)]
    with pytest.raises(KeyError):
        ctx.routing.dry_run(generate_uid())


def test_index_rules_crud(make_ctx):
    ctx = make_ctx(remote_aes={})
    ctx.nodes.add({"name": "WS1", "aet": "WS1", "host": "127.0.0.1", "port": 104})
    r = ctx.routing.create({"name": "ct", "destinations": ["WS1"], "conditions": [
        {"attribute": "Modality", "value": "CT"}]}, user="admin")
    assert r.editable and r.updated_by == "admin"
    with pytest.raises(R.RouteConflict):
        ctx.routing.create({"name": "ct", "destinations": ["WS1"]})
    with pytest.raises(R.RouteError, match="unknown node"):
        ctx.routing.create({"name": "x", "destinations": ["NOWHERE"]})
    r2 = ctx.routing.update("ct", {"enabled": False, "trigger": "stable", "stable_seconds": 5})
    assert (r2.enabled, r2.trigger, r2.stable_seconds, r2.conditions[0].value) == (False, "stable", 5.0, "CT")
    ctx.routing.delete("ct")
    assert ctx.routing.get("ct") is None
    with pytest.raises(KeyError):
        ctx.routing.delete("ct")
    ctx.routing._config_rules = [R.parse_rule("toml", {"destinations": ["WS1"]}, source="config")]
    with pytest.raises(R.RouteConflict):
        ctx.routing.update("toml", {"enabled": False})
    assert json.loads(json.dumps(ctx.routing.rules()[0].spec()))["destinations"] == ["WS1"]


# ---- prefetch rules ---------------------------------------------------------------------------------------------


def test_prefetch_rule_parsing():
    r = R.parse_rule("p", {"kind": "prefetch", "sources": "ARCH1 ARCH2", "on": ["study", "order"],
                           "prior_modalities": ["CT", "MR"], "max_priors": 2, "max_age_days": 365,
                           "match": {"Modality": "CT"}})
    assert (r.kind, r.sources, r.on, r.prior_modalities, r.max_priors) == (
        "prefetch", ("ARCH1", "ARCH2"), ("study", "order"), ("CT", "MR"), 2)
    assert r.spec()["kind"] == "prefetch" and "destinations" not in r.spec()
    for bad, msg in (({"sources": []}, "sources"), ({"sources": ["A"], "on": ["weekly"]}, "on"),
                     ({"sources": ["A"], "max_priors": 0}, "max_priors"),
                     ({"sources": ["A"], "method": "ftp"}, "method"),
                     ({"sources": ["A"], "prior_modalities": ["ct scan"]}, "prior_modalities"),
                     ({"sources": ["A"], "destinations": ["B"]}, "unknown field")):
        with pytest.raises(R.RouteError, match=msg):
            R.parse_rule("p", {"kind": "prefetch", **bad})
    with pytest.raises(R.RouteError, match="unknown archive"):
        R.parse_rule("p", {"kind": "prefetch", "sources": ["NOPE"]}, known_destinations=["A"])


def test_router_queues_one_prefetch_per_patient_and_never_for_fetched_priors(make_ctx):
    from openpacs.config import RemoteAE

    ctx = make_ctx(remote_aes={"ARCH": RemoteAE(aet="ARCHIVE_AE", host="127.0.0.1", port=1)})
    ctx.routing._config_rules = [R.parse_rule("priors", {"kind": "prefetch", "sources": ["ARCH"],
                                                         "match": {"Modality": "CT"}}, source="config")]
    router = R.Router(ctx, ctx.routing)
    router.step()
    for _ in range(2):  # two new CT studies of one patient in one batch: one prefetch job
        store(ctx, instance(modality="CT", patient_id="P9", study_uid=generate_uid()))
    store(ctx, instance(modality="MR", patient_id="P9", study_uid=generate_uid()))  # no match
    router.step()
    (job,) = [j for j in _jobs(ctx) if j.kind == "prefetch"]
    assert job.payload["PatientID"] == "P9" and job.payload["prior_modalities"] == ["CT"]
    assert job.payload["sources"] == ["ARCH"] and len(job.payload["exclude"]) == 1
    # a study that came from the archive itself (a fetched prior) queues nothing, even once the first job ran
    with ctx.index.write_engine.begin() as c:
        from sqlalchemy import update

        from openpacs.index.schema import jobs
        c.execute(update(jobs).values(state="done"))
    from core_factory import dataset_bytes

    from openpacs.services.types import Source

    prior = instance(modality="CT", patient_id="P9", study_uid=generate_uid())
    ctx.ingest.store_dataset([dataset_bytes(prior)], "1.2.840.10008.1.2.1", str(prior.SOPClassUID),
                             str(prior.SOPInstanceUID), Source("DIMSE", "ARCHIVE_AE", "OPENPACS"))
    router.step()
    assert len([j for j in _jobs(ctx) if j.kind == "prefetch"]) == 1
