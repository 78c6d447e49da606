"""`openpacs import` of folders and zip archives through the ingest path: summary counts, re-import = duplicates,
rejected junk, imported instances retrievable byte-identical, import beside a running server."""

from __future__ import annotations

import random
import re
import shutil
import zipfile

import pydicom
import pytest
from helpers import dcmtk
from helpers.dicomdata import build_query_dataset, dataset_bytes, small_image, write_part10
from helpers.server import make_server, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")


def summary(proc) -> dict[str, int]:
    text = proc.stdout + proc.stderr
    counts = {}
    for word in ("stored", "duplicates", "rejected"):
        found = re.findall(rf"\b{word}\s*[:=]\s*(\d+)", text, re.I)
        assert found, f"no '{word}: N' in the import summary:\n{text[-4000:]}"
        counts[word] = int(found[-1])
    return counts


@pytest.fixture(scope="module")
def import_set(tmp_path_factory):
    """A folder (nested) and a zip archive of synthetic instances, one identical copy, and five files to reject."""
    root = tmp_path_factory.mktemp("import-src")
    folder = root / "folder"
    folder_ds = build_query_dataset(folder / "nested" / "deeper", prefix="IMP-")
    zipped_ds = build_query_dataset(root / "tozip", prefix="ZIP-")
    archive = root / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in zipped_ds.files:
            zf.write(f, f"zipped/{f.name}")

    # an identical copy under another name: a duplicate, not a second instance
    shutil.copy(folder_ds.files[0], folder / "copy-of-first.dcm")
    rng = random.Random(7)
    junk = folder / "junk"
    junk.mkdir()
    for k in range(3):
        (junk / f"garbage{k}.dcm").write_bytes(bytes(rng.randrange(256) for _ in range(2000 + k)))
    (junk / "README.txt").write_text("not a DICOM file\n")
    lone = small_image()
    lone.PatientID, lone.StudyInstanceUID, lone.SeriesInstanceUID = "TRUNC", generate_uid(), generate_uid()
    whole = write_part10(lone, root / "lone.dcm").read_bytes()
    (junk / "truncated.dcm").write_bytes(whole[: len(whole) - 37])  # cut inside the pixel data value
    return {"folder": folder, "zip": archive, "folder_ds": folder_ds, "zip_ds": zipped_ds, "rejects": 5}


@pytest.fixture(scope="module")
def imported(request, backend, import_set, tmp_path_factory):
    """Fresh data dir, server stopped: import the folder and the zip, then import them again."""
    srv = make_server(request, tmp_path_factory.mktemp(f"import-{backend}"), backend)
    first = srv.run_cli("import", "--no-progress", str(import_set["folder"]), str(import_set["zip"]))
    second = srv.run_cli("import", "--no-progress", str(import_set["folder"]), str(import_set["zip"]))
    srv.start()
    yield srv, first, second
    stop_cleanly(srv)


def test_first_import_counts(imported, import_set):
    _, first, _ = imported
    n = len(import_set["folder_ds"].files) + len(import_set["zip_ds"].files)
    assert summary(first) == {"stored": n, "duplicates": 1, "rejected": import_set["rejects"]}, first.stdout + first.stderr
    assert first.returncode in (0, 1)


def test_reimport_is_all_duplicates(imported, import_set):
    _, _, second = imported
    n = len(import_set["folder_ds"].files) + len(import_set["zip_ds"].files)
    assert summary(second) == {"stored": 0, "duplicates": n + 1, "rejected": import_set["rejects"]}, second.stdout


def test_rejections_have_reasons(imported):
    _, first, _ = imported
    text = first.stdout
    after = text[text.lower().rfind("rejected"):]
    assert len(after.strip().splitlines()) >= 2, f"no rejection reasons listed in the summary:\n{text[-3000:]}"
    assert "unparsable" in after.lower() or "0xc000" in after.lower(), after


def test_imported_instances_are_indexed(imported, import_set, tmp_path):
    srv, _, _ = imported
    for ds in (import_set["folder_ds"], import_set["zip_ds"]):
        for _p, st in ds.studies():
            res = dcmtk.find(srv.dicom_port, "study", "STUDY",
                             {"StudyInstanceUID": st.uid, "NumberOfStudyRelatedInstances": ""}, tmp_path / "f")
            assert len(res) == 1 and int(res[0].NumberOfStudyRelatedInstances) == len(st.instances)
    res = dcmtk.find(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": ""}, tmp_path / "all")
    assert len(res) == len(import_set["folder_ds"].studies()) + len(import_set["zip_ds"].studies())


def test_imported_instances_retrieve_identical(imported, import_set, tmp_path):
    srv, _, _ = imported
    for ds in (import_set["folder_ds"], import_set["zip_ds"]):
        p, st = ds.study(ds.patients[0].studies[1].accession)
        got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": st.uid}, tmp_path / st.accession)
        assert len(got.files) == len(st.instances), got.output[-4000:]
        originals = {i.uid: i.path for i in st.instances}
        for f in got.files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(f) == dataset_bytes(originals[uid])


def test_import_while_server_runs(imported, tmp_path):
    srv, _, _ = imported
    live = build_query_dataset(tmp_path / "live", prefix="LIVE-")
    proc = srv.run_cli("import", "--no-progress", str(tmp_path / "live"))
    assert summary(proc) == {"stored": len(live.files), "duplicates": 0, "rejected": 0}, proc.stdout + proc.stderr
    assert proc.returncode == 0
    p, st = live.study("LIVE-ACC101")
    res = dcmtk.find(srv.dicom_port, "study", "IMAGE",
                     {"StudyInstanceUID": st.uid, "SeriesInstanceUID": st.series[1].uid, "SOPInstanceUID": ""},
                     tmp_path / "f")
    assert {r.SOPInstanceUID for r in res} == {i.uid for i in st.series[1].instances}
    got = dcmtk.get(srv.dicom_port, "study", "SERIES",
                    {"StudyInstanceUID": st.uid, "SeriesInstanceUID": st.series[1].uid}, tmp_path / "get")
    assert len(got.files) == len(st.series[1].instances), got.output[-3000:]


def test_import_missing_path_fails(imported, tmp_path):
    srv, _, _ = imported
    proc = srv.run_cli("import", "--no-progress", str(tmp_path / "does-not-exist"))
    assert proc.returncode != 0
    assert dcmtk.echo(srv.dicom_port).returncode == 0
