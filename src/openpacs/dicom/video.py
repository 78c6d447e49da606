"""Encapsulated video (PS3.5 8.2.5-8.2.8): the MPEG-2 / MPEG-4 AVC/H.264 / HEVC bitstream of an instance's Pixel Data.

A video instance holds one bitstream split over any number of fragments (items of the encapsulated Pixel Data after
the Basic Offset Table); the stream a player wants is their concatenation. :class:`VideoIndex` walks the item headers
once (8 bytes read per fragment, never the fragment data) and then serves any byte range of the stream by reading only
the fragments it spans, in bounded chunks, so that a browser seeking in a large video costs what it reads.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from .frames import BoundedLRU, FrameReader

# transfer syntax -> the media type of its bitstream (PS3.18 Table 8.7.4-1 / 10.4.1.1.3 rendered video)
VIDEO_MEDIA: dict[str, str] = {
    "1.2.840.10008.1.2.4.100": "video/mpeg",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.100.1": "video/mpeg",  # fragmentable
    "1.2.840.10008.1.2.4.101": "video/mpeg",  # MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.101.1": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.102.1": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",  # BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103.1": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",  # High Profile / Level 4.2 for 2D video
    "1.2.840.10008.1.2.4.104.1": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",  # High Profile / Level 4.2 for 3D video
    "1.2.840.10008.1.2.4.105.1": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",  # Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.106.1": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/mp4",  # HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108": "video/mp4",  # HEVC/H.265 Main 10 Profile / Level 5.1
}

_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little endian uint32: group FFFE, element E000
_SEQ_DELIMITER = 0xE0DDFFFE
CHUNK = 256 * 1024  # the largest read (and response chunk) of a range


class VideoError(ValueError):
    pass


def is_video_syntax(transfer_syntax: str) -> bool:
    return str(transfer_syntax) in VIDEO_MEDIA


def video_media_type(transfer_syntax: str) -> str | None:
    return VIDEO_MEDIA.get(str(transfer_syntax))


@dataclass(frozen=True)
class VideoIndex:
    """Where the fragments of the bitstream lie: ``offsets[i]`` is the position of fragment ``i``'s data in the stored
    source (file offset), ``starts[i]`` its first byte's position in the stream, ``size`` the stream length."""

    offsets: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    size: int
    inline: bytes | None = None  # a tiny bitstream that pydicom read with the header (no file offsets to use)

    @classmethod
    def scan(cls, fp: IO[bytes], value_tell: int) -> VideoIndex:
        """Walk the items of an encapsulated Pixel Data value whose first item header is at ``value_tell``."""
        offsets: list[int] = []
        starts: list[int] = []
        lengths: list[int] = []
        pos, size, first = value_tell, 0, True
        while True:
            fp.seek(pos)
            header = fp.read(8)
            if len(header) < 8:
                if first:
                    raise VideoError("encapsulated pixel data truncated")
                break  # no sequence delimiter before the end of the file: what was found is the stream
            tag, length = struct.unpack("<II", header)
            if tag == _SEQ_DELIMITER:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise VideoError(f"unexpected element ({tag & 0xFFFF:04X},{tag >> 16:04X}) in encapsulated pixel data")
            if not first:  # the first item is the Basic Offset Table (empty for video, PS3.5 A.4)
                offsets.append(pos + 8)
                starts.append(size)
                lengths.append(length)
                size += length
            first = False
            pos += 8 + length
        if not lengths:
            raise VideoError("no video bitstream in the pixel data")
        return cls(tuple(offsets), tuple(starts), tuple(lengths), size)

    @classmethod
    def from_bytes(cls, value: bytes) -> VideoIndex:
        """The index of a Pixel Data value already in memory; the stream is kept (it is small: under defer_size)."""
        import io

        idx = cls.scan(io.BytesIO(value), 0)
        data = b"".join(value[o : o + n] for o, n in zip(idx.offsets, idx.lengths, strict=True))
        return cls(idx.offsets, idx.starts, idx.lengths, idx.size, data)

    def iter_range(self, fp: IO[bytes] | None, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """Bytes ``start``..``end`` (inclusive) of the stream, in chunks of at most ``chunk`` bytes."""
        if not 0 <= start <= end < self.size:
            raise VideoError(f"range {start}-{end} outside the stream (0-{self.size - 1})")
        if self.inline is not None:
            for pos in range(start, end + 1, chunk):
                yield self.inline[pos : min(pos + chunk, end + 1)]
            return
        assert fp is not None
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos <= end:
            within = pos - self.starts[i]
            take = min(self.lengths[i] - within, end + 1 - pos)
            fp.seek(self.offsets[i] + within)
            left = take
            while left > 0:
                data = fp.read(min(chunk, left))
                if not data:
                    raise VideoError("video fragment truncated")
                left -= len(data)
                yield data
            pos += take
            i += 1


# the last few indexes by stored object: a browser asks for many ranges of one video
INDEX_CACHE: BoundedLRU[Any, VideoIndex] = BoundedLRU(32)


def video_index(reader: FrameReader, key: Any = None) -> VideoIndex:
    """The bitstream index of an open instance (cached under ``key`` when given: the stored object's identity)."""
    if key is not None and (hit := INDEX_CACHE.get(key)) is not None:
        return hit
    if not is_video_syntax(str(reader.transfer_syntax)):
        raise VideoError(f"transfer syntax {reader.transfer_syntax} is not a video syntax")
    raw = reader._raw  # the Pixel Data element as pydicom found it (value unread when deferred)
    if raw is None:
        raise VideoError("instance has no pixel data")
    if raw.value is not None:
        idx = VideoIndex.from_bytes(bytes(raw.value))
    else:
        idx = VideoIndex.scan(reader._fp, raw.value_tell)
    if key is not None:
        INDEX_CACHE.put(key, idx)
    return idx


def read_stream(reader: FrameReader, idx: VideoIndex, start: int, end: int) -> Iterator[bytes]:
    return idx.iter_range(None if idx.inline is not None else reader._fp, start, end)
