"""Modality Worklist C-FIND with 10,000 scheduled procedure steps: server time per query, and the round trip.

Server time is what the SCP spends on one query once the identifier is decoded: services.worklist.find_encoded, the
SQL and every match encoded for the wire (Implicit VR Little Endian), as dimse/ris.py calls it. It is
measured in process on the index a real `openpacs serve` uses; the round trip is then measured against that server
with a pynetdicom SCU (association already open, TCP_NODELAY: C-FIND request to final response).

Steps: 20 stations x 5 modalities over 50 days, 10,000 in all (~10 per station per day); 2 % cancelled.
Queries: the modality's own worklist (station AE + today), modality + a date range of one day, an accession number,
a patient name prefix, and (for reference) every step of one day.

Run: .venv/bin/python bench/worklist_bench.py [--steps 10000] [--repeat 50]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from helpers.server import OpenPACSServer  # noqa: E402

from openpacs.index.db import Index  # noqa: E402
from openpacs.services.worklist import OrderRef, WorklistService  # noqa: E402

MODALITIES = ("CT", "MR", "US", "CR", "XA")
STATIONS = [f"{m}{i:02d}" for m in MODALITIES for i in range(4)]
DAYS = 50


def day(i: int) -> str:
    return f"202503{(i % 28) + 1:02d}" if i < 28 else f"202504{(i - 28) % 28 + 1:02d}"


def populate(service: WorklistService, n: int) -> None:
    with service.index.write_engine.begin() as conn:
        for i in range(n):
            station = STATIONS[i % len(STATIONS)]
            service.schedule(conn, OrderRef(placer=f"O{i}"), [{
                "AccessionNumber": f"A{i:07d}", "PatientID": f"P{i % 4000:05d}",
                "PatientName": f"Name{i % 997}^Given{i % 13}", "PatientBirthDate": "19700101", "PatientSex": "F",
                "Modality": station[:2], "ScheduledStationAETitle": station,
                "ScheduledProcedureStepStartDate": day((i // len(STATIONS)) % DAYS),
                "ScheduledProcedureStepStartTime": f"{8 + i % 10:02d}{(i * 7) % 60:02d}00",
                "ScheduledProcedureStepID": f"S{i}", "RequestedProcedureID": f"R{i}",
                "RequestedProcedureDescription": "Procedure", "ScheduledProcedureStepDescription": "Protocol",
                "RequestedProcedureCodeSequence": ["C1", "LOCAL", "Procedure"]}])
        conn.exec_driver_sql("UPDATE scheduled_steps SET status = 'CANCELLED' WHERE id % 50 = 0")


def identifier(top: dict[str, str], **step: str) -> Dataset:
    ds = Dataset()
    for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
              "RequestedProcedureID", "RequestedProcedureDescription", "RequestedProcedureCodeSequence",
              "ReferringPhysicianName"):
        setattr(ds, k, top.get(k, "") if k != "RequestedProcedureCodeSequence" else [])
    item = Dataset()
    for k in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
              "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID", "ScheduledProcedureStepDescription",
              "ScheduledPerformingPhysicianName"):
        setattr(item, k, step.get(k, ""))
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


QUERIES = {
    "station + day": identifier({}, ScheduledStationAETitle="CT01", ScheduledProcedureStepStartDate=day(10)),
    "modality + day range": identifier({}, Modality="MR", ScheduledProcedureStepStartDate=f"{day(12)}-{day(12)}"),
    "accession": identifier({"AccessionNumber": "A0004242"}),
    "patient name prefix": identifier({"PatientName": "name42^*"}),
    "station + day + time range": identifier({}, ScheduledStationAETitle="MR02",
                                             ScheduledProcedureStepStartDate=day(20),
                                             ScheduledProcedureStepStartTime="0800-1200"),
    "whole day (all stations)": identifier({}, ScheduledProcedureStepStartDate=day(5)),
}


def server_time(service: WorklistService, ds: Dataset, repeat: int) -> tuple[float, int]:
    times = []
    n = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        matches = service.find_encoded(ds, True)
        times.append(time.perf_counter() - t0)
        n = len(matches)
    return statistics.median(times) * 1000, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = OpenPACSServer(Path(tmp) / "data")
        srv.start()
        try:
            index = Index(f"sqlite:///{srv.data_dir}/index.sqlite")
            service = WorklistService(index)
            t0 = time.perf_counter()
            populate(service, args.steps)
            print(f"{args.steps} steps scheduled in {time.perf_counter() - t0:.1f} s")
            ae = AE(ae_title="BENCHSCU")
            ae.add_requested_context(ModalityWorklistInformationFind)
            assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="OPENPACS")
            assert assoc.is_established
            # as TCP_NODELAY=1 does for DCMTK: else the identifier PDU waits out the server's delayed ACK (~40 ms)
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
            print(f"{'query':32} {'matches':>7} {'server ms (median)':>19} {'round trip ms (median)':>23}")
            for name, ds in QUERIES.items():
                ms, n = server_time(service, ds, args.repeat)
                rtts = []
                for _ in range(max(5, args.repeat // 5)):
                    t1 = time.perf_counter()
                    got = sum(1 for status, _ in assoc.send_c_find(ds, ModalityWorklistInformationFind)
                              if status and status.Status in (0xFF00, 0xFF01))
                    rtts.append(time.perf_counter() - t1)
                    assert got == n, (name, got, n)
                print(f"{name:32} {n:7d} {ms:19.2f} {statistics.median(rtts) * 1000:23.2f}")
            assoc.release()
            index.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
