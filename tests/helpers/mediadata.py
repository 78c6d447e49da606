"""Deterministic video and document instances: an H.264 MP4 of a moving square (PyAV's libx264), its Video Endoscopic
Image instance (PS3.5 8.2.8: the MP4 as one bitstream over several fragments), and an Encapsulated PDF of a hand-written
one-page PDF (a big black rectangle and a line of text)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from .dicomdata import write_part10

VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
H264_HIGH = "1.2.840.10008.1.2.4.102"

# the moving square: SIZE x SIZE white on black, vertically centred, its left edge at square_x(frame)
SQUARE = 32


def square_x(frame: int, width: int, frames: int) -> int:
    return int(frame * (width - SQUARE) / (frames - 1))


def make_mp4(width: int = 160, height: int = 120, frames: int = 100, fps: int = 25) -> bytes:
    """An H.264 High profile MP4 (moov first, so it streams); byte-identical on every call (one encoder thread,
    explicit timestamps)."""
    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        out = av.open(path, "w", format="mp4", options={"movflags": "faststart"})
        stream = out.add_stream("libx264", rate=fps, options={"preset": "medium", "profile": "high", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            x = square_x(i, width, frames)
            img[height // 2 - SQUARE // 2 : height // 2 + SQUARE // 2, x : x + SQUARE] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        out.close()
        return Path(path).read_bytes()


def _patient_study(ds: Dataset, patient_id: str, modality: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "MEDIA^TEST"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "MEDIA1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"


def video_dataset(mp4: bytes, width: int, height: int, frames: int, fps: int, fragment: int = 1000) -> Dataset:
    """A Video Endoscopic Image instance whose Pixel Data is ``mp4`` in ``fragment``-byte fragments (the last one
    padded to even length, PS3.5 A.4)."""
    ds = Dataset()
    _patient_study(ds, "VIDEO1", "ES")
    ds.SOPClassUID = VIDEO_ENDOSCOPIC
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesDescription = "moving square"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    ds.FrameTime = 1000.0 / fps
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.CineRate = fps
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_14496_10"
    fragments = [mp4[i : i + fragment] for i in range(0, len(mp4), fragment)]
    ds.PixelData = encapsulate(fragments, has_bot=False)  # one frame: the whole bitstream, fragmented
    ds["PixelData"].VR = "OB"
    return ds


def write_video(path: Path, **kwargs: int) -> tuple[Path, bytes, Dataset]:
    width, height = kwargs.get("width", 160), kwargs.get("height", 120)
    frames, fps = kwargs.get("frames", 100), kwargs.get("fps", 25)
    mp4 = make_mp4(width, height, frames, fps)
    ds = video_dataset(mp4, width, height, frames, fps, kwargs.get("fragment", 1000))
    write_part10(ds, path, H264_HIGH)
    return path, mp4, ds


def make_pdf(text: str = "OpenPACS PDF") -> bytes:
    """A valid one-page PDF (A4-ish 300 x 200 pt): a black rectangle over the left half and a line of Helvetica."""
    content = f"0 0 0 rg 20 20 130 160 re f BT /F1 14 Tf 160 100 Td ({text[:40]}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    out += b"%" + b"openpacs " * 600 + b"\n"  # a comment: a document above the bulk data threshold of /metadata
    xref = []
    for n, body in enumerate(objects, 1):
        xref.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    start = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in xref:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, start)
    if len(out) % 2 == 0:  # odd on purpose: the stored value gets a pad byte that retrieval must cut
        out += b"\n"
    return bytes(out)


def pdf_dataset(pdf: bytes) -> Dataset:
    ds = Dataset()
    _patient_study(ds, "PDF1", "DOC")
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesDescription = "a report"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Test PDF"
    ds.ConceptNameCodeSequence = []
    ds.AcquisitionDateTime = "20260101120000"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds
