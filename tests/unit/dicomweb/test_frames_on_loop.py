"""Frames answered on the event loop (``WadoRS._frames_now``) and through a thread are the same answers; the loop
answers only what it can without blocking: the index through its own SQLite reader, a cached layout, page-cache
reads (RWF_NOWAIT), frames as stored. Everything else takes the thread, as before."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from core_factory import instance, store
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from openpacs.dicom.frames import FrameReader, WouldBlock
from openpacs.dicomweb.wado import WadoRS

OCTET = "application/octet-stream"


def _on_tmpfs(path: Path) -> bool:
    """tmpfs keeps a file's pages whatever fadvise says: there a page-cache miss cannot be made."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


@pytest.fixture
def slide(ctx: Any) -> tuple[Any, dict[str, str], Path]:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = instance(study_uid=study, series_uid=series, sop_uid=sop, pixels=4096)  # 1 x 2,048, bytes 0..255 over
    assert store(ctx, ds).status == 0
    [ref] = ctx.retrieve.list_instances(study, series, sop)
    return ctx, {"study": study, "series": series, "instance": sop, "frames": "1"}, Path(ctx.store.path(ref.blob_key))


def _answer(rs: WadoRS, p: dict[str, str], monkeypatch: pytest.MonkeyPatch,
            departments: tuple[str, ...] | None = None, accept: str = OCTET) -> tuple[int, bytes, int]:
    """(status, body, thread hops) of one frames request."""
    hops = [0]
    real = asyncio.BaseEventLoop.run_in_executor

    def counting(self: Any, executor: Any, func: Any, *args: Any) -> Any:
        hops[0] += 1
        return real(self, executor, func, *args)

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counting)
    response = asyncio.run(rs.frames_response(p, accept, departments))
    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", real)
    return response.status_code, bytes(response.body), hops[0]


def test_a_warm_frame_is_answered_on_the_loop_and_equals_the_threads(slide, monkeypatch) -> None:
    ctx, p, _path = slide
    rs = WadoRS(ctx)
    status, first, hops = _answer(rs, p, monkeypatch)  # the layout is not cached yet: built in a thread
    assert (status, hops) == (200, 1) and first == bytes(range(256)) * 16
    status, again, hops = _answer(rs, p, monkeypatch)
    assert status == 200 and again == first
    assert hops == (0 if ctx.index.is_sqlite else 1)  # PostgreSQL: the lookup is a round trip, never on the loop


def test_not_found_and_out_of_scope_are_404_on_the_loop_too(slide, monkeypatch) -> None:
    ctx, p, _path = slide
    rs = WadoRS(ctx)
    assert _answer(rs, p, monkeypatch)[0] == 200
    loop_hops = 0 if ctx.index.is_sqlite else 1
    status, _body, hops = _answer(rs, {**p, "instance": "1.2.3.4"}, monkeypatch)
    assert (status, hops) == (404, loop_hops)
    status, _body, hops = _answer(rs, p, monkeypatch, departments=("cardiology",))  # the study has no department
    assert (status, hops) == (404, loop_hops)
    assert _answer(rs, p, monkeypatch, departments=())[0] == 404
    status, _body, hops = _answer(rs, {**p, "frames": "2"}, monkeypatch)  # a one-frame instance
    assert (status, hops) == (404, loop_hops)


def test_a_page_cache_miss_goes_to_a_thread(slide, monkeypatch) -> None:
    ctx, p, path = slide
    if _on_tmpfs(path):
        pytest.skip("tmpfs: the file's pages cannot leave the page cache")
    rs = WadoRS(ctx)
    _status, first, _hops = _answer(rs, p, monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the file was fsynced at ingest: its clean pages go
    finally:
        os.close(fd)
    status, body, hops = _answer(rs, p, monkeypatch)
    assert (status, body, hops) == (200, first, 1)
    assert _answer(rs, p, monkeypatch)[2] == (0 if ctx.index.is_sqlite else 1)  # read back into the cache


def test_reader_nowait_rules(slide) -> None:
    ctx, _p, path = slide
    with FrameReader(path) as built:  # builds and caches the layout
        stored, ts = built.stored_frame(1)
    reader = FrameReader.cached(path)
    assert reader is not None
    with reader:
        assert reader.stored_frame(1, nowait=True) == (stored, ts)
        with pytest.raises(WouldBlock):
            reader.frame_as(1, JPEGBaseline8Bit, nowait=True)  # an encode is a thread's work
    copy = path.with_name("copy.dcm")
    copy.write_bytes(path.read_bytes())
    assert FrameReader.cached(copy) is None  # a file never opened has no layout: nothing is read on the loop
    assert FrameReader.cached(path.with_name("missing.dcm")) is None


def test_loop_reader_sees_later_commits(ctx) -> None:
    db = ctx.index.loop_reader()
    if not ctx.index.is_sqlite:
        assert db is None
        return
    assert db is not None
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    assert ctx.retrieve.list_instances(study, dbapi_conn=db) == []
    assert store(ctx, instance(study_uid=study, series_uid=series, sop_uid=sop)).status == 0
    [ref] = ctx.retrieve.list_instances(study, series, sop, dbapi_conn=db)  # no snapshot held from the first read
    assert ref == ctx.retrieve.list_instances(study, series, sop)[0]
    with pytest.raises(Exception, match="readonly|read-only"):
        db.execute("DELETE FROM instances")


def test_a_filesystem_without_nowait_reads_goes_to_the_thread(slide, monkeypatch) -> None:
    """NFS or FUSE may refuse RWF_NOWAIT (EOPNOTSUPP): the frame is then read by the thread, never a 500."""
    import errno

    ctx, p, _path = slide
    rs = WadoRS(ctx)
    _status, first, _hops = _answer(rs, p, monkeypatch)

    def refuse(*_a: Any) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refuse)
    assert _answer(rs, p, monkeypatch) == (200, first, 1)


def test_a_large_frame_is_read_by_the_thread(slide, monkeypatch) -> None:
    """Above NOWAIT_MAX even a cached frame is a thread's to copy, so that the loop is never held up by it."""
    from openpacs.dicom import frames

    ctx, p, _path = slide
    rs = WadoRS(ctx)
    _status, first, _hops = _answer(rs, p, monkeypatch)
    monkeypatch.setattr(frames, "NOWAIT_MAX", len(first) - 1)
    assert _answer(rs, p, monkeypatch) == (200, first, 1)
