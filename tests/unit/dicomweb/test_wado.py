"""Unit tests of the WADO negotiation rules and of the fast-path batch reader."""

from __future__ import annotations

import os

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)

from openpacs.dicomweb import wado
from openpacs.dicomweb.multipart import MultipartParser


def test_parse_accept_orders_by_q_and_keeps_quoted_commas() -> None:
    ranges = wado.parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80; q=0.5, '
        'multipart/related; type="application/dicom, x"; q=0.9, image/x-jls;q=0'
    )
    assert [r.q for r in ranges] == [0.9, 0.5]
    assert ranges[0].params["type"] == "application/dicom, x"
    assert wado.parse_accept("")[0].type == "*/*"


def test_dicom_syntax_choices_and_choose() -> None:
    choices = wado.dicom_syntax_choices(wado.parse_accept('multipart/related; type="application/dicom"'))
    assert choices == [ExplicitVRLittleEndian]
    assert wado.dicom_syntax_choices(wado.parse_accept("*/*")) == [ExplicitVRLittleEndian]
    star = wado.dicom_syntax_choices(
        wado.parse_accept('multipart/related; type="application/dicom"; transfer-syntax=*')
    )
    assert wado.choose_syntax(JPEGBaseline8Bit, star) == JPEGBaseline8Bit
    assert wado.choose_syntax(JPEGBaseline8Bit, [ExplicitVRLittleEndian]) == ExplicitVRLittleEndian
    assert wado.choose_syntax(ExplicitVRLittleEndian, [JPEGBaseline8Bit]) is None  # never encode lossy
    assert wado.choose_syntax(ExplicitVRLittleEndian, [JPEGBaseline8Bit, JPEGLSLossless]) == JPEGLSLossless
    assert wado.dicom_syntax_choices(wado.parse_accept("text/html")) == []


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        ("*/*", ExplicitVRLittleEndian, ("application/octet-stream", ExplicitVRLittleEndian, True)),
        # the default is uncompressed octet-stream, decoded from a lossless form, as stored only when lossy
        ("*/*", JPEGLSLossless, ("application/octet-stream", ExplicitVRLittleEndian, True)),
        ("*/*", JPEGBaseline8Bit, ("image/jpeg", JPEGBaseline8Bit, True)),
        ('multipart/related; type="*/*"; transfer-syntax=*', JPEGLSLossless, ("image/jls", JPEGLSLossless, True)),
        ("image/*", JPEGLSLossless, ("image/jls", JPEGLSLossless, False)),
        (
            'multipart/related; type="application/octet-stream"',
            JPEGLSLossless,
            ("application/octet-stream", ExplicitVRLittleEndian, True),
        ),
        (
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            JPEG2000Lossless,
            ("application/octet-stream", JPEG2000Lossless, True),
        ),
        ('multipart/related; type="image/jls"', ImplicitVRLittleEndian, ("image/jls", JPEGLSLossless, True)),
        ('multipart/related; type="image/jp2"', JPEGLSLossless, ("image/jp2", JPEG2000Lossless, True)),
        ('multipart/related; type="image/jpeg"', JPEGBaseline8Bit, ("image/jpeg", JPEGBaseline8Bit, True)),
        ('multipart/related; type="image/jpeg"', ExplicitVRLittleEndian, None),
        (
            "application/octet-stream",
            ExplicitVRLittleEndian,
            ("application/octet-stream", ExplicitVRLittleEndian, False),
        ),
    ],
)
def test_choose_frame_media(accept: str, stored: str, expected: tuple[str, str, bool] | None) -> None:
    lossy = stored == JPEGBaseline8Bit
    assert wado.choose_frame_media(wado.parse_accept(accept), stored, single=True, lossy=lossy) == expected


def test_frame_list_and_bulk_path() -> None:
    assert wado.parse_frame_list("1,3,2") == [1, 3, 2]
    for bad in ("", "0", "-1", "a", "1,,x"):
        with pytest.raises(wado.HTTPError):
            wado.parse_frame_list(bad)
    assert wado.parse_bulk_path("7FE00010") == [0x7FE00010]
    assert wado.parse_bulk_path("00540016/0/00181072") == [0x00540016, 0, 0x00181072]
    with pytest.raises(wado.HTTPError):
        wado.parse_bulk_path("00540016/0")


def test_stored_stream_batches_are_exact(tmp_path, monkeypatch) -> None:
    """Files smaller and larger than a batch, crossing batch boundaries: the body parses back to the same files with
    zeroed preambles."""
    monkeypatch.setattr(wado, "BATCH_BYTES", 100_000)
    monkeypatch.setattr(wado, "SMALL_PIECE", 10_000)
    boundary = b"testboundary"
    sizes = [200, 5_000, 99_000, 250_000, 132, 12_345, 1_000_001]
    items, originals = [], []
    for n, size in enumerate(sizes):
        body = os.urandom(128) + b"DICM" + os.urandom(size - 132)
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(body)
        originals.append(body)
        items.append((wado.part_head(boundary, "application/dicom", size), str(path), size))
    tail = b"--" + boundary + b"--\r\n"
    stream = wado._StoredStream(items, tail)
    out = bytearray()
    while not stream.done:
        batch = stream.next_batch()
        assert sum(map(len, batch)) <= 100_000 + 10_000 + 200
        for piece in batch:
            out += piece
    assert len(out) == sum(len(h) + s + 2 for h, _, s in items) + len(tail)
    parser = MultipartParser(boundary.decode())
    parts = parser.feed(bytes(out))
    parser.close()
    assert [len(p.content) for p in parts] == sizes
    for part, orig in zip(parts, originals, strict=True):
        assert part.content[:128] == bytes(128)
        assert part.content[128:] == orig[128:]


def test_zero_preamble() -> None:
    data = b"MZ" + bytes(126) + b"DICM" + b"rest"
    assert wado.zero_preamble(data) == bytes(128) + b"DICMrest"
    assert wado.zero_preamble(b"not dicom") == b"not dicom"
