"""The fragment index of an encapsulated object read from a stream (an object store's ranged reader): built once in
a few large reads, then each frame is one read of its own bytes; the same frames as the local file's index."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from helpers.wsi import write_big_slide

from openpacs.dicom import frames
from openpacs.dicom.frames import FrameReader


class CountingRaw(io.BytesIO):
    """Bytes read the way the server reads an object store's blob (``BufferedReader`` over a raw stream), each read
    recorded as (position, size), like S3's ranged GETs."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []
        self.name = "blob"  # pydicom asks a BufferedReader's raw stream for its name

    def read(self, size: int | None = -1) -> bytes:
        pos = self.tell()
        data = super().read(size)
        self.reads.append((pos, len(data)))
        return data

    def readinto(self, b: Any) -> int:
        pos = self.tell()
        n = super().readinto(b)
        self.reads.append((pos, n))
        return n


def test_stream_index_reads_little_and_matches_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(frames, "SCAN_WINDOW", 256 << 10)  # several windows for this ~2 MB slide
    path = tmp_path / "slide.dcm"
    slide = write_big_slide(path, seed="frame-index-stream", tiles_across=30, tiles_down=30)  # no offset table
    data = path.read_bytes()
    raw = CountingRaw(data)
    reader = FrameReader(io.BufferedReader(raw, buffer_size=64 << 10), cache_key="20261207blob-under-test")
    assert reader._index is not None and reader.number_of_frames == 900
    windows = -(-len(data) // (256 << 10))
    assert len(raw.reads) <= windows + 8, raw.reads  # the header, then the scan: a window a read
    raw.reads.clear()
    for n in (1, 450, 900):
        assert reader.stored_frame(n)[0] == slide.tile(0, (n - 1) % 30, (n - 1) // 30)
    assert [size for _pos, size in raw.reads] == [len(slide.tile(0, (n - 1) % 30, (n - 1) // 30))
                                                  for n in (1, 450, 900)]  # one read of the frame's bytes each
    with FrameReader(path) as local:
        assert [local.stored_frame(n) for n in (7, 899)] == [reader.stored_frame(n) for n in (7, 899)]

    again = CountingRaw(data)  # the same blob opened again: the cached index, only the header's reads
    second = FrameReader(io.BufferedReader(again, buffer_size=64 << 10), cache_key="20261207blob-under-test")
    assert second._index is reader._index and again.reads == []
    assert second.stored_frame(3)[0] == slide.tile(0, 2, 0) and len(again.reads) == 1


def test_a_stream_without_key_takes_the_generic_path(tmp_path: Path) -> None:
    path = tmp_path / "slide.dcm"
    slide = write_big_slide(path, seed="frame-index-generic", tiles_across=4, tiles_down=4)
    reader = FrameReader(io.BufferedReader(CountingRaw(path.read_bytes())))
    assert reader._index is None and reader.stored_frame(16)[0] == slide.tile(0, 3, 3)
