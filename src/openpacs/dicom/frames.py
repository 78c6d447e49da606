"""Frame extraction from stored Part 10 files, without decoding whenever the stored bytes can be served as they are.

Native (uncompressed little endian) frames are sliced at computed offsets; encapsulated frames are found through the
Extended or Basic Offset Table or the fragments (pydicom.encaps.get_frame). Only the pixel data of the requested frame is
read from the file. Decoding (for another syntax, big endian, bit-packed frames not on a byte boundary, or rendering)
goes through pydicom's pixel API one frame at a time.
"""

from __future__ import annotations

import bisect
import errno
import io
import mmap
import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any, Generic, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .transcode import NATIVE, TranscodeError, can_decode, transcode_dataset

PIXEL_DATA = 0x7FE00010
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


# JPEG baseline/extended, MPEG-2/4 and HEVC video: never lossless
_LOSSY_ONLY = frozenset(
    ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"] + [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)]
)
# JPEG-LS near-lossless, JPEG 2000, JPEG 2000 Part 2, HTJ2K: lossless only with NEAR=0 / a reversible wavelet
_MAYBE_LOSSY = frozenset(
    ["1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"]
)


class FrameError(ValueError):
    """The instance has no such frame or no pixel data."""


def frame_count(ds: Dataset) -> int:
    """Number of Frames, 1 when absent or unreadable."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


class WouldBlock(Exception):  # noqa: N818 - named for what it says, like BlockingIOError
    """A ``nowait`` read found its bytes outside the page cache, or the frame needs decoding: a thread must do it."""


def _pread(fd: int, length: int, offset: int, nowait: bool) -> bytes:
    """``os.pread``; with ``nowait`` only from the page cache (``RWF_NOWAIT``), else WouldBlock."""
    if not nowait:
        return os.pread(fd, length, offset)
    if length > NOWAIT_MAX:  # even from the page cache, copying it would hold the event loop up
        raise WouldBlock
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, NOWAIT_FLAG)
    except BlockingIOError as exc:
        raise WouldBlock from exc
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem without RWF_NOWAIT (NFS, FUSE)
            raise WouldBlock from exc
        raise
    if n != length:  # partly cached, or truncated: the blocking read tells which
        raise WouldBlock
    return bytes(buf)


NOWAIT_FLAG: int = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14; 0: no read can be proven not to block
NOWAIT_MAX = 1 << 20  # the largest read done with nowait


def _fileno(fp: IO[bytes]) -> int | None:
    try:
        return fp.fileno()
    except (OSError, AttributeError, ValueError):  # an object store's ranged reader, BytesIO
        return None


def _read_at(fp: IO[bytes], length: int, offset: int, nowait: bool = False) -> bytes:
    """``length`` bytes at ``offset``: a pread of a local file; of an object store's reader its ``read_at`` (one
    ranged GET of just those bytes, its position untouched); of any other stream a seek and a read."""
    fd = _fileno(fp)
    if fd is not None:
        return _pread(fd, length, offset, nowait)
    if nowait:
        raise WouldBlock
    read_at = getattr(fp, "read_at", None)
    if read_at is not None:
        return read_at(offset, length) or b""
    fp.seek(offset)
    return fp.read(length) or b""


SCAN_WINDOW = 8 << 20  # a stream is scanned for its fragments in reads of this size (one ranged GET each)


class _Scan:
    """A stored file by position for the one scan that builds its fragment index: mmap of a local file, else
    windows of ``SCAN_WINDOW`` bytes of a seekable stream (an object store: ~15 GETs for a 122 MB slide)."""

    def __init__(self, fp: IO[bytes], size: int) -> None:
        fd = _fileno(fp)
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if fd is not None else None
        self._fp = fp
        self._buf: bytes | mmap.mmap = self._mm if self._mm is not None else b""
        self._start = 0
        self.size = size
        if self._mm is not None:  # a local file: straight from the mapping (50,000 items in ~10 ms)
            mm = self._mm
            self.unpack = lambda fmt, pos: struct.unpack_from(fmt, mm, pos)  # type: ignore[method-assign]

    def _window(self, pos: int, n: int) -> int:
        """The offset of ``pos`` in the buffer that holds ``n`` bytes from there (as many as the file has)."""
        if self._mm is None and not (self._start <= pos and pos + n <= self._start + len(self._buf)):
            self._buf = _read_at(self._fp, min(max(n, SCAN_WINDOW), max(0, self.size - pos)), pos)
            self._start = pos
        return pos - self._start

    def unpack(self, fmt: str, pos: int) -> tuple[Any, ...]:
        off = self._window(pos, struct.calcsize(fmt))  # first: it may move the window
        return struct.unpack_from(fmt, self._buf, off)

    def bytes_at(self, pos: int, n: int) -> bytes:
        off = self._window(pos, n)
        return bytes(self._buf[off: off + n])

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()


class FrameReader:
    """Random access to the frames of one stored instance.

    ``source`` is a local file path (preferred: nothing but the header and the frame is read), the file's bytes, or a
    seekable binary file object.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes],
                 cache_key: str | None = None) -> None:
        """``cache_key``: the stream's identity for the layout cache (an object store's immutable blob key)."""
        self._owned = False
        self._index: _FragmentIndex | None = None
        self._native: _NativeLayout | None = None
        self._n_frames: int | None = None
        if isinstance(source, str | os.PathLike) and self._open_indexed(source):
            return
        if cache_key is not None and not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview) \
                and self._open_stream_indexed(source, cache_key):
            return
        if isinstance(source, str | os.PathLike):
            self._fp: IO[bytes] = open(source, "rb")  # noqa: SIM115 - closed by close()
            self._owned = True
        elif isinstance(source, bytes | bytearray | memoryview):
            self._fp = io.BytesIO(source)
        else:
            self._fp = source
        try:
            self.ds: Dataset = pydicom.dcmread(self._fp, defer_size=1024, force=True)
            meta = getattr(self.ds, "file_meta", None)
            self.transfer_syntax = UID((meta.get("TransferSyntaxUID") if meta else None) or ImplicitVRLittleEndian)
            if self.transfer_syntax == DeflatedExplicitVRLittleEndian:
                # Offsets in a deflated file refer to the inflated stream: load it all (rare syntax, small files).
                self._fp.seek(0)
                self.ds = pydicom.dcmread(self._fp, force=True)
            self._raw: Any = self.ds._dict.get(Tag(PIXEL_DATA)) if PIXEL_DATA in self.ds else None
        except Exception:
            self.close()
            raise

    @classmethod
    def cached(cls, path: str | os.PathLike[str]) -> FrameReader | None:
        """A reader of a local file whose layout is cached already, or None: it opens with an open and an fstat,
        nothing read (building a layout reads the file, which only a thread may do)."""
        if not NOWAIT_FLAG:
            return None
        reader = cls.__new__(cls)
        reader._owned, reader._index, reader._native, reader._n_frames = False, None, None, None
        try:
            return reader if reader._open_indexed(path, build=False) else None
        except OSError:
            return None

    def _open_stream_indexed(self, fp: IO[bytes], cache_key: str) -> bool:
        """A seekable stream (an object store's blob) opened through its cached layout, built on its first use."""
        size = fp.seek(0, os.SEEK_END)
        key = (f"stream:{cache_key}", 0, size, 0)
        entry = _INDEX_CACHE.get(key)
        if entry is None:
            fp.seek(0)
            entry = _build_layout(fp, size, defer=False)  # the cached header outlives this stream: read it whole
            fp.seek(0)
            if entry is None:
                return False
            _INDEX_CACHE.put(key, entry)
        self._fp, self._owned = fp, False
        self._use(entry)
        return True

    def _use(self, entry: _NativeLayout | _FragmentIndex) -> None:
        self.ds = entry.ds  # shared between readers: read only (_full_dataset reads a private copy)
        self.transfer_syntax = entry.transfer_syntax
        self._n_frames = entry.n_frames
        self._raw = None
        if isinstance(entry, _NativeLayout):
            self._native = entry
        else:
            self._index = entry

    def _open_indexed(self, path: str | os.PathLike[str], build: bool = True) -> bool:
        """An encapsulated file opened through the cached header and fragment index (built once per file)."""
        fp: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            st = os.fstat(fp.fileno())
            key = (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
            entry = _INDEX_CACHE.get(key)
            if entry is None and not build:
                fp.close()
                return False
            if entry is None:
                entry = _build_layout(fp, st.st_size)
                if entry is None:
                    fp.close()
                    return False
                _INDEX_CACHE.put(key, entry)
        except BaseException:
            fp.close()
            raise
        self._fp, self._owned = fp, True
        self._use(entry)
        return True

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._fp.close()

    @property
    def has_pixels(self) -> bool:
        return self._raw is not None or self._index is not None or self._native is not None

    @property
    def number_of_frames(self) -> int:
        if self._n_frames is None:  # asked several times a request: pydicom's lookup is not free
            self._n_frames = frame_count(self.ds)
        return self._n_frames

    @property
    def is_native(self) -> bool:
        return self.transfer_syntax in NATIVE

    @property
    def lossy(self) -> bool:
        """The stored pixel data is (or may be) lossy compressed: Lossy Image Compression "01", a lossy-only syntax,
        or a syntax that may be either (JPEG 2000, HTJ2K, JPEG-LS near-lossless) not marked "00"."""
        flag = str(self.ds.get("LossyImageCompression", "") or "").strip()
        if flag == "01":
            return True
        if self.transfer_syntax in _LOSSY_ONLY:
            return True
        return self.transfer_syntax in _MAYBE_LOSSY and flag != "00"

    def _check(self, number: int) -> None:
        if not self.has_pixels:
            raise FrameError("instance has no pixel data")
        if not 1 <= number <= self.number_of_frames:
            raise FrameError(f"frame {number} out of range 1..{self.number_of_frames}")

    def native_frame_length(self) -> int:
        ds = self.ds
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8

    def stored_frame(self, number: int, nowait: bool = False) -> tuple[bytes, str]:
        """Frame ``number`` (1-based) as stored, and the syntax it is in.

        Native frames are returned little endian uncompressed (Explicit VR Little Endian); big endian or bit-packed
        frames that do not start on a byte boundary are decoded and re-packed for that. ``nowait``: WouldBlock
        unless the frame is one read from the page cache through the cached layout (an event loop's read).
        """
        self._check(number)
        ds = self.ds
        if self.is_native:
            bits = int(ds.BitsAllocated)
            n_samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
            if self.transfer_syntax == ExplicitVRBigEndian and bits > 8 or bits == 1 and n_samples % 8:
                if nowait:
                    raise WouldBlock
                return self.frame_as(number, ExplicitVRLittleEndian), ExplicitVRLittleEndian
            length = n_samples * bits // 8
            start = (number - 1) * length
            if self._native is not None:  # the cached layout: one pread, no parse
                if start + length > self._native.pixel_length:
                    raise FrameError(f"pixel data truncated: frame {number} incomplete")
                data = _read_at(self._fp, length, self._native.pixel_offset + start, nowait)
                if len(data) != length:
                    raise FrameError(f"pixel data truncated: frame {number} incomplete")
                return data, ExplicitVRLittleEndian
            if nowait:
                raise WouldBlock
            if self.transfer_syntax == DeflatedExplicitVRLittleEndian or self._raw.value is not None:
                value = self.ds.PixelData
                return bytes(value[start : start + length]), ExplicitVRLittleEndian
            self._fp.seek(self._raw.value_tell + start)
            data = self._fp.read(length)
            if len(data) != length:
                raise FrameError(f"pixel data truncated: frame {number} incomplete")
            return data, ExplicitVRLittleEndian
        return self._encapsulated_frame(number - 1, nowait), self.transfer_syntax

    def _encapsulated_frame(self, index: int, nowait: bool = False) -> bytes:
        if self._index is not None:
            return self._index.frame(self._fp, index, nowait)
        if nowait:
            raise WouldBlock
        ext: tuple[bytes, bytes] | None = None
        if "ExtendedOffsetTable" in self.ds and "ExtendedOffsetTableLengths" in self.ds:
            ext = (bytes(self.ds.ExtendedOffsetTable), bytes(self.ds.ExtendedOffsetTableLengths))
        try:
            if self._raw.value is not None:
                return get_frame(
                    bytes(self._raw.value), index, extended_offsets=ext, number_of_frames=self.number_of_frames
                )
            self._fp.seek(self._raw.value_tell)
            return get_frame(self._fp, index, extended_offsets=ext, number_of_frames=self.number_of_frames)
        except ValueError as exc:
            raise FrameError(str(exc)) from exc

    def array(self, number: int, *, as_rgb: bool = True) -> np.ndarray:
        """The decoded frame (YBR converted to RGB unless ``as_rgb`` is False)."""
        self._check(number)
        if not can_decode(self.transfer_syntax):
            raise TranscodeError(f"no decoder for {self.transfer_syntax.name or self.transfer_syntax}")
        ds = self._full_dataset()
        from pydicom.pixels import get_decoder

        options: Any = {"as_rgb": as_rgb}
        arr, _ = get_decoder(self.transfer_syntax).as_array(ds, index=number - 1, **options)
        return arr

    def _full_dataset(self) -> Dataset:
        """The dataset with pixel data loaded (deferred read of the pixel data only)."""
        if self._index is not None or self._native is not None:  # the cached header is shared: decode from a
            self._fp.seek(0)  # private, complete dataset
            self.ds = pydicom.dcmread(self._fp, force=True)
            self._raw = self.ds._dict.get(Tag(PIXEL_DATA))
            self._index = self._native = None
        if self._raw is not None and self._raw.value is None:
            _ = self.ds.PixelData  # loads the deferred value from the open file
            self._raw = self.ds._dict[Tag(PIXEL_DATA)]
        return self.ds

    def decoded_photometric(self) -> str:
        pi = str(self.ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if pi.startswith("YBR") and int(self.ds.get("SamplesPerPixel", 1)) == 3:
            return "RGB"  # what array(as_rgb=True) returns
        return pi

    def frame_as(self, number: int, target_ts: str, nowait: bool = False) -> bytes:
        """Frame ``number`` encoded in ``target_ts`` (native = little endian uncompressed bytes). ``nowait``: only
        a frame sent as stored and read from the page cache, else WouldBlock (decoding is a thread's work)."""
        target = UID(target_ts)
        if target == self.transfer_syntax and not self.is_native:
            self._check(number)
            return self._encapsulated_frame(number - 1, nowait)
        if target in NATIVE and self.is_native and self.transfer_syntax != ExplicitVRBigEndian:
            data, _ = self.stored_frame(number, nowait)
            return data
        if nowait:
            raise WouldBlock
        arr = self.array(number)
        mini = self._single_frame_dataset(arr)
        if target in NATIVE:
            return bytes(mini.PixelData)
        transcode_dataset(mini, target)
        return get_frame(bytes(mini.PixelData), 0, number_of_frames=1)

    def _single_frame_dataset(self, arr: np.ndarray) -> Dataset:
        mini = Dataset()
        mini.file_meta = pydicom.dataset.FileMetaDataset()
        mini.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for kw in _PIXEL_MODULE:
            if kw in self.ds:
                setattr(mini, kw, self.ds[kw].value)
        mini.PhotometricInterpretation = self.decoded_photometric()
        if int(mini.get("SamplesPerPixel", 1)) > 1:
            mini.PlanarConfiguration = 0
        mini.NumberOfFrames = 1
        if int(mini.BitsAllocated) == 1:
            from pydicom.pixels import pack_bits

            mini.PixelData = pack_bits(arr)
        else:
            mini.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        mini["PixelData"].VR = "OB" if int(mini.BitsAllocated) <= 8 else "OW"
        mini.set_original_encoding(False, True)
        return mini


class _NativeLayout:
    """Where the pixel data of one native little endian file is (its header parsed once): a frame is one pread."""

    __slots__ = ("ds", "transfer_syntax", "pixel_offset", "pixel_length", "n_frames")

    def __init__(self, ds: Dataset, ts: UID, pixel_offset: int, pixel_length: int) -> None:
        self.ds = ds
        self.n_frames = frame_count(ds)
        self.transfer_syntax = ts
        self.pixel_offset = pixel_offset
        self.pixel_length = pixel_length

    @property
    def weight(self) -> int:  # bytes held, roughly: the parsed header
        return 64 + 3 * self.pixel_offset

    @classmethod
    def build(cls, fp: IO[bytes], size: int, ds: Dataset, ts: UID) -> _NativeLayout | None:
        """None when the file is not native little endian with a top-level Pixel Data of defined length (``fp`` is
        just past the header; ``size`` is the file's)."""
        if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            return None
        pos = fp.tell()
        head = _read_at(fp, 12, pos)
        if len(head) < 8 or struct.unpack_from("<HH", head) != (0x7FE0, 0x0010):
            return None
        if ts == ExplicitVRLittleEndian:
            if len(head) < 12 or head[4:6] not in (b"OB", b"OW"):
                return None
            length, value = struct.unpack_from("<I", head, 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<I", head, 4)[0], pos + 8
        if length == 0xFFFFFFFF or value + length > size:
            return None
        return cls(ds, ts, value, length)


def _build_layout(fp: IO[bytes], size: int, defer: bool = True) -> _NativeLayout | _FragmentIndex | None:
    """The cached layout of one stored file of ``size`` bytes (its header parsed once), or None for the generic
    path. ``defer``: header values over 1 kB read when used (from the file, by its name: local files only)."""
    ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=1024 if defer else None, force=True)
    meta = getattr(ds, "file_meta", None)
    ts = UID((meta.get("TransferSyntaxUID") if meta else None) or ImplicitVRLittleEndian)
    return _NativeLayout.build(fp, size, ds, ts) or _FragmentIndex.build(fp, size, ds, ts)


_ITEM = 0xE000FFFE  # (FFFE,E000) as a little endian uint32
_SEQ_DELIMITER = 0xE0DDFFFE


class _FragmentIndex:
    """Where each frame's fragments are in one encapsulated file: computed once (a scan of the item headers through
    mmap, ~10 ms for 50,000 fragments), so a frame of a 50,000-tile slide is one pread, not a parse of the file."""

    __slots__ = ("ds", "transfer_syntax", "offsets", "lengths", "first", "n_frames")

    def __init__(self, ds: Dataset, ts: UID, offsets: array, lengths: array, first: array | None) -> None:
        self.ds = ds
        self.n_frames = frame_count(ds)
        self.transfer_syntax = ts
        self.offsets = offsets  # absolute file position of each fragment's value
        self.lengths = lengths
        self.first = first  # frame i is fragments first[i]:first[i+1]; None when one fragment per frame

    @property
    def weight(self) -> int:  # bytes held, roughly: two int64 arrays (+ the frame starts) and the parsed header
        return 16 * len(self.offsets) + 8 * (len(self.first) if self.first is not None else 0) + 3 * (self.offsets[0] if self.offsets else 0)

    @classmethod
    def build(cls, fp: IO[bytes], size: int, ds: Dataset, ts: UID) -> _FragmentIndex | None:
        """None when the file is not an indexable encapsulated file (native, deflated, odd): the generic path then
        (``fp`` is just past the header)."""
        if ts in NATIVE or ts == DeflatedExplicitVRLittleEndian or not ts.is_encapsulated:
            return None
        pos = fp.tell()
        if size - pos < 20:
            return None
        scan = _Scan(fp, size)
        try:
            tag_group, tag_elem, _vr, length = scan.unpack("<HH4sI", pos)
            if (tag_group, tag_elem) != (0x7FE0, 0x0010) or length != 0xFFFFFFFF:
                return None
            pos += 12
            tag, bot_len = scan.unpack("<II", pos)
            if tag != _ITEM or pos + 8 + bot_len > size:
                return None
            bot = array("I", scan.bytes_at(pos + 8, bot_len)) if bot_len and bot_len % 4 == 0 else None
            if bot is not None and sys.byteorder == "big":
                bot.byteswap()
            pos += 8 + bot_len
            first_item = pos
            offsets, lengths, item_rel = array("q"), array("q"), array("q")
            unpack = scan.unpack
            while pos + 8 <= size:
                tag, length = unpack("<II", pos)
                if tag == _SEQ_DELIMITER:
                    break
                if tag != _ITEM or length == 0xFFFFFFFF or pos + 8 + length > size:
                    return None  # damaged: let pydicom report it
                item_rel.append(pos - first_item)
                offsets.append(pos + 8)
                lengths.append(length)
                pos += 8 + length
        finally:
            scan.close()
        n_frames = frame_count(ds)
        first: array | None = None
        if len(offsets) != n_frames:
            starts: list[int] | None = None
            if "ExtendedOffsetTable" in ds:
                eot = array("Q", bytes(ds.ExtendedOffsetTable))
                starts = list(eot) if len(eot) == n_frames else None
            elif bot is not None and len(bot) == n_frames:
                starts = list(bot)
            elif n_frames == 1:
                starts = [0]
            if starts is None:
                return None
            first = array("q")
            for start in starts:
                first.append(bisect.bisect_left(item_rel, start))
            first.append(len(offsets))
            if any(first[i] > first[i + 1] for i in range(n_frames)):
                return None
        return cls(ds, ts, offsets, lengths, first)

    def frame(self, fp: IO[bytes], index: int, nowait: bool = False) -> bytes:
        if self.first is None:
            lo, hi = index, index + 1
        else:
            lo, hi = self.first[index], self.first[index + 1]
        parts = [_read_at(fp, self.lengths[i], self.offsets[i], nowait) for i in range(lo, hi)]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != sum(self.lengths[i] for i in range(lo, hi)):
            raise FrameError(f"pixel data truncated: frame {index + 1} incomplete")
        return data


K = TypeVar("K")
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """A thread-safe LRU bounded by entry count and by total weight (``weight(value)``, e.g. fragments held): the
    fragment indexes here and video.py's bitstream indexes. The newest entry is always kept."""

    def __init__(self, max_entries: int, max_weight: int | None = None,
                 weight: Callable[[V], int] = lambda _v: 1) -> None:
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._weight = weight
        self._data: OrderedDict[K, V] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
            return entry

    def put(self, key: K, entry: V) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._total -= self._weight(old)
            self._data[key] = entry
            self._total += self._weight(entry)
            while len(self._data) > 1 and (len(self._data) > self.max_entries or
                                           (self.max_weight is not None and self._total > self.max_weight)):
                _, dropped = self._data.popitem(last=False)
                self._total -= self._weight(dropped)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._total = 0


# fragment indexes keyed by (path, inode, size, mtime): a rewritten file gets a new entry
_INDEX_CACHE: BoundedLRU[tuple[str, int, int, int], _FragmentIndex | _NativeLayout] = BoundedLRU(
    8192, 96 << 20, lambda e: e.weight)


def frame_info(ds: Dataset) -> dict[str, Any]:
    """A few pixel-module values for headers and rendering decisions."""
    return {kw: ds.get(kw) for kw in _PIXEL_MODULE}
