"""STOW-RS response semantics with a fake ingest: every failure reason maps to the right status and sequence item,
including the ones a real server rarely produces (0xA700 out of resources, an exception in ingest)."""

from __future__ import annotations

import asyncio
import errno
import threading
from types import SimpleNamespace

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from openpacs.dicomweb import stow
from openpacs.services.types import StoreOutcome

B = "fakeb"
STUDY = "1.2.3"


class FakeIngest:
    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.max_parallel = 0
        self.submitted = 0
        self.threads: set[str] = set()
        self.submitted_at_first_result: int | None = None
        self._active = 0
        self._lock = threading.Lock()

    def submit_file(self, data: list, source, expected_study_uid=None):
        """As IngestService.submit_file: the part is "written" now, its outcome comes from ``result()``."""
        if bytes(data[0][:11]) == b"submitboom:":
            raise RuntimeError("bug while writing")
        self.submitted += 1
        self.threads.add(threading.current_thread().name.split("_")[0])
        return FakePending(self, b"".join(data), source)

    def store_file(self, data: bytes, source, expected_study_uid=None) -> StoreOutcome:
        with self._lock:
            self._active += 1
            self.max_parallel = max(self.max_parallel, self._active)
        try:
            import time

            time.sleep(0.02)
            self.calls.append(data)
            kind, _, sop = data.decode().partition(":")
            if kind == "ok":
                return StoreOutcome(
                    0, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop, study_instance_uid=STUDY,
                    series_instance_uid="9.9",
                )
            if kind == "warn":
                return StoreOutcome(0xB007, "kept first", "1.2.840.10008.5.1.4.1.1.2", sop, STUDY, "9.9")
            if kind == "full":
                return StoreOutcome(0xA700, "disk full", "1.2.840.10008.5.1.4.1.1.2", sop)
            if kind == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            if kind == "boom":
                raise RuntimeError("bug")
            return StoreOutcome(0xC000, "unparsable")
        finally:
            with self._lock:
                self._active -= 1


class FakePending:
    def __init__(self, ingest: FakeIngest, data: bytes, source) -> None:
        self.ingest, self.data, self.source = ingest, data, source

    def result(self) -> StoreOutcome:
        if self.ingest.submitted_at_first_result is None:
            self.ingest.submitted_at_first_result = self.ingest.submitted
        return self.ingest.store_file(self.data, self.source)


def app(ingest: FakeIngest) -> Starlette:
    inner = Starlette(routes=stow.routes(None))  # type: ignore[arg-type]
    inner.state.ctx = SimpleNamespace(settings=SimpleNamespace(), ingest=ingest)
    return Starlette(routes=[Mount("/dicom-web", app=inner)])


def send(parts: list[bytes], ingest: FakeIngest | None = None) -> httpx.Response:
    body = b"".join(b"--" + B.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + B.encode() + b"--\r\n"

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app(ingest or FakeIngest()))
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs:8042/dicom-web") as c:
            return await c.post(
                "/studies",
                content=body,
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={B}'},
            )

    return asyncio.run(run())


def reasons(r: httpx.Response) -> list[int]:
    return [i["00081197"]["Value"][0] for i in r.json().get("00081198", {}).get("Value", [])]


def test_all_ok_is_200_with_urls_and_commits_together() -> None:
    ing = FakeIngest()
    r = send([f"ok:1.{i}".encode() for i in range(20)], ing)
    assert r.status_code == 200
    refs = r.json()["00081199"]["Value"]
    assert [x["00081155"]["Value"][0] for x in refs] == [f"1.{i}" for i in range(20)]  # part order kept
    assert refs[0]["00081190"]["Value"] == ["http://pacs:8042/dicom-web/studies/1.2.3/series/9.9/instances/1.0"]
    assert r.json()["00081190"]["Value"] == ["http://pacs:8042/dicom-web/studies/1.2.3"]
    # every part was handed to ingest before the first commit was waited for: they share the group commit
    assert ing.submitted_at_first_result == 20
    # by the STOW store threads, not the thread pool that QIDO and WADO-RS need meanwhile
    assert ing.threads == {"stow-store"}


def test_out_of_resources_and_exceptions() -> None:
    r = send([b"ok:1.1", b"full:1.2", b"oserror:1.3", b"boom:1.4", b"submitboom:1.5", b"ok:1.6"])
    assert r.status_code == 202
    assert reasons(r) == [0xA700, 0xA700, 0x0110, 0x0110]
    assert len(r.json()["00081199"]["Value"]) == 2
    r = send([b"full:1.2"])  # a single instance refused for lack of space: 507 Insufficient Storage
    assert r.status_code == 507 and reasons(r) == [0xA700]
    r = send([b"full:1.2", b"full:1.3"])  # none of several stored: 409
    assert r.status_code == 409 and reasons(r) == [0xA700, 0xA700]


def test_warning_only_is_202() -> None:
    r = send([b"ok:1.1", b"warn:1.2"])
    assert r.status_code == 202
    refs = r.json()["00081199"]["Value"]
    assert "00081196" not in refs[0] and refs[1]["00081196"]["Value"] == [0xB007]
    assert "Warning" in r.headers


def test_part_of_another_media_type_fails_alone() -> None:
    body_parts = [b"ok:1.1"]
    ing = FakeIngest()
    body = b"--" + B.encode() + b"\r\nContent-Type: application/dicom\r\n\r\nok:1.1\r\n"
    body += b"--" + B.encode() + b"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--" + B.encode() + b"--"

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs/dicom-web") as c:
            return await c.post(
                "/studies",
                content=body,
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={B}'},
            )

    r = asyncio.run(run())
    assert r.status_code == 202 and reasons(r) == [0xC000]
    assert len(ing.calls) == len(body_parts)


class _SlowIngest:
    """submit_file takes 10 ms and records how many bytes the request had handed over but not yet written."""

    def __init__(self, total_seen: list[int] | None = None) -> None:
        self.store: stow._PartStore | None = None
        self.inflight_seen: list[int] = []
        self.total_seen = [] if total_seen is None else total_seen

    def submit_file(self, chunks, source, expected_study_uid=None) -> StoreOutcome:
        import time

        self.inflight_seen.append(self.store.inflight)
        self.total_seen.append(self.store.total.used)
        time.sleep(0.01)
        return StoreOutcome(0, sop_instance_uid=bytes(chunks[0]).decode())


def _part_store(ingest: _SlowIngest, limit: int, total: stow._Budget | None = None) -> stow._PartStore:
    ctx = SimpleNamespace(ingest=ingest)
    budget = stow._Budget(1 << 40) if total is None else total
    ingest.store = stow._PartStore(ctx, source=None, study=None, limit=limit, total=budget)  # type: ignore[arg-type]
    return ingest.store


def test_part_stores_share_a_process_wide_bound() -> None:
    """Four uploads at once, each with room for all its parts: the bytes handed over by all of them together stay
    within the process-wide limit plus two parts per upload, every upload completes, and the count returns to 0."""

    async def run(total_limit: int) -> tuple[list[list[str]], list[int], int]:
        total = stow._Budget(total_limit)
        seen: list[int] = []

        async def upload(name: str) -> list[str]:
            store = _part_store(_SlowIngest(seen), limit=1 << 30, total=total)
            for i in range(5):
                await store.put(i, [f"{name}{i}".encode().ljust(100, b" ")], 100)
            outcomes = await store.close()
            return [outcomes[i].sop_instance_uid.strip() for i in range(5)]

        done = await asyncio.gather(*(upload(n) for n in "abcd"))
        return done, seen, total.used

    done, seen, left = asyncio.run(run(150))
    assert done == [[f"{n}{i}" for i in range(5)] for n in "abcd"] and left == 0
    assert max(seen) <= 150 + 4 * 2 * 100  # over the limit, an upload waits unless none of its parts is unwritten
    done, seen, left = asyncio.run(run(1 << 30))
    assert left == 0 and max(seen) >= 1500  # without the bound the same uploads pile up: the check can fail


def test_part_store_backpressure_bounds_bytes_handed_over() -> None:
    """With a limit below one part, put() waits until each part is written: never two parts handed over at once."""

    async def run() -> tuple[dict[int, StoreOutcome], list[int]]:
        ing = _SlowIngest()
        store = _part_store(ing, limit=50)
        for i in range(6):
            await store.put(i, [f"p{i}".encode().ljust(100, b" ")], 100)
        return await store.close(), ing.inflight_seen

    outcomes, seen = asyncio.run(run())
    assert [outcomes[i].sop_instance_uid.strip() for i in range(6)] == [f"p{i}" for i in range(6)]
    assert max(seen) <= 200  # one part being written, at most one more just handed over

    async def unbounded() -> list[int]:
        ing = _SlowIngest()
        store = _part_store(ing, limit=1 << 30)
        for i in range(6):
            await store.put(i, [f"p{i}".encode()], 100)
        await store.close()
        return ing.inflight_seen

    assert max(asyncio.run(unbounded())) >= 400  # the same parts without the bound pile up: the check can fail


def test_part_store_gives_its_threads_back_between_parts() -> None:
    """A slow upload holds no store thread while its next part is still on the wire."""

    async def run() -> tuple[int, int, dict[int, StoreOutcome]]:
        ing = _SlowIngest()
        store = _part_store(ing, limit=1 << 20)
        await store.put(0, [b"first"], 5)
        await asyncio.gather(*store.workers)
        idle = store.running
        await store.put(1, [b"second"], 6)  # a new worker starts for it
        return idle, len(store.workers), await store.close()

    idle, workers, outcomes = asyncio.run(run())
    assert idle == 0 and workers == 2
    assert [outcomes[i].sop_instance_uid for i in (0, 1)] == ["first", "second"]


def test_metadata_data_sets_share_the_group_commit() -> None:
    """STOW-RS of DICOM JSON: every data set is written and queued before the first commit is waited for."""
    import io
    import json

    import pydicom
    from pydicom.uid import generate_uid

    class Ingest:
        submitted = 0
        submitted_at_first_result: int | None = None

        def submit_file(self, data, source, expected_study_uid=None):
            ds = pydicom.dcmread(io.BytesIO(data))
            self.submitted += 1
            ingest = self

            class Pending:
                def result(self) -> StoreOutcome:
                    if ingest.submitted_at_first_result is None:
                        ingest.submitted_at_first_result = ingest.submitted
                    return StoreOutcome(0, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                        study_instance_uid=ds.StudyInstanceUID, series_instance_uid="9.9")

            return Pending()

    sops = [generate_uid() for _ in range(5)]
    docs = [{"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]}, "00080018": {"vr": "UI", "Value": [s]},
             "0020000D": {"vr": "UI", "Value": [STUDY]}} for s in sops]
    body = (b"--" + B.encode() + b"\r\nContent-Type: application/dicom+json\r\n\r\n" + json.dumps(docs).encode()
            + b"\r\n--" + B.encode() + b"--\r\n")
    ing = Ingest()

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app(ing))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs:8042/dicom-web") as c:
            return await c.post("/studies", content=body, headers={
                "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={B}'})

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert [x["00081155"]["Value"][0] for x in r.json()["00081199"]["Value"]] == sops
    assert ing.submitted_at_first_result == 5
