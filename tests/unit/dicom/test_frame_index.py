"""The layout of an object read through an object store's reader (storage/s3.py ``RangedReader``: buffered reads
plus ``read_at``): the fragment index built once in a few large reads, then each frame one read of its own bytes;
the same frames and pixels as the local file's; nothing read through one path that another path then misses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from helpers.wsi import write_big_slide
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from openpacs.dicom import frames
from openpacs.dicom.frames import FrameReader
from openpacs.storage.s3 import RangedReader, _RangedFile


class CountingStore:
    """What RangedReader asks of S3BlobStore (``read(key, start, end)``), over bytes, each GET recorded."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gets: list[tuple[int, int]] = []

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        end = len(self.data) if end is None else end
        self.gets.append((start, end - start))
        return self.data[start:end]


def ranged(store: CountingStore) -> RangedReader:
    return RangedReader(_RangedFile(store, "blob", len(store.data)), 64 << 10)  # type: ignore[arg-type]


def test_stream_index_reads_little_and_matches_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(frames, "SCAN_WINDOW", 256 << 10)  # several windows for this ~2 MB slide
    path = tmp_path / "slide.dcm"
    slide = write_big_slide(path, seed="frame-index-stream", tiles_across=30, tiles_down=30)  # no offset table
    store = CountingStore(path.read_bytes())
    reader = FrameReader(ranged(store), cache_key="20261207blob-under-test")
    assert reader._index is not None and reader.number_of_frames == 900
    windows = -(-len(store.data) // (256 << 10))
    assert len(store.gets) <= windows + 8, store.gets  # the header, then the scan: a window a GET
    store.gets.clear()
    tiles = {n: slide.tile(0, (n - 1) % 30, (n - 1) // 30) for n in (1, 450, 900)}
    for n, tile in tiles.items():
        assert reader.stored_frame(n)[0] == tile
    assert [size for _pos, size in store.gets] == [len(t) for t in tiles.values()]  # a GET of its bytes each
    with FrameReader(path) as local:
        assert [local.stored_frame(n) for n in (7, 899)] == [reader.stored_frame(n) for n in (7, 899)]

    again = CountingStore(store.data)  # the same blob opened again: the cached index, nothing read to open it
    second = FrameReader(ranged(again), cache_key="20261207blob-under-test")
    assert second._index is reader._index and again.gets == []
    assert second.stored_frame(3)[0] == slide.tile(0, 2, 0) and len(again.gets) == 1


def _native(path: Path, frames_: int = 4, size: int = 256) -> np.ndarray:
    pixels = np.random.default_rng(3).integers(0, 4096, (frames_, size, size), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7.3", generate_uid()  # multi-frame grayscale
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames_, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageComments = "x" * 3000  # a header value above the deferral size
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return pixels


def test_a_stream_layout_then_a_decode_reads_the_right_bytes(tmp_path: Path) -> None:
    """After the layout's reads by position, a whole-dataset read (a transcode, /rendered) still starts at byte 0
    of the object: a 512 kB native file, larger than the reader's buffer."""
    path = tmp_path / "native.dcm"
    pixels = _native(path)
    reader = FrameReader(ranged(CountingStore(path.read_bytes())), cache_key="20261208native-blob")
    assert reader._native is not None and reader.ds.ImageComments == "x" * 3000  # read whole, not deferred
    assert reader.stored_frame(4)[0] == pixels[3].tobytes()
    np.testing.assert_array_equal(reader.array(2), pixels[1])


def test_a_stream_without_key_takes_the_generic_path(tmp_path: Path) -> None:
    path = tmp_path / "native.dcm"
    pixels = _native(path, frames_=2)
    reader = FrameReader(ranged(CountingStore(path.read_bytes())))  # deferred values read back from the stream
    assert reader._native is None and reader._index is None
    assert reader.stored_frame(2)[0] == pixels[1].tobytes()
    assert pydicom.dcmread(io.BytesIO(path.read_bytes())).ImageComments == reader.ds.ImageComments
