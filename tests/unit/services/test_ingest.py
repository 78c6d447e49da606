"""The one ingest path: statuses, duplicates, counters, group commit under concurrency, durability bookkeeping."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from core_factory import CT, MR, SRC, dataset_bytes, instance, part10, store
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from openpacs.dicom.header import dataset_offset
from openpacs.index.schema import changes, instances, patients, series, studies
from openpacs.services.types import Status


def blob_files(ctx) -> set[str]:
    return set(ctx.store.keys_older_than(float("inf")))


def row(ctx, table, **where):
    with ctx.index.engine.connect() as c:
        stmt = select(table)
        for k, v in where.items():
            stmt = stmt.where(table.c[k] == v)
        return c.execute(stmt).one()


# -- success paths -----------------------------------------------------------------------------------------------


def test_store_dataset_success_prefixes_meta_and_keeps_bytes(ctx):
    ds = instance(StudyDate="20240102", AccessionNumber="A1")
    raw = dataset_bytes(ds)
    out = ctx.ingest.store_dataset([raw[:100], memoryview(raw)[100:]], ExplicitVRLittleEndian, CT,
                                   str(ds.SOPInstanceUID), SRC)
    assert out.status == Status.SUCCESS and out.ok and not out.duplicate
    assert out.study_instance_uid == ds.StudyInstanceUID
    r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    stored = ctx.store.read(r.blob_key)
    assert stored[dataset_offset(stored):] == raw  # the data set exactly as received
    assert r.size_bytes == len(stored)
    assert r.sha256 == hashlib.sha256(raw).hexdigest()
    assert r.transfer_syntax_uid == ExplicitVRLittleEndian and r.calling_aet == "UNITSCU"
    meta = pydicom.dcmread(ctx.store.path(r.blob_key)).file_meta
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "UNITSCU"


def test_store_dataset_implicit_vr(ctx):
    ds = instance()
    out = store(ctx, ds, ImplicitVRLittleEndian)
    assert out.status == Status.SUCCESS
    assert row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID).transfer_syntax_uid == ImplicitVRLittleEndian


def test_store_file_success_stores_file_as_given(ctx):
    ds = instance(PatientName="Müller^Jörg")
    data = part10(ds)
    out = ctx.ingest.store_file(data, SRC)
    assert out.status == Status.SUCCESS
    r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    assert ctx.store.read(r.blob_key) == data
    assert r.sha256 == hashlib.sha256(data[dataset_offset(data):]).hexdigest()
    assert row(ctx, patients, patient_id="PID1").patient_name == "Müller^Jörg"
    assert row(ctx, patients, patient_id="PID1").patient_name_norm == "MÜLLER^JÖRG"


@pytest.mark.parametrize("size", [1, 97, 4096])
def test_store_file_in_pieces_stores_the_same_bytes(ctx, size):
    """STOW-RS hands a part over as the pieces it arrived in: stored and digested as if it were one buffer."""
    ds = instance(PatientName="Pieces^Of", StudyDescription="x" * 5000)
    data = part10(ds)
    pieces = [memoryview(data)[i : i + size] for i in range(0, len(data), size)]
    out = ctx.ingest.store_file(pieces, SRC)
    assert out.status == Status.SUCCESS and out.study_instance_uid == ds.StudyInstanceUID
    r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    assert ctx.store.read(r.blob_key) == data
    assert r.sha256 == hashlib.sha256(data[dataset_offset(data):]).hexdigest()
    assert row(ctx, studies, study_instance_uid=ds.StudyInstanceUID).study_description == "x" * 5000
    assert ctx.ingest.store_file(data, SRC).duplicate  # the same digest as the whole file


def test_same_instance_by_file_and_by_network_is_a_duplicate(ctx):
    """sha256 covers only the data set, so the two entry points agree on identity."""
    ds = instance()
    assert ctx.ingest.store_file(part10(ds), SRC).status == Status.SUCCESS
    out = store(ctx, ds)
    assert out.status == Status.SUCCESS and out.duplicate


def test_expected_study_mismatch(ctx):
    ds = instance()
    out = ctx.ingest.store_file(part10(ds), SRC, expected_study_uid=generate_uid())
    assert out.status == 0x0110 and not out.ok
    assert ctx.index.counts()["instances"] == 0


# -- duplicates --------------------------------------------------------------------------------------------------


def test_identical_duplicate_writes_nothing(ctx):
    ds = instance()
    assert store(ctx, ds).status == Status.SUCCESS
    before = blob_files(ctx)
    with ctx.index.engine.connect() as c:
        nchanges = len(c.execute(select(changes)).all())
    out = store(ctx, ds)
    assert out.status == Status.SUCCESS and out.duplicate
    assert blob_files(ctx) == before
    assert ctx.index.counts()["instances"] == 1
    with ctx.index.engine.connect() as c:
        assert len(c.execute(select(changes)).all()) == nchanges
    assert os.listdir(ctx.store.tmp) == []


def _variant(ds):
    other = pydicom.Dataset()
    other.update(ds)
    other.InstanceNumber = 7
    other.SeriesDescription = "changed"
    return other


def test_different_duplicate_keep_first(make_ctx):
    ctx = make_ctx()
    ds = instance()
    store(ctx, ds)
    first = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    before = blob_files(ctx)
    out = store(ctx, _variant(ds))
    assert out.status == Status.WARNING_DUPLICATE == 0xB006 and out.ok and not out.duplicate
    assert blob_files(ctx) == before
    assert row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID).sha256 == first.sha256


def test_different_duplicate_reject(make_ctx):
    ctx = make_ctx(duplicate_policy="reject")
    ds = instance()
    store(ctx, ds)
    before = blob_files(ctx)
    out = store(ctx, _variant(ds))
    assert out.status == Status.DUPLICATE_REJECTED and not out.ok
    assert blob_files(ctx) == before


def test_different_duplicate_overwrite_replaces_blob_and_attributes(make_ctx):
    ctx = make_ctx(duplicate_policy="overwrite")
    ds = instance(InstanceNumber=1)
    store(ctx, ds)
    old = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    v = _variant(ds)
    out = store(ctx, v)
    assert out.status == Status.SUCCESS and not out.duplicate
    new = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    assert new.sha256 == hashlib.sha256(dataset_bytes(v)).hexdigest() != old.sha256
    assert blob_files(ctx) == {new.blob_key, old.blob_key}  # the old one a while longer, for retrieves under way
    ctx.ingest.reaper.close()
    assert blob_files(ctx) == {new.blob_key}
    assert new.instance_number == "7"  # the index describes the data now stored
    assert row(ctx, series, series_instance_uid=ds.SeriesInstanceUID).num_instances == 1
    assert ctx.index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_overwrite_moving_instance_to_another_study_keeps_counters_right(make_ctx):
    ctx = make_ctx(duplicate_policy="overwrite")
    ds = instance()
    keep = instance(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID)
    store(ctx, ds)
    store(ctx, keep)
    moved = _variant(ds)
    moved.StudyInstanceUID = generate_uid()
    moved.SeriesInstanceUID = generate_uid()
    moved.Modality = "MR"
    assert store(ctx, moved).status == Status.SUCCESS
    old_study = row(ctx, studies, study_instance_uid=ds.StudyInstanceUID)
    new_study = row(ctx, studies, study_instance_uid=moved.StudyInstanceUID)
    assert (old_study.num_instances, old_study.num_series) == (1, 1)
    assert (new_study.num_instances, new_study.num_series, new_study.modalities_in_study) == (1, 1, "MR")
    assert row(ctx, patients, patient_id="PID1").num_instances == 2
    assert row(ctx, patients, patient_id="PID1").num_studies == 2


def test_overwrite_never_reaches_into_another_department(make_ctx):
    """A sender scoped to radiology cannot replace (and so move, or empty the study of) a cardiology instance by
    reusing its SOP Instance UID; within its own department it can."""
    import dataclasses

    ctx = make_ctx(duplicate_policy="overwrite")
    ctx.ingest.classify_department = lambda values, aet: "cardiology"
    ds = instance()
    store(ctx, ds)
    old = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    old_study = str(ds.StudyInstanceUID)
    ctx.ingest.classify_department = lambda values, aet: "radiology"
    moved = _variant(ds)
    moved.StudyInstanceUID, moved.SeriesInstanceUID = generate_uid(), generate_uid()
    radiology = dataclasses.replace(SRC, departments=("radiology",))

    def send(d, source):
        return ctx.ingest.store_dataset([dataset_bytes(d)], ExplicitVRLittleEndian, str(d.SOPClassUID),
                                        str(d.SOPInstanceUID), source)

    out = send(moved, radiology)
    assert out.status == Status.NOT_AUTHORIZED, out
    assert row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID).blob_key == old.blob_key
    assert blob_files(ctx) == {old.blob_key}  # the refused copy is gone, the stored one untouched
    assert row(ctx, studies, study_instance_uid=old_study).num_instances == 1
    # the cardiology sender replaces its own instance
    assert send(moved, dataclasses.replace(SRC, departments=("cardiology",))).status == Status.SUCCESS
    assert row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID).blob_key != old.blob_key


def test_identical_duplicate_under_overwrite_policy_is_still_a_noop(make_ctx):
    ctx = make_ctx(duplicate_policy="overwrite")
    ds = instance()
    store(ctx, ds)
    before = blob_files(ctx)
    out = store(ctx, ds)
    assert out.status == Status.SUCCESS and out.duplicate
    assert blob_files(ctx) == before


# -- failures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid_in_file(ctx, missing):
    ds = instance()
    data = part10(ds)
    parsed = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    delattr(parsed, missing)
    import io

    buf = io.BytesIO()
    parsed.save_as(buf)  # file meta still names the instance: the data set is what counts
    out = ctx.ingest.store_file(buf.getvalue(), SRC)
    assert out.status == Status.DATASET_MISMATCH == 0xA900, out
    assert ctx.index.counts()["instances"] == 0 and blob_files(ctx) == set()


@pytest.mark.parametrize("bad", ["1.2.840.abc", "1.02.3", "1." + "2" * 70, "1..2"])
def test_invalid_uid_in_dataset(ctx, bad):
    ds = instance(study_uid=bad)
    out = store(ctx, ds)
    assert out.status == 0xA900, out
    assert ctx.index.counts()["instances"] == 0 and blob_files(ctx) == set()


def test_invalid_uid_in_command(ctx):
    ds = instance()
    out = ctx.ingest.store_dataset([dataset_bytes(ds)], ExplicitVRLittleEndian, CT, "1.2.x", SRC)
    assert out.status in (0xA900, 0xC000) and not out.ok
    assert ctx.index.counts()["instances"] == 0


def test_sop_class_mismatch_with_command(ctx):
    ds = instance(sop_class=CT)
    out = ctx.ingest.store_dataset([dataset_bytes(ds)], ExplicitVRLittleEndian, MR, str(ds.SOPInstanceUID), SRC)
    assert out.status == 0xA900 and "differs" in out.message
    assert blob_files(ctx) == set()


def test_sop_instance_mismatch_with_command(ctx):
    ds = instance()
    out = ctx.ingest.store_dataset([dataset_bytes(ds)], ExplicitVRLittleEndian, CT, generate_uid(), SRC)
    assert out.status == 0xA900


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage" * 10, b"\0" * 128 + b"DICM" + b"\xff" * 50, b"\0" * 128 + b"DICM\x02\x00\x10\x00UI\xff\xff"],
    ids=["empty", "garbage", "bad-meta", "huge-meta-length"],
)
def test_unparsable_file(ctx, data):
    out = ctx.ingest.store_file(data, SRC)
    assert out.status in (0xC000, 0xA900) and not out.ok
    assert ctx.index.counts()["instances"] == 0 and blob_files(ctx) == set()


def test_unparsable_file_status_is_c000(ctx):
    out = ctx.ingest.store_file(b"not dicom at all, just text" * 3, SRC)
    assert out.status == Status.CANNOT_UNDERSTAND == 0xC000


def test_truncated_dataset_is_refused_or_stored_intact(ctx):
    """A data set cut in the middle of an element: never a crash; if accepted, the bytes are kept as received."""
    ds = instance(pixels=4096)
    raw = dataset_bytes(ds)
    out = ctx.ingest.store_dataset([raw[:-1000]], ExplicitVRLittleEndian, CT, str(ds.SOPInstanceUID), SRC)
    assert out.status in (0x0000, 0xA900, 0xC000)
    if out.status == 0:
        r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
        data = ctx.store.read(r.blob_key)
        assert data[dataset_offset(data):] == raw[:-1000]


def test_garbage_after_meta_over_network(ctx):
    out = ctx.ingest.store_dataset([os.urandom(3000)], ExplicitVRLittleEndian, CT, generate_uid(), SRC)
    assert out.status in (0xA900, 0xC000)
    assert blob_files(ctx) == set()


def test_nul_in_text_value_does_not_fail_the_index(ctx):
    """PostgreSQL refuses NUL in text; a data set carrying one must still be stored (and ack'd honestly)."""
    ds = instance(StudyDescription="abc\0def", PatientName="Nul\0^Name")
    out = store(ctx, ds)
    assert out.status == Status.SUCCESS, out
    assert ctx.index.counts()["instances"] == 1


# -- counters ----------------------------------------------------------------------------------------------------


def test_counters_after_ingest_and_delete(ctx):
    st1, st2 = generate_uid(), generate_uid()
    se_ct, se_mr, se_sr = generate_uid(), generate_uid(), generate_uid()
    sr_class = "1.2.840.10008.5.1.4.1.1.88.11"
    for _ in range(3):
        store(ctx, instance(study_uid=st1, series_uid=se_ct, modality="CT"))
    for _ in range(2):
        store(ctx, instance(study_uid=st1, series_uid=se_mr, modality="MR", sop_class=MR))
    store(ctx, instance(study_uid=st1, series_uid=se_sr, modality="SR", sop_class=sr_class))
    store(ctx, instance(study_uid=st2, modality="CT"))
    store(ctx, instance(patient_id="OTHER", modality="US"))

    s1 = row(ctx, studies, study_instance_uid=st1)
    assert (s1.num_series, s1.num_instances) == (3, 6)
    assert set(s1.modalities_in_study.split("\\")) == {"CT", "MR", "SR"}
    assert set(s1.sop_classes_in_study.split("\\")) == {CT, MR, sr_class}
    assert row(ctx, series, series_instance_uid=se_ct).num_instances == 3
    p = row(ctx, patients, patient_id="PID1")
    assert (p.num_studies, p.num_series, p.num_instances) == (2, 4, 7)
    assert s1.size_bytes == sum(
        r.size_bytes for r in ctx.retrieve.list_instances(st1) for r in [row(ctx, instances, sop_instance_uid=r.sop_instance_uid)]
    )

    # deleting the only MR series drops MR and the MR class from the study's lists
    assert ctx.ingest.delete("SERIES", se_mr, SRC) == 2
    s1 = row(ctx, studies, study_instance_uid=st1)
    assert (s1.num_series, s1.num_instances) == (2, 4)
    assert set(s1.modalities_in_study.split("\\")) == {"CT", "SR"}
    assert set(s1.sop_classes_in_study.split("\\")) == {CT, sr_class}
    p = row(ctx, patients, patient_id="PID1")
    assert (p.num_studies, p.num_series, p.num_instances) == (2, 3, 5)

    # one instance of the CT series
    one = ctx.retrieve.list_instances(st1, se_ct)[0]
    assert ctx.ingest.delete("IMAGE", one.sop_instance_uid, SRC) == 1
    assert row(ctx, series, series_instance_uid=se_ct).num_instances == 2
    assert os.path.exists(ctx.store.path(one.blob_key))  # readable a while for retrieves already under way
    ctx.ingest.reaper.close()  # as at shutdown: what waits goes now
    assert not os.path.exists(ctx.store.path(one.blob_key))

    # the whole second study: the patient keeps one study
    assert ctx.ingest.delete("STUDY", st2, SRC) == 1
    p = row(ctx, patients, patient_id="PID1")
    assert (p.num_studies, p.num_series, p.num_instances) == (1, 2, 3)
    assert ctx.index.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 4}

    # deleting everything removes the patient row too
    ctx.ingest.delete("STUDY", st1, SRC)
    assert ctx.index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert ctx.ingest.delete("STUDY", st1, SRC) == 0
    assert len(blob_files(ctx)) == 1  # deleted after the reaper closed: at once


def test_deleted_blobs_go_after_the_grace(ctx):
    from openpacs.services.ingest import BlobReaper

    ds = instance()
    store(ctx, ds)
    [ref] = ctx.retrieve.list_instances(str(ds.StudyInstanceUID))
    ctx.ingest.reaper.close()
    ctx.ingest.reaper = BlobReaper(ctx.store, grace=0.3)
    assert ctx.ingest.delete("STUDY", str(ds.StudyInstanceUID), SRC) == 1
    assert ctx.retrieve.list_instances(str(ds.StudyInstanceUID)) == []  # the index forgets at once
    assert bytes(ctx.store.read(ref.blob_key)) == bytes(ctx.retrieve.read_file(ref))  # a retrieve under way reads on
    deadline = time.monotonic() + 10
    while os.path.exists(ctx.store.path(ref.blob_key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(ctx.store.path(ref.blob_key))


def test_counters_in_one_batch_with_new_and_existing_entities(ctx):
    """Several instances of the same new study/series committed in one group commit are counted once each."""
    st, se = generate_uid(), generate_uid()
    store(ctx, instance(study_uid=st, series_uid=se))
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: store(ctx, instance(study_uid=st, series_uid=se if i % 2 else None,
                                                           modality="CT" if i % 2 else "MR")), range(40)))
    assert all(o.status == 0 for o in outs)
    s = row(ctx, studies, study_instance_uid=st)
    assert s.num_instances == 41
    assert s.num_series == 21
    assert set(s.modalities_in_study.split("\\")) == {"CT", "MR"}
    with ctx.index.engine.connect() as c:
        per_series = c.execute(select(series.c.num_instances).where(series.c.study_fk == s.id)).scalars().all()
    assert sum(per_series) == 41


def test_change_feed(ctx):
    ds = instance()
    store(ctx, ds)
    store(ctx, instance(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID))
    with ctx.index.engine.connect() as c:
        kinds = [r.change_type for r in c.execute(select(changes).order_by(changes.c.seq))]
    assert kinds.count("NewPatient") == 1 and kinds.count("NewStudy") == 1 and kinds.count("NewSeries") == 1
    assert kinds.count("NewInstance") == 2


# -- group commit under concurrency ------------------------------------------------------------------------------


def test_concurrent_stores_all_indexed_with_blobs(ctx):
    n = 200
    studies_uids = [generate_uid() for _ in range(5)]
    dss = [instance(study_uid=studies_uids[i % 5], patient_id=f"P{i % 3}") for i in range(n)]
    # the same SOP instance sent twice concurrently: one is stored, the other is a duplicate
    dss.append(dss[0])
    raws = [dataset_bytes(d) for d in dss]
    barrier = threading.Barrier(16)
    batches: list[int] = []
    orig = ctx.index.write_batch

    def spy(items):
        batches.append(len(items))
        return orig(items)

    ctx.index.write_batch = spy

    def go(i):
        if i < 16:
            barrier.wait()
        d = dss[i]
        return ctx.ingest.store_dataset([raws[i]], ExplicitVRLittleEndian, CT, str(d.SOPInstanceUID), SRC)

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(go, range(len(dss))))
    assert all(o.status == Status.SUCCESS for o in outs), [o for o in outs if o.status]
    assert sum(o.duplicate for o in outs) == 1
    assert sum(batches) >= n and max(batches) > 1  # commits were shared
    with ctx.index.engine.connect() as c:
        rows = {r.sop_instance_uid: r for r in c.execute(select(instances))}
    assert len(rows) == n
    for d, raw in zip(dss, raws, strict=True):
        r = rows[str(d.SOPInstanceUID)]
        data = ctx.store.read(r.blob_key)
        assert data[dataset_offset(data):] == raw
        assert r.sha256 == hashlib.sha256(raw).hexdigest()
    assert blob_files(ctx) == {r.blob_key for r in rows.values()}
    assert sum(row(ctx, studies, study_instance_uid=u).num_instances for u in studies_uids) == n
    assert os.listdir(ctx.store.tmp) == []


def test_failed_index_write_removes_blob_and_reports_failure(ctx, monkeypatch):
    def boom(items):
        raise RuntimeError("index down")

    monkeypatch.setattr(ctx.index, "write_batch", boom)
    out = store(ctx, instance())
    assert out.status == Status.OUT_OF_RESOURCES and not out.ok
    assert blob_files(ctx) == set()


def test_directory_sync_happens_before_ack(ctx, monkeypatch):
    """Every directory a blob was renamed into is fsynced before the index commit that acknowledges it."""
    events: list[str] = []
    orig_sync, orig_write = ctx.store.sync_pending, ctx.index.write_batch

    def sync():
        events.append("sync")
        orig_sync()

    def write(items):
        events.append("write")
        return orig_write(items)

    monkeypatch.setattr(ctx.store, "sync_pending", sync)
    monkeypatch.setattr(ctx.index, "write_batch", write)
    assert store(ctx, instance()).status == 0
    assert events[:2] == ["sync", "write"]


def test_store_after_close_fails_cleanly(make_ctx):
    ctx = make_ctx()
    ctx.ingest.close()
    out = store(ctx, instance())
    assert out.status == Status.OUT_OF_RESOURCES
    assert blob_files(ctx) == set()


def test_two_nodes_adding_series_to_one_study_lose_no_modality(make_ctx):
    """Two archive processes (or nodes) on one index add series with different modalities to the same study at the
    same time: ModalitiesInStudy/SOPClassesInStudy are read-modify-write lists and must not lose an update."""
    a, b = make_ctx(), make_ctx()
    st = generate_uid()
    store(a, instance(study_uid=st, modality="OT"))
    mods_a = [f"A{i}" for i in range(12)]
    mods_b = [f"B{i}" for i in range(12)]
    barrier = threading.Barrier(2)

    def run(ctx, mods):
        barrier.wait()
        for m in mods:
            assert store(ctx, instance(study_uid=st, modality=m, sop_class=f"1.2.3.{m[0] == 'A' and 1 or 2}."
                                                                            f"{m[1:]}")).status == 0

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, (a, b), (mods_a, mods_b)))
    s = row(a, studies, study_instance_uid=st)
    assert set(s.modalities_in_study.split("\\")) == {"OT", *mods_a, *mods_b}
    assert len(s.sop_classes_in_study.split("\\")) == 25
    assert (s.num_series, s.num_instances) == (25, 25)


def test_commit_that_succeeded_but_reported_an_error_never_loses_the_blob(ctx, monkeypatch):
    """A COMMIT whose acknowledgement is lost (connection dropped) raises although the rows are durable. The
    group commit then re-indexes the batch item by item, finding each instance already there with its own blob:
    that blob must not be deleted as a duplicate, and the instance must be retrievable."""
    orig = ctx.index.write_batch
    calls = []

    def flaky(items):
        calls.append(len(items))
        results = orig(items)
        if len(calls) == 1:
            raise ConnectionError("server closed the connection after COMMIT")
        return results

    monkeypatch.setattr(ctx.index, "write_batch", flaky)
    ds = instance()
    out = store(ctx, ds)
    assert out.status == Status.SUCCESS
    r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    assert ctx.store.read(r.blob_key)[-len(dataset_bytes(ds)):] == dataset_bytes(ds)


def test_failed_write_with_unknown_outcome_keeps_a_blob_the_index_references(ctx, monkeypatch):
    orig = ctx.index.write_batch

    def commit_then_fail(items):
        orig(items)
        raise ConnectionError("server closed the connection after COMMIT")

    monkeypatch.setattr(ctx.index, "write_batch", commit_then_fail)
    ds = instance()
    out = store(ctx, ds)
    assert out.status == Status.OUT_OF_RESOURCES
    monkeypatch.setattr(ctx.index, "write_batch", orig)
    # the SCU retries: the instance is already indexed, so this is an identical duplicate...
    again = store(ctx, ds)
    assert again.status == Status.SUCCESS and again.duplicate
    # ...and what the index points at must exist
    r = row(ctx, instances, sop_instance_uid=ds.SOPInstanceUID)
    assert ctx.store.read(r.blob_key)[-len(dataset_bytes(ds)):] == dataset_bytes(ds)


def test_stores_racing_close_all_get_an_answer(make_ctx):
    """A store that reaches the commit queue after close() must fail, not wait forever for a commit that never
    comes (the queue ends at close()'s sentinel); the ones queued before it are committed."""
    ctx = make_ctx()
    outcomes: list[int] = []
    stop = threading.Event()

    def keep_storing() -> None:
        while not stop.is_set():
            outcomes.append(ctx.ingest.store_file(part10(instance()), SRC).status)

    threads = [threading.Thread(target=keep_storing, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    while len(outcomes) < 20:
        threading.Event().wait(0.005)
    ctx.ingest.close()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert set(outcomes) <= {Status.SUCCESS, Status.OUT_OF_RESOURCES}
    assert ctx.index.counts()["instances"] == outcomes.count(Status.SUCCESS)
    late = ctx.ingest.store_file(part10(instance()), SRC)
    assert late.status == Status.OUT_OF_RESOURCES and "closed" in late.message
