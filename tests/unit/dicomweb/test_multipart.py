"""multipart/related parser and writer: round trips, every chunking, and hostile bodies."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpacs.dicomweb import multipart as mp
from openpacs.dicomweb.multipart import (
    MultipartError,
    MultipartParser,
    OutPart,
    check_content_length,
    decoded_body,
    iter_parts,
    parse_media_type,
    write_multipart,
)

B = "b0undary-x"


def body(parts: list[bytes], boundary: str = B, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n" + epilogue


def parse(data: bytes, chunk: int = 65536, **kw: int) -> list[mp.Part]:
    p = MultipartParser(B, **kw)
    out: list[mp.Part] = []
    for i in range(0, len(data), chunk):
        out += p.feed(data[i : i + chunk])
    p.close()
    return out


async def agen(data: bytes, chunk: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


def test_parse_media_type() -> None:
    media, params = parse_media_type('Multipart/Related; type="application/dicom"; boundary="a;b=c"; start=x')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "a;b=c", "start": "x"}
    assert parse_media_type("multipart/related;boundary=abc") == ("multipart/related", {"boundary": "abc"})
    assert parse_media_type(None) == ("", {})
    assert parse_media_type('a/b; x="q\\"uo"') == ("a/b", {"x": 'q"uo'})


def test_simple_parts_and_headers() -> None:
    parts = parse(body([b"one", b"", b"three\r\n--not-the-boundary"]))
    assert [p.content for p in parts] == [b"one", b"", b"three\r\n--not-the-boundary"]
    assert parts[0].content_type == "application/dicom"


def test_preamble_epilogue_padding_and_no_headers() -> None:
    data = (
        b"preamble text\r\n--" + B.encode() + b"  \t\r\n\r\nraw\r\n--" + B.encode() + b"\r\nX-A: 1\r\n  folded\r\n\r\nz"
        b"\r\n--" + B.encode() + b"--\r\nepilogue"
    )
    parts = parse(data, chunk=3)
    assert [p.content for p in parts] == [b"raw", b"z"]
    assert parts[0].headers == {}
    assert parts[1].headers == {"x-a": "1 folded"}


@settings(max_examples=60, deadline=None)
@given(
    contents=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_any_chunking_round_trip(contents: list[bytes], chunk: int) -> None:
    # The writer's output parsed back in arbitrary chunk sizes gives the same parts (content with CR/LF/dashes too).
    contents = [c.replace(b"--" + B.encode(), b"") for c in contents]
    data = asyncio.run(collect(write_multipart([OutPart("application/dicom", c) for c in contents], B)))
    assert [p.content for p in parse(data, chunk=chunk)] == contents


def test_delimiter_prefixes_split_across_chunks() -> None:
    # Content that ends with (or contains) every proper prefix of the delimiter, fed at every small chunk size: the
    # bytes held back in case they start a delimiter go back into the part when they do not.
    delim = b"\r\n--" + B.encode()
    prefixes = [delim[:k] for k in range(1, len(delim))]
    contents = [b"x" + p for p in prefixes] + [p + b"y" + p for p in prefixes] + [b"", delim[:-1]]
    data = body(contents)
    for chunk in range(1, len(delim) + 3):
        assert [p.content for p in parse(data, chunk=chunk)] == contents, chunk


def test_large_part_content_is_not_copied() -> None:
    # A 1 MB part fed in 64 KB chunks comes back as slices of those chunks (STOW-RS writes them as they are).
    content = os.urandom(1 << 20).replace(b"\r\n", b"xx")
    data = body([content, b"tail"])
    p = MultipartParser(B)
    parts: list[mp.Part] = []
    for i in range(0, len(data), 65536):
        parts += p.feed(data[i : i + 65536])
    p.close()
    big = parts[0]
    assert big.size == len(content)
    assert sum(isinstance(c, memoryview) for c in big.chunks) >= 15
    assert big.content == content and parts[1].content == b"tail"
    # a small part is copied out: as a slice it would keep the whole chunk it came in alive
    p = MultipartParser(B)
    small, large = p.feed(body([b"small", content]))
    assert [type(c) for c in small.chunks] == [bytes] and small.content == b"small"
    assert any(isinstance(c, memoryview) for c in large.chunks)


def test_writer_streams_iterables_and_large_bodies() -> None:
    big = os.urandom(300_000)

    async def gen() -> AsyncIterator[bytes]:
        yield big[:100_000]
        yield big[100_000:]

    parts = [
        OutPart("application/dicom", gen(), {"Content-Location": "/x"}),
        OutPart("application/octet-stream", [b"a", b"b"]),
        OutPart("application/dicom", big),
    ]
    data = asyncio.run(collect(write_multipart(parts, B)))
    got = parse(data)
    assert [p.content for p in got] == [big, b"ab", big]
    assert got[0].headers["content-location"] == "/x"
    assert got[1].content_type == "application/octet-stream"


def test_writer_accepts_lazy_sync_iterables() -> None:
    def lazy():
        for i in range(3):
            yield OutPart("application/dicom", (bytes([i]) * n for n in (10, 20)))

    data = asyncio.run(collect(write_multipart(lazy(), B)))
    assert [p.content for p in parse(data)] == [bytes([i]) * 30 for i in range(3)]


@pytest.mark.parametrize(
    "boundary",
    ["", None, "x" * 201, "bad boundary ", "semi;colon", "\u00e9t\u00e9"],
)
def test_invalid_boundary(boundary: str | None) -> None:
    with pytest.raises(MultipartError) as e:
        MultipartParser(boundary)  # type: ignore[arg-type]
    assert e.value.status == 400


def test_truncated_body() -> None:
    data = body([b"abc" * 1000, b"def"])
    for cut in (5, len(data) // 2, len(data) - 5):
        with pytest.raises(MultipartError) as e:
            parse(data[:cut])
        assert e.value.status == 400
        assert "truncated" in e.value.message or "delimiter" in e.value.message


def test_wrong_boundary_and_garbage() -> None:
    with pytest.raises(MultipartError) as e:
        parse(body([b"x"], boundary="other"))
    assert e.value.status == 400
    with pytest.raises(MultipartError) as e:
        parse(os.urandom(200_000))  # preamble over its limit: rejected while streaming, not at the end
    assert e.value.status == 400


def test_empty_multipart_and_bad_delimiter_line() -> None:
    with pytest.raises(MultipartError, match="no parts"):
        parse(b"--" + B.encode() + b"--\r\n")
    with pytest.raises(MultipartError, match="CRLF"):
        parse(b"--" + B.encode() + b"garbage\r\n\r\nx\r\n--" + B.encode() + b"--")


def test_part_limit_enforced_while_streaming() -> None:
    p = MultipartParser(B, max_part_bytes=1000)
    p.feed(b"--" + B.encode() + b"\r\n\r\n")
    p.feed(b"a" * 900)
    with pytest.raises(MultipartError) as e:
        for _ in range(100):  # would be unbounded without the limit
            p.feed(b"a" * 1000)
    assert e.value.status == 413
    # A part exactly at the limit is fine.
    assert [x.content for x in parse(body([b"a" * 1000]), chunk=7, max_part_bytes=1000)] == [b"a" * 1000]


def test_header_limit_and_malformed_header() -> None:
    p = MultipartParser(B, max_header_bytes=100)
    with pytest.raises(MultipartError) as e:
        p.feed(b"--" + B.encode() + b"\r\nX: " + b"h" * 200)
    assert e.value.status == 400
    with pytest.raises(MultipartError, match="header"):
        parse(b"--" + B.encode() + b"\r\nno colon here\r\n\r\nx\r\n--" + B.encode() + b"--")


def test_too_many_parts() -> None:
    with pytest.raises(MultipartError) as e:
        parse(body([b"x"] * 5), max_parts=3)
    assert e.value.status == 413


def test_epilogue_bounded() -> None:
    for chunk in (1000, 1 << 20):  # also when the closing delimiter and the whole epilogue come in one chunk
        with pytest.raises(MultipartError):
            parse(body([b"x"], epilogue=b"e" * (mp.MAX_PREAMBLE_BYTES + 10)), chunk=chunk)
        assert [p.content for p in parse(body([b"x"], epilogue=b"e" * (mp.MAX_PREAMBLE_BYTES - 10)), chunk=chunk)] \
            == [b"x"]


def test_buffer_stays_bounded_over_many_parts() -> None:
    # 200 parts of 50 KB fed in 64 KB chunks: the internal buffer never holds much more than a part and a chunk.
    part = os.urandom(50_000).replace(b"\r\n", b"xx")
    data = body([part] * 200)
    p = MultipartParser(B)
    peak = 0
    n = 0
    for i in range(0, len(data), 65536):
        n += len(p.feed(data[i : i + 65536]))
        peak = max(peak, len(p._buf))
    p.close()
    assert n == 200
    assert peak < 3 * 65536 + 50_000


def test_content_length_claims() -> None:
    assert check_content_length(None) is None
    assert check_content_length("10") == 10
    with pytest.raises(MultipartError) as e:
        check_content_length(str(4 * 1024**3))
    assert e.value.status == 413
    for bad in ("-1", "abc", "1e9"):
        with pytest.raises(MultipartError) as e:
            check_content_length(bad)
        assert e.value.status == 400


def test_decoded_body_identity_and_limit() -> None:
    assert asyncio.run(collect(decoded_body(agen(b"abc" * 10), None))) == b"abc" * 10
    assert asyncio.run(collect(decoded_body(agen(b"abc"), "identity"))) == b"abc"
    with pytest.raises(MultipartError) as e:
        asyncio.run(collect(decoded_body(agen(b"a" * 1000, 10), None, max_body=100)))
    assert e.value.status == 413


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_decoded_body_compressed(coding: str) -> None:
    raw = body([os.urandom(100_000), b"x" * 100_000])
    if coding == "gzip":
        enc, header = gzip.compress(raw), "gzip"
    elif coding == "deflate":
        enc, header = zlib.compress(raw), "deflate"
    else:
        c = zlib.compressobj(wbits=-15)
        enc, header = c.compress(raw) + c.flush(), "deflate"
    assert asyncio.run(collect(decoded_body(agen(enc, 1000), header))) == raw


def test_gzip_concatenated_members() -> None:
    enc = gzip.compress(b"abc") + gzip.compress(b"def")
    assert asyncio.run(collect(decoded_body(agen(enc, 5), "gzip"))) == b"abcdef"


def test_gzip_bomb_is_refused_early() -> None:
    # 1 GB of zeros is ~1 MB gzipped: refused on the compression ratio after inflating only ~COMPRESSION_RATIO_FLOOR.
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    enc = b"".join(c.compress(block) for _ in range(1024)) + c.flush()
    seen = 0

    async def run() -> None:
        nonlocal seen
        async for chunk in decoded_body(agen(enc, 65536), "gzip"):
            seen += len(chunk)

    with pytest.raises(MultipartError) as e:
        asyncio.run(run())
    assert e.value.status == 413
    assert seen <= mp.COMPRESSION_RATIO_FLOOR + (2 << 20)


def test_bad_encodings() -> None:
    with pytest.raises(MultipartError) as e:
        asyncio.run(collect(decoded_body(agen(b"x"), "br")))
    assert e.value.status == 415
    with pytest.raises(MultipartError) as e:
        asyncio.run(collect(decoded_body(agen(b"not gzip at all"), "gzip")))
    assert e.value.status == 400
    with pytest.raises(MultipartError, match="truncated"):
        asyncio.run(collect(decoded_body(agen(gzip.compress(os.urandom(5000))[:-100]), "gzip")))


def test_iter_parts_raises_at_end_on_truncation() -> None:
    data = body([b"a", b"b"])

    async def run(d: bytes) -> list[bytes]:
        return [p.content async for p in iter_parts(agen(d, 4), MultipartParser(B))]

    assert asyncio.run(run(data)) == [b"a", b"b"]
    with pytest.raises(MultipartError):
        asyncio.run(run(data[:-8]))


def test_long_boundary_of_real_clients_is_accepted():
    """Orthanc's DICOMweb plugin sends two UUIDs (73 characters), past RFC 2046's 70."""
    from openpacs.dicomweb.multipart import check_boundary

    b = "c4996141-514b-45d8-a024-dbfd5218e5f3-c4996141-514b-45d8-a024-dbfd5218e5f3"
    assert check_boundary(b) == b
