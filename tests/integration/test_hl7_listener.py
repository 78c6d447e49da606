"""The HL7 v2 listener end to end: a real `openpacs serve`, python-hl7's MLLP clients (the blocking
``hl7.client.MLLPClient`` and the asyncio ``hl7.mllp.open_hl7_connection``), raw sockets for broken framing.

Each message's ACK is checked (MSA-1, MSA-2, ERR) and each effect is read back through the server's own interfaces:
the message log API, DCMTK findscu (C-FIND), QIDO-RS, getscu (C-GET), WADO-RS and the metadata.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import hl7
import hl7.client
import hl7.mllp
import pydicom
import pytest
from helpers import dcmtk
from helpers.dicomdata import dataset_bytes, small_image, write_part10
from helpers.server import OpenPACSServer, make_server, stop_cleanly
from pydicom.uid import generate_uid

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


@pytest.fixture(scope="module")
def srv(request, backend, storescp, require_dcmtk, tmp_path_factory):
    """One server per backend (SQLite, PostgreSQL), with DESTSCP (DCMTK storescp) as a C-MOVE destination."""
    base = tmp_path_factory.mktemp(f"hl7-{backend}")
    server = make_server(request, base, backend, settings={"hl7_max_message": 1024 * 1024},
                         remote_aes={"DESTSCP": ("DESTSCP", "127.0.0.1", storescp.port)})
    server.start()
    yield server
    stop_cleanly(server)


def adt(control_id: str, trigger: str, body: str, version: str = "2.5", charset: str = "",
        sender: str = "RIS") -> str:
    msh = f"MSH|^~\\&|{sender}|HOSP|OPENPACS|RAD|20250102030405||ADT^{trigger}^ADT_A01|{control_id}|P|{version}"
    if charset:
        msh += "||||||" + charset
    return "\r".join([msh, f"EVN|{trigger}|20250102030405", body]) + "\r"


class Frames:
    """ACK frames from a raw socket, buffered (one recv may hold two frames, or half of one)."""

    def __init__(self, sock: socket.socket, data: bytes = b"") -> None:
        self.sock = sock
        self.data = data

    def next(self) -> bytes:
        while FS not in self.data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a full ACK: {self.data!r}")
            self.data += chunk
        end = self.data.index(FS)
        frame = self.data[self.data.index(VT) + 1 : end]
        self.data = self.data[end + 1 :].lstrip(CR)
        return frame


def _recv_frame(sock: socket.socket, first: bytes = b"") -> bytes:
    return Frames(sock, first).next()


def send(srv: OpenPACSServer, message: str | bytes, encoding: str = "utf-8") -> hl7.Message:
    """One message through python-hl7's MLLPClient; the ACK parsed (read to its <FS>: recv may split it)."""
    with hl7.client.MLLPClient("127.0.0.1", srv.hl7_port, encoding=encoding) as client:
        first = client.send_message(message if isinstance(message, bytes) else message.encode(encoding))
        return hl7.parse(_recv_frame(client.socket, first).decode(encoding))


def msa(ack: hl7.Message) -> tuple[str, str]:
    seg = ack.segment("MSA")
    return str(seg[1]), str(seg[2])


def err_location(ack: hl7.Message) -> str:
    return str(ack.segment("ERR")[2])


def api(srv: OpenPACSServer, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{srv.http_port}/api{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def log_of(srv: OpenPACSServer, control_id: str) -> list[dict]:
    return api(srv, "/hl7/messages", control_id=control_id)["items"]


def find_patient(srv: OpenPACSServer, tmp: Path, patient_id: str) -> list[pydicom.Dataset]:
    return dcmtk.find(srv.dicom_port, "patient", "PATIENT",
                      {"PatientID": patient_id, "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
                       "IssuerOfPatientID": ""}, tmp / f"find-{patient_id}")


def store_study(srv: OpenPACSServer, tmp: Path, patient_id: str, name: str, n: int = 2) -> str:
    study_uid = generate_uid()
    series_uid = generate_uid()
    files = []
    for i in range(n):
        ds = small_image(fill=i)
        ds.PatientID = patient_id
        ds.PatientName = name
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.StudyDate = "20250101"
        ds.InstanceNumber = i + 1
        files.append(write_part10(ds, tmp / f"st-{study_uid}" / f"{i}.dcm"))
    dcmtk.store(srv.dicom_port, files).check()
    return study_uid


def qido(srv: OpenPACSServer, **params: str) -> list[dict]:
    url = f"http://127.0.0.1:{srv.http_port}/dicom-web/studies?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else []


def wado_instances(srv: OpenPACSServer, study_uid: str) -> list[pydicom.Dataset]:
    """WADO-RS study retrieve (multipart/related application/dicom), every part read with pydicom."""
    import io
    import re

    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/dicom-web/studies/{study_uid}",
                                 headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(req, timeout=60) as r:
        ctype = r.headers["Content-Type"]
        body = r.read()
    boundary = re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()
    out = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = part.partition(b"\r\n\r\n")
        out.append(pydicom.dcmread(io.BytesIO(payload[:-2]), force=True))
    return out


def metadata(srv: OpenPACSServer, study_uid: str) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/dicom-web/studies/{study_uid}/metadata",
                                timeout=60) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------------------------------


def test_a04_creates_patient_with_all_name_components_and_identifiers(srv, tmp_path) -> None:
    ack = send(srv, adt("A04-1", "A04", "PID|1||MRN100^^^HOSP^MR~SSN9^^^SSA^SS||"
                                        "Smith\\T\\Jones^Anna^Maria^Jr^Dr||19800215|F|||Main St^^Town"))
    assert msa(ack) == ("AA", "A04-1")
    assert str(ack.segment("MSH")[12]) == "2.5" and str(ack.segment("MSH")[9]) == "ACK^A04^ACK"
    found = find_patient(srv, tmp_path, "MRN100")
    assert len(found) == 1
    p = found[0]
    # XPN family^given^middle^suffix^prefix -> PN family^given^middle^prefix^suffix; \T\ is the subcomponent '&'
    assert str(p.PatientName) == "Smith&Jones^Anna^Maria^Dr^Jr"
    assert p.PatientBirthDate == "19800215" and p.PatientSex == "F" and p.IssuerOfPatientID == "HOSP"
    [row] = log_of(srv, "A04-1")
    assert row["result"] == "AA" and row["message_type"] == "ADT^A04" and row["patient_id"] == "MRN100"
    detail = api(srv, f"/hl7/messages/{row['id']}")
    assert "Smith\\T\\Jones" in detail["raw"] and "MSA|AA|A04-1" in detail["ack"]


def test_non_ascii_names_in_utf8_and_latin1(srv, tmp_path) -> None:
    ack = send(srv, adt("U8-1", "A04", "PID|1||MRN200^^^HOSP||Øster^Zoë||19700101|M", charset="UNICODE UTF-8"))
    assert msa(ack) == ("AA", "U8-1")
    assert str(ack.segment("MSH")[18]) == "UNICODE UTF-8"
    ack = send(srv, adt("L1-1", "A04", "PID|1||MRN201^^^HOSP||Müller^Jürgen||19700101|M", charset="8859/1"),
               encoding="latin-1")
    assert msa(ack) == ("AA", "L1-1") and str(ack.segment("MSH")[18]) == "8859/1"
    # \X..\ hex escapes are bytes of the message's character set (here two UTF-8 bytes: é)
    ack = send(srv, adt("X-1", "A04", "PID|1||MRN202^^^HOSP||Caf\\XC3A9\\^Ren\\XC3A9\\", charset="UNICODE UTF-8"))
    assert msa(ack) == ("AA", "X-1")
    names = {pid: str(find_patient(srv, tmp_path, pid)[0].PatientName) for pid in ("MRN200", "MRN201", "MRN202")}
    assert names == {"MRN200": "Øster^Zoë", "MRN201": "Müller^Jürgen", "MRN202": "Café^René"}


def test_escapes_repetitions_and_z_segments(srv, tmp_path) -> None:
    body = ("PID|1||MRN300^^^HOSP^MR~ALT1^^^CLINIC^PI||O\\F\\Brien^Pat\\S\\X^^^||19991231|U\r"
            "PV1|1|O\rZPI|custom|data^with^components\rZXX|1")
    ack = send(srv, adt("Z-1", "A08", body, version="2.8"))
    assert msa(ack) == ("AA", "Z-1") and str(ack.segment("MSH")[12]) == "2.8"
    [p] = find_patient(srv, tmp_path, "MRN300")
    assert str(p.PatientName) == "O|Brien^Pat^X"  # \F\ '|' and \S\ '^' as text, not structure
    assert p.PatientSex in ("", None)  # U (unknown) is an empty PatientSex in DICOM


def test_errors_name_the_field(srv) -> None:
    ack = send(srv, adt("E-1", "A04", "PID|1||||NoId^Patient"))
    assert msa(ack) == ("AE", "E-1")
    assert err_location(ack) == "PID^1^3" and str(ack.segment("ERR")[3][0][0]) == "101"
    ack = send(srv, adt("E-2", "A40", "PID|1||MRN900^^^HOSP||New^Name\rMRG|NOSUCH^^^HOSP"))
    assert msa(ack) == ("AE", "E-2") and err_location(ack) == "MRG^1^1"
    assert str(ack.segment("ERR")[3][0][0]) == "204"
    # v2.3/2.4: the location and code are in ERR-1
    ack = send(srv, adt("E-3", "A04", "PID|1||||NoId", version="2.3"))
    assert msa(ack) == ("AE", "E-3")
    assert str(ack.segment("ERR")[1]).startswith("PID^1^3^101")
    # a bad birth date is an AE on PID-7; nothing of the message applies
    ack = send(srv, adt("E-4", "A04", "PID|1||MRN901^^^HOSP||Half^Applied||31-12-1990|F"))
    assert msa(ack) == ("AE", "E-4") and err_location(ack) == "PID^1^7"
    assert log_of(srv, "E-4")[0]["result"] == "AE"


def test_unsupported_type_version_and_garbage_are_rejected_and_the_listener_keeps_answering(srv) -> None:
    ack = send(srv, adt("R-1", "A99", "PID|1||MRN1"))
    assert msa(ack) == ("AR", "R-1")
    ack = send(srv, "MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||XYZ^Q01|R-2|P|2.5\r")
    assert msa(ack) == ("AR", "R-2")
    ack = send(srv, adt("R-3", "A04", "PID|1||MRN1", version="3.1"))
    assert msa(ack) == ("AR", "R-3") and str(ack.segment("ERR")[3][0][0]) == "203"
    ack = send(srv, b"this is not HL7 at all \x00\xff")
    assert str(ack.segment("MSA")[1]) == "AR"
    ack = send(srv, b"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025|")  # truncated inside MSH
    assert str(ack.segment("MSA")[1]) == "AR"
    ack = send(srv, adt("R-4", "A04", "PID|1||MRN1", charset="KLINGON"))
    assert msa(ack) == ("AR", "R-4")
    ack = send(srv, b"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^A08|R-5|P|2.5||||||UNICODE UTF-8\rPID|1||M\xff\xfe")
    assert msa(ack) == ("AR", "R-5")  # declared UTF-8, is not
    assert msa(send(srv, adt("R-OK", "A08", "PID|1||MRN-OK^^^HOSP||Still^Alive"))) == ("AA", "R-OK")


def test_broken_framing_oversized_and_cut_short(srv) -> None:
    with socket.create_connection(("127.0.0.1", srv.hl7_port), timeout=30) as s:
        frames = Frames(s)
        # oversized (the test server's hl7_max_message is 1 MB; 10 MB of PID): AR, its MSH-10 in MSA-2
        big = adt("BIG-1", "A08", "PID|1||MRN-BIG^^^HOSP||" + "X" * (10 * 1024 * 1024)).encode()
        s.sendall(VT + big + FS + CR)
        assert msa(hl7.parse(frames.next().decode())) == ("AR", "BIG-1")
        # a frame cut short by the next <VT>: AR for the first (never applied), the second applies
        s.sendall(VT + adt("CUT-1", "A08", "PID|1||MRN-CUT^^^HOSP||Cut^Short").encode()[:-8])
        s.sendall(VT + adt("CUT-2", "A08", "PID|1||MRN-CUT2^^^HOSP||Whole^Msg").encode() + FS + CR)
        assert msa(hl7.parse(frames.next().decode())) == ("AR", "CUT-1")
        assert msa(hl7.parse(frames.next().decode())) == ("AA", "CUT-2")
        # noise between frames is ignored; the same connection keeps working
        s.sendall(b"\r\n  \r" + VT + adt("AFTER-1", "A08", "PID|1||MRN-AFTER^^^HOSP||A^B").encode() + FS + CR)
        assert msa(hl7.parse(frames.next().decode())) == ("AA", "AFTER-1")
    # the oversized message is logged without its 10 MB
    [row] = log_of(srv, "BIG-1")
    assert row["result"] == "AR" and row["size"] <= 1024 * 1024


def test_duplicate_control_id_gets_the_first_ack_and_applies_once(srv, tmp_path) -> None:
    first = send(srv, adt("DUP-1", "A08", "PID|1||MRN400^^^HOSP||First^Name||19600101|M"))
    assert msa(first) == ("AA", "DUP-1")
    again = send(srv, adt("DUP-1", "A08", "PID|1||MRN400^^^HOSP||Second^Name||19600101|M"))
    assert str(again) == str(first)  # the very same ACK (its own MSH-10 and time included)
    assert str(find_patient(srv, tmp_path, "MRN400")[0].PatientName) == "First^Name"
    # the same control ID from another sending application is another message
    other = send(srv, adt("DUP-1", "A08", "PID|1||MRN400^^^HOSP||Third^Name||19600101|M", sender="ADMISSIONS"))
    assert msa(other) == ("AA", "DUP-1") and str(other) != str(first)
    assert str(find_patient(srv, tmp_path, "MRN400")[0].PatientName) == "Third^Name"
    assert [r["error"] or "" for r in log_of(srv, "DUP-1")][1].startswith("duplicate of message")


def test_500_messages_over_5_connections_all_acknowledged_and_applied(srv, tmp_path) -> None:
    async def one_connection(c: int) -> list[tuple[str, str]]:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", srv.hl7_port, encoding="utf-8")
        acks = []
        try:
            for i in range(100):
                pid = f"LOAD{c}-{i % 20}"
                writer.writemessage(hl7.parse(adt(f"LOAD-{c}-{i}", "A08",
                                                  f"PID|1||{pid}^^^HOSP||Load{c}^Msg{i}||19900101|F")))
                await writer.drain()
                ack = await reader.readmessage()
                acks.append(msa(ack))
        finally:
            writer.close()
            await writer.wait_closed()
        return acks

    async def run_all() -> list[list[tuple[str, str]]]:
        return await asyncio.gather(*(one_connection(c) for c in range(5)))

    results = asyncio.run(run_all())
    for c, acks in enumerate(results):
        assert acks == [("AA", f"LOAD-{c}-{i}") for i in range(100)]
    # applied in order: each patient got messages i, i+20, ..., the last one (i+80) wins
    for c in range(5):
        [p] = find_patient(srv, tmp_path, f"LOAD{c}-7")
        assert str(p.PatientName) == f"Load{c}^Msg87"
    assert len(api(srv, "/hl7/messages", type="ADT^A08", limit="100", patient="LOAD3-7")["items"]) == 5


def test_a08_rename_is_visible_in_cfind_qido_cget_cmove_and_wado(srv, storescp, tmp_path) -> None:
    study = store_study(srv, tmp_path, "MRN500", "Before^Rename")
    # read once before: the server's metadata cache must not serve the old patient module afterwards
    assert {item["00100010"]["Value"][0]["Alphabetic"] for item in metadata(srv, study)} == {"Before^Rename"}
    assert msa(send(srv, adt("REN-1", "A08", "PID|1||MRN500||Ωmega^Renamed^Q||19751203|F",
                             charset="UNICODE UTF-8"))) == ("AA", "REN-1")
    [p] = find_patient(srv, tmp_path, "MRN500")
    assert str(p.PatientName) == "Ωmega^Renamed^Q" and p.PatientBirthDate == "19751203"
    studies = dcmtk.find(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study, "PatientName": ""},
                         tmp_path / "find-study")
    assert [str(s.PatientName) for s in studies] == ["Ωmega^Renamed^Q"]
    [q] = qido(srv, StudyInstanceUID=study, includefield="PatientBirthDate")
    assert q["00100010"]["Value"][0]["Alphabetic"] == "Ωmega^Renamed^Q"
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, tmp_path / "get")
    assert len(got.files) == 2
    for f in got.files:
        ds = pydicom.dcmread(f)
        assert str(ds.PatientName) == "Ωmega^Renamed^Q" and ds.PatientBirthDate == "19751203"
        assert ds.PatientSex == "F" and ds.PatientID == "MRN500"
        assert ds.pixel_array.shape == (8, 8)  # the rest of the object is intact
    for ds in wado_instances(srv, study):
        assert str(ds.PatientName) == "Ωmega^Renamed^Q" and ds.PatientSex == "F"
    for item in metadata(srv, study):
        assert item["00100010"]["Value"][0]["Alphabetic"] == "Ωmega^Renamed^Q"
    # WADO-URI
    sop = pydicom.dcmread(got.files[0]).SOPInstanceUID
    series = pydicom.dcmread(got.files[0]).SeriesInstanceUID
    url = (f"http://127.0.0.1:{srv.http_port}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
           f"&objectUID={sop}&contentType=application%2Fdicom")
    import io

    with urllib.request.urlopen(url, timeout=60) as r:
        uri = pydicom.dcmread(io.BytesIO(r.read()))
    assert str(uri.PatientName) == "Ωmega^Renamed^Q"
    # C-MOVE to DCMTK storescp
    storescp.clear()
    moved = dcmtk.move(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, "DESTSCP")
    assert moved.final_status() == 0 and moved.final_counts().get("completed") == 2, moved.output[-3000:]
    files = storescp.files()
    assert len(files) == 2
    assert {str(pydicom.dcmread(f).PatientName) for f in files} == {"Ωmega^Renamed^Q"}
    # the console's tag browser and zip download (REST API) show the same patient module
    import json
    import zipfile

    api = f"http://127.0.0.1:{srv.http_port}/api"
    with urllib.request.urlopen(f"{api}/instances/{sop}/tags", timeout=60) as r:
        tags = json.loads(r.read())
    name = next(e for e in tags["elements"] if e.get("keyword") == "PatientName")
    assert "Ωmega^Renamed^Q" in json.dumps(name, ensure_ascii=False)
    with urllib.request.urlopen(f"{api}/studies/{study}/download", timeout=60) as r:
        z = zipfile.ZipFile(io.BytesIO(r.read()))
    names = {str(pydicom.dcmread(io.BytesIO(z.read(n))).PatientName) for n in z.namelist()
             if n != "DICOMDIR"}
    assert names == {"Ωmega^Renamed^Q"}


def test_untouched_patients_are_served_byte_identical(srv, tmp_path) -> None:
    study = store_study(srv, tmp_path, "PLAIN900", "Never^Touched", n=1)
    [sent] = (tmp_path / f"st-{study}").glob("*.dcm")
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, tmp_path / "get-plain")
    [f] = got.files
    assert dataset_bytes(f) == dataset_bytes(sent)  # getscu +B keeps the bytes as sent: nothing was re-encoded
    [w] = wado_instances(srv, study)
    assert str(w.PatientName) == "Never^Touched"


def test_a40_merge_moves_studies_everywhere(srv, tmp_path) -> None:
    s1 = store_study(srv, tmp_path, "OLD600", "Dup^Record", n=1)
    s2 = store_study(srv, tmp_path, "NEW600", "Real^Record", n=1)
    assert msa(send(srv, adt("MRG-1", "A40", "PID|1||NEW600||Real^Record^^^||19500505|M\rMRG|OLD600"))) == \
        ("AA", "MRG-1")
    assert find_patient(srv, tmp_path, "OLD600") == []
    [p] = dcmtk.find(srv.dicom_port, "patient", "PATIENT", {"PatientID": "NEW600", "NumberOfPatientRelatedStudies": ""},
                     tmp_path / "find-new")
    assert int(p.NumberOfPatientRelatedStudies) == 2
    assert {q["0020000D"]["Value"][0] for q in qido(srv, PatientID="NEW600")} == {s1, s2}
    assert qido(srv, PatientID="OLD600") == []
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": s1}, tmp_path / "get-merged")
    [f] = got.files
    ds = pydicom.dcmread(f)
    assert ds.PatientID == "NEW600" and str(ds.PatientName) == "Real^Record" and ds.PatientBirthDate == "19500505"
    [w] = wado_instances(srv, s1)
    assert w.PatientID == "NEW600"


def test_a47_changes_the_identifier(srv, tmp_path) -> None:
    study = store_study(srv, tmp_path, "TEMP700", "Temp^Id", n=1)
    ack = send(srv, adt("CHG-1", "A47", "PID|1||MRN700^^^HOSP^MR||Temp^Id\rMRG|TEMP700"))
    assert msa(ack) == ("AA", "CHG-1")
    assert find_patient(srv, tmp_path, "TEMP700") == []
    [p] = find_patient(srv, tmp_path, "MRN700")
    assert p.IssuerOfPatientID == "HOSP"
    [w] = wado_instances(srv, study)
    assert w.PatientID == "MRN700" and w.IssuerOfPatientID == "HOSP"
    # an A47 onto an identifier that exists is refused (that is a merge); the test makes
    # that patient itself so that it does not depend on another test having run first
    ack = send(srv, adt("CHG-0", "A04", "PID|1||MRN799^^^HOSP^MR||Other^Patient"))
    assert msa(ack) == ("AA", "CHG-0")
    ack = send(srv, adt("CHG-2", "A47", "PID|1||MRN799^^^HOSP||X^Y\rMRG|MRN700^^^HOSP"))
    assert msa(ack) == ("AE", "CHG-2") and err_location(ack) == "PID^1^3"
    ack = send(srv, adt("CHG-3", "A47", "PID|1||MRN701||X^Y\rMRG|NOBODY"))
    assert msa(ack) == ("AE", "CHG-3") and err_location(ack) == "MRG^1^1"


def test_updates_are_audited_as_patient_record_events(srv) -> None:
    assert msa(send(srv, adt("AUD-1", "A08", "PID|1||MRN800^^^HOSP||Audit^Me"))) == ("AA", "AUD-1")
    events = []
    for _ in range(50):  # the audit writer batches; the API flushes it before reading
        events = api(srv, "/audit", event="PatientRecord", patient="MRN800")["items"]
        if events:
            break
    assert events and events[0]["action"] in ("C", "U") and "AUD-1" in (events[0]["detail"] or "")
