"""Compression at rest (services/compression.py): a pixel-exact round trip on every pydicom test file that decodes,
with every codec; then the compress job over stored instances, the index switched in one transaction, and every
instance still retrievable in every transfer syntax we write, pixel-identical to what was received."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from core_factory import SRC
from helpers.dicomdata import prepare_conformance_files
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from sqlalchemy import select

from openpacs.dicom.transcode import NATIVE, WRITABLE, read_dataset, transcode
from openpacs.index.schema import instances, series, studies
from openpacs.index.storage_schema import compression_results
from openpacs.services.compression import CODECS, COMPRESSED, KIND, Compressor, encode_verified
from openpacs.services.doctor import blob_digest
from openpacs.services.jobs import DONE, JobContext
from openpacs.services.storage_schedule import StorageScheduler, for_context

MAX_TEST_FILE = 32 << 20  # color3d_jpeg_baseline.dcm (110 MB decoded) would take half a minute per codec


def _decodable_test_files() -> list[tuple[str, bytes, np.ndarray]]:
    """(name, natively encoded Part 10 bytes, decoded pixels) of every pydicom test file whose pixels decode:
    encapsulated ones are decoded to Explicit VR Little Endian first (what compression at rest starts from)."""
    from pydicom.data import get_testdata_files

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files("*.dcm")):
            if os.path.getsize(path) > MAX_TEST_FILE:
                continue
            try:
                ds = pydicom.dcmread(path)
                if "PixelData" not in ds:
                    continue
                ds.pixel_array  # noqa: B018 - decodes, or the file is not one "that decodes"
                data = Path(path).read_bytes()
                if str(ds.file_meta.TransferSyntaxUID) not in NATIVE:
                    data = transcode(data, ExplicitVRLittleEndian)
                arr = np.array(read_dataset(data).pixel_array, copy=True)
            except Exception:  # noqa: BLE001 - does not decode here
                continue
            out.append((Path(path).name, data, arr))
    return out


_FILES = _decodable_test_files()


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_is_pixel_exact_on_every_test_file_that_decodes(codec):
    """Whatever encode_verified accepts decodes (independently, here) to exactly the original pixels; what it
    refuses carries a reason (a pixel format the codec cannot hold, or a round trip that would not be exact)."""
    target = CODECS[codec]
    assert len(_FILES) >= 80
    accepted, refused = 0, {}
    for name, data, original in _FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = encode_verified(data, None, target)
            if result.data is None:
                assert result.reason, name
                refused[name] = result.reason
                continue
            back = pydicom.dcmread(__import__("io").BytesIO(result.data))
            assert str(back.file_meta.TransferSyntaxUID) == target, name
            assert back.SOPInstanceUID == read_dataset(data).SOPInstanceUID  # the same instance (PS3.5 8.2)
            decoded = back.pixel_array
        assert decoded.shape == original.shape and np.array_equal(decoded, original), name
        accepted += 1
    assert accepted >= 70, refused
    # the files no codec can hold losslessly are refused, never stored: 1-bit segmentations, 32-bit samples
    assert any("1-bit" in r for r in refused.values())


def test_encode_refuses_what_is_not_natively_encoded(tmp_path):
    from helpers.dicomdata import testdata_file

    data = Path(testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes()
    assert encode_verified(data, None, JPEGLSLossless).reason.startswith("already encoded")
    sr = Path(testdata_file("test-SR.dcm")).read_bytes()
    assert encode_verified(sr, None, JPEGLSLossless).reason == "no pixel data"


def _store_conformance(ctx, tmp_path):
    files = prepare_conformance_files(tmp_path / "conf")
    for f in files:
        out = ctx.ingest.store_file(f.path.read_bytes(), SRC)
        assert out.ok, (f.name, out.message)
    return files


def _pixels(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(read_dataset(data).pixel_array, copy=True)


def test_compress_job_switches_the_index_and_every_syntax_is_still_served(ctx, tmp_path):
    ctx.settings.compress = "jpeg-ls-lossless"
    files = _store_conformance(ctx, tmp_path)
    original = {f.sop_instance_uid: f.path.read_bytes() for f in files}
    with ctx.index.engine.connect() as c:
        before = {r.sop_instance_uid: r for r in c.execute(select(instances))}
        study_sizes = dict(c.execute(select(studies.c.study_instance_uid, studies.c.size_bytes)).all())
    svc = for_context(ctx)
    try:
        eligible = dict(svc.compression.eligible(1000))
        natives = {u for u, r in before.items() if r.transfer_syntax_uid in NATIVE and r.rows is not None}
        assert set(eligible) == natives and len(natives) >= 6

        # through the scheduler and the job queue, as `openpacs serve` runs it
        [job] = StorageScheduler(ctx).tick()
        assert job.kind == KIND and job.total == len(natives)
        assert StorageScheduler(ctx).tick() == []  # one compress job at a time
        claimed = ctx.jobs.claim([KIND])
        jc = JobContext(claimed, ctx.jobs)
        Compressor(ctx, svc.compression).run(jc)
        ctx.jobs.finish(claimed, None)
        done = ctx.jobs.get(job.id)
        assert done.state == DONE and done.done == job.total
        p = done.payload
        assert p["compressed"] >= 4 and p["bytes_saved"] == p["bytes_before"] - p["bytes_after"] > 0

        with ctx.index.engine.connect() as c:
            after = {r.sop_instance_uid: r for r in c.execute(select(instances))}
            results = {r.sop_instance_uid: r for r in c.execute(select(compression_results))}
            new_sizes = dict(c.execute(select(studies.c.study_instance_uid, studies.c.size_bytes)).all())
            series_sum = c.execute(select(series.c.study_fk, series.c.size_bytes)).all()
        assert set(results) == natives  # every eligible instance handled, none offered again
        assert svc.compression.eligible(1000) == []
        compressed = [u for u, r in results.items() if r.state == COMPRESSED]
        assert len(compressed) == p["compressed"]
        for uid in compressed:
            a, b, res = after[uid], before[uid], results[uid]
            assert a.transfer_syntax_uid == JPEGLSLossless and a.blob_key != b.blob_key
            assert a.size_bytes == res.bytes_after < res.bytes_before == b.size_bytes
            assert blob_digest(ctx.store, a.blob_key) == a.sha256  # the recorded SHA-256 is the new blob's
            assert b.blob_key in {k for _, keys in ctx.ingest.reaper._due for k in keys}  # old blob: after the grace
        for uid, r in after.items():
            if uid not in compressed:
                assert r.blob_key == before[uid].blob_key and r.transfer_syntax_uid == before[uid].transfer_syntax_uid
        # study and series sizes follow the instances
        for study_uid, size in new_sizes.items():
            saved = sum(before[u].size_bytes - after[u].size_bytes for u in compressed
                        if next(f for f in files if f.sop_instance_uid == u).study_uid == study_uid)
            assert size == study_sizes[study_uid] - saved
        assert sum(s for _, s in series_sum) == sum(r.size_bytes for r in after.values())

        summary = svc.compression.summary()
        assert summary["compressed"] == len(compressed) and summary["bytes_saved"] == p["bytes_saved"]

        # retrieval: the stored (compressed) form, and every transfer syntax we write, pixel-identical to the original
        for uid in compressed:
            stored = ctx.store.read(after[uid].blob_key)
            want = _pixels(original[uid])
            assert np.array_equal(_pixels(stored), want)
            for ts in sorted(WRITABLE):
                try:
                    out = transcode(stored, ts)
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"{uid}: cannot serve {ts}: {e}")
                ds = read_dataset(out)
                assert str(ds.file_meta.TransferSyntaxUID) == ts and ds.SOPInstanceUID == uid
                assert np.array_equal(_pixels(out), want), (uid, ts)
    finally:
        svc.close()


def test_instance_replaced_while_compressing_keeps_the_new_one(ctx, tmp_path):
    from core_factory import instance, store

    ds = instance(pixels=4096)
    assert store(ctx, ds).ok
    svc = for_context(ctx).compression
    real = svc._row

    def replaced_meanwhile(sop):
        row = real(sop)
        from sqlalchemy import update

        with ctx.index.write_engine.begin() as c:  # another store replaced the blob after it was read
            c.execute(update(instances).where(instances.c.sop_instance_uid == sop).values(blob_key="2026010100" + "0" * 32))
        return row

    svc._row = replaced_meanwhile
    try:
        state, _, _, reason = svc.compress_instance(str(ds.SOPInstanceUID), JPEGLSLossless)
    finally:
        svc.close()
    assert (state, reason) == ("skipped", "changed while being compressed")
    with ctx.index.engine.connect() as c:
        assert c.execute(select(instances.c.blob_key)).scalar() == "2026010100" + "0" * 32
    # the unused compressed blob went: only the original file is left in the store
    assert len(list(ctx.store.keys_older_than(float("inf")))) == 1
