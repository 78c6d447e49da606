"""Outbound HL7 to the RIS (`ris_hl7`): a modality's MPPS (pynetdicom SCU) start and end reach the RIS as order
status updates (ORC-1 SC, ORC-5 IP / CM / DC), queued in the index while the RIS is down, kept across a restart of
OpenPACS, retried when the RIS answers AE, and delivered in order. The RIS is python-hl7's asyncio MLLP server
(`hl7.mllp.start_hl7_server`); its messages are read back with `hl7.parse`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import hl7
import hl7.mllp
import pytest
from helpers.ports import free_port
from helpers.server import make_server, stop_cleanly
from pydicom.uid import generate_uid
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from test_worklist_mpps import _assoc, _completed, _mpps_create, orm, send


class FakeRIS:
    """python-hl7's MLLP server on a loopback port in its own event loop thread: records every message it gets and
    answers AE to the first delivery of the control IDs listed in ``refuse_once``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str]] = []  # (control ID, ACK code sent)
        self.messages: list[hl7.Message] = []
        self.refuse_once: set[str] = set()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                control = str(msg.segment("MSH")[10])
                with self.lock:
                    code = "AE" if control in self.refuse_once else "AA"
                    self.refuse_once.discard(control)
                    self.received.append((control, code))
                    self.messages.append(msg)
                writer.writemessage(msg.create_ack(ack_code=code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def _start(self) -> None:
        self.server = await hl7.mllp.start_hl7_server(self._client, "127.0.0.1", self.port, encoding="utf-8")

    def start(self) -> FakeRIS:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait_for(self, n: int, timeout: float = 60) -> list[hl7.Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.1)
        raise AssertionError(f"the RIS got {len(self.messages)} messages, not {n}: {self.received}")


def jobs(srv, state: str | None = None) -> list[dict]:
    q = "kind=hl7_out" + (f"&state={state}" if state else "")
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/api/jobs?{q}&limit=100", timeout=30) as r:
        return json.loads(r.read())["items"]


def summary(msg: hl7.Message) -> tuple[str, str, str, str]:
    """(message type, ORC-1, ORC-5, accession from IPC-1)."""
    return (str(msg.segment("MSH")[9]), str(msg.segment("ORC")[1]), str(msg.segment("ORC")[5]),
            str(msg.segment("IPC")[1]))


def mpps(srv, acc: str, station: str, end: str) -> None:
    uid = generate_uid()
    assoc = _assoc(srv, station)
    try:
        assert assoc.send_n_create(_mpps_create(acc, f"SPS{acc}"), ModalityPerformedProcedureStep,
                                   uid)[0].Status == 0
        final = _completed()
        final.PerformedProcedureStepStatus = end
        assert assoc.send_n_set(final, ModalityPerformedProcedureStep, uid)[0].Status == 0
    finally:
        assoc.release()


def test_status_updates_queued_while_down_survive_restart_retry_and_keep_order(request, backend, tmp_path) -> None:
    ris_port = free_port()
    srv = make_server(request, tmp_path, backend, settings={
        "ris_hl7": f"mllp://127.0.0.1:{ris_port}", "ris_hl7_timeout": 5, "job_backoff_seconds": 0.5,
        "job_backoff_max": 1.0, "job_max_attempts": 100})
    srv.start()
    ris = FakeRIS(ris_port)
    try:
        for i, (acc, name) in enumerate([("RA1", "Müller^Jürgen^^Dr"), ("RA2", "Smith^Alice")]):
            assert send(srv, orm(f"C{i}", "NW", f"O{acc}", acc, f"P{acc}", name, "CT", "CT01",
                                 "20250303080000")) == ("AA", "")
        mpps(srv, "RA1", "CT01", "COMPLETED")
        mpps(srv, "RA2", "CT01", "DISCONTINUED")
        # the RIS is down: four messages wait in the queue, each attempt's error says why
        deadline = time.monotonic() + 30
        while not all(j["error"] for j in jobs(srv)) and time.monotonic() < deadline:
            time.sleep(0.2)
        queued = jobs(srv)
        assert len(queued) == 4 and all(j["state"] in ("pending", "running") for j in queued)
        assert any("unreachable" in j["error"] for j in queued), queued

        stop_cleanly(srv)  # the queue is in the index: it outlives the process
        srv.start()
        first = sorted(jobs(srv), key=lambda j: j["id"])[0]
        # the first message is refused once (AE): it is sent again, and nothing overtakes it
        ris.refuse_once.add(json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{srv.http_port}/api/jobs/{first['id']}", timeout=30).read())["payload"]["control_id"])
        ris.start()
        got = ris.wait_for(5)
        assert [code for _, code in ris.received] == ["AE", "AA", "AA", "AA", "AA"]
        assert ris.received[0][0] == ris.received[1][0]
        assert [summary(m) for m in got[1:]] == [
            ("OMI^O23^OMI_O23", "SC", "IP", "RA1"), ("OMI^O23^OMI_O23", "SC", "CM", "RA1"),
            ("OMI^O23^OMI_O23", "SC", "IP", "RA2"), ("OMI^O23^OMI_O23", "SC", "DC", "RA2")]
        cm = got[2]
        assert str(cm.segment("ORC")[2]) == "ORA1" and str(cm.segment("ORC")[3]) == "FORA1"  # placer, filler
        assert str(cm.segment("PID")[3][0][0]) == "PRA1" and str(cm.segment("PID")[5]) == "Müller^Jürgen^^Dr"  # the XPN the RIS sent
        assert str(cm.segment("MSH")[18]) == "UNICODE UTF-8"
        assert str(cm.segment("OBR")[8]).startswith("20250303083000")  # the MPPS's end
        deadline = time.monotonic() + 30
        while {j["state"] for j in jobs(srv)} != {"done"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {j["state"] for j in jobs(srv)} == {"done"}
        time.sleep(1.5)
        assert len(ris.received) == 5  # each acknowledged message went out once
    finally:
        ris.stop()
        stop_cleanly(srv)


@pytest.mark.parametrize("version, kind", [("2.4", "ORM^O01"), ("2.5.1", "OMI^O23^OMI_O23")])
def test_message_per_version(version, kind) -> None:
    from types import SimpleNamespace

    from openpacs.hl7.outbound import status_message

    settings = SimpleNamespace(aet="OPENPACS", ris_hl7_application="RIS", ris_hl7_facility="HOSP",
                               ris_hl7_version=version)
    step = SimpleNamespace(patient_id="P1", issuer_of_patient_id="HOSP", patient_name="O'Brien^Seán",
                           patient_birth_date="19700101", patient_sex="M", placer_order_number="PL|1",
                           filler_order_number="FI1", requested_procedure_id="RP1",
                           requested_procedure_description="CT head", accession_number="ACC1",
                           study_instance_uid="1.2.3", scheduled_procedure_step_id="SPS1", modality="CT")
    text, control = status_message(settings, _mpps_create("ACC1", "SPS1"), "IN PROGRESS", step)
    msg = hl7.parse(text)
    assert str(msg.segment("MSH")[9]) == kind and str(msg.segment("MSH")[10]) == control
    assert str(msg.segment("MSH")[12]) == version
    assert str(msg.segment("ORC")[5]) == "IP"
    assert msg.unescape(str(msg.segment("ORC")[2])) == "PL|1"  # the field separator travels escaped
    if kind == "ORM^O01":
        obr = msg.segment("OBR")
        assert (str(obr[18]), str(obr[19]), str(obr[20]), str(obr[24])) == ("ACC1", "RP1", "SPS1", "CT")
    else:
        ipc = msg.segment("IPC")
        assert (str(ipc[1]), str(ipc[2]), str(ipc[3]), str(ipc[4]), str(ipc[5])) == ("ACC1", "RP1", "1.2.3",
                                                                                     "SPS1", "CT")
