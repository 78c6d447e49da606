"""Rendered video and documents (PS3.18 10.4.1.1.3, Table 8.3.5-1): what a browser can show of an instance that is not
a picture.

- Encapsulated video (MPEG-2, H.264, HEVC syntaxes): the bitstream as ``video/mp4`` / ``video/mpeg``, with byte ranges
  (206 Partial Content) so that a ``<video>`` element can stream and seek; only the fragments a range spans are read.
- Encapsulated PDF: the document as ``application/pdf`` (the pad byte cut by Encapsulated Document Length), or its first
  page as ``image/png`` / ``image/jpeg`` (pypdfium2), for browsers without a PDF viewer.
- Other encapsulated documents (CDA, STL, OBJ, MTL): the document in its own MIME type.
- Structured reports: the content tree as ``text/html`` or ``text/plain`` (dicom/srdoc.py).

Each returns None when the instance is not of its kind or the client accepts nothing it offers, so that the ordinary
image rendering (and its 406) applies.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pydicom
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..dicom import srdoc
from ..dicom.video import VideoError, read_stream, video_index, video_media_type
from .common import accept_values, parse_accept

if TYPE_CHECKING:
    from ..services.types import InstanceRef
    from .wado import WadoRS

ENCAPSULATED_DOCUMENTS = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "model/stl",
    "1.2.840.10008.5.1.4.1.1.104.4": "model/obj",
    "1.2.840.10008.5.1.4.1.1.104.5": "model/mtl",
}
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
PDF_RENDER_DPI = 110


def _acceptable(request: Request, offered: list[str]) -> str | None:
    """The first offered type the Accept header (or ?accept=) allows, by q then server order; wildcards match."""
    best: tuple[float, int, str] | None = None
    for media, _params, q in parse_accept(accept_values(request)):
        if q <= 0:
            continue
        for i, offer in enumerate(offered):
            major = offer.split("/")[0]
            if media in (offer, "*/*", f"{major}/*", f"{major}/"):
                if best is None or (q, -i) > (best[0], -best[1]):
                    best = (q, i, offer)
    return None if best is None else best[2]


async def rendered(rs: WadoRS, ref: InstanceRef, request: Request) -> Response | None:
    media = video_media_type(ref.transfer_syntax_uid)
    if media is not None:
        if _acceptable(request, [media]) is None:
            return None
        return await run_in_threadpool(video_response, rs, ref, media, request.headers.get("range"))
    doc_type = ENCAPSULATED_DOCUMENTS.get(ref.sop_class_uid)
    if doc_type is not None:
        offered = [doc_type] + (["image/png", "image/jpeg"] if doc_type == "application/pdf" else [])
        choice = _acceptable(request, offered)
        if choice is None:
            return None
        return await run_in_threadpool(document_response, rs, ref, choice, request.headers.get("range"))
    if ref.sop_class_uid.startswith(_SR_PREFIX):
        choice = _acceptable(request, ["text/html", "text/plain"])
        if choice is None:
            return None
        return await run_in_threadpool(sr_response, rs, ref, choice)
    return None


def _error(status: int, message: str) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain")


# -- video ------------------------------------------------------------------------------------------------------------


def video_response(rs: WadoRS, ref: InstanceRef, media: str, range_header: str | None) -> Response:
    """The bitstream, whole (200) or one byte range (206); 416 for a range past its end. The body streams: the file is
    opened for the response and read a chunk at a time."""
    from .wado import _byte_range

    reader = rs._reader(ref)
    try:
        idx = video_index(reader, key=(ref.blob_key, ref.demographics_version))
    except VideoError as e:
        reader.close()
        return _error(406, f"cannot stream the video of {ref.sop_instance_uid}: {e}")
    except BaseException:
        reader.close()
        raise
    size = idx.size
    span = _byte_range(range_header, size) if range_header else None
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
    if span is not None and span[0] > span[1]:
        reader.close()
        return Response(b"", status_code=416, media_type=media, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span if span is not None else (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"

    def body() -> Iterator[bytes]:
        try:
            yield from read_stream(reader, idx, start, end)
        finally:
            reader.close()

    return StreamingResponse(body(), status_code=206 if span is not None else 200, media_type=media, headers=headers)


def wants_video(request: Request, ref: InstanceRef) -> str | None:
    """The video media type of a bulk data request for a video instance's Pixel Data, or None."""
    media = video_media_type(ref.transfer_syntax_uid)
    if media is None:
        return None
    accept = parse_accept(accept_values(request))
    if any(m == media or m in ("video/*", "video/") for m, _p, q in accept if q > 0):
        return media
    return None


# -- encapsulated documents ---------------------------------------------------------------------------------------


def document_bytes(ds: Any) -> bytes:
    """Encapsulated Document (0042,0011) without the pad byte: cut to Encapsulated Document Length when present."""
    value = ds.get("EncapsulatedDocument")
    if not isinstance(value, bytes | bytearray):
        raise LookupError("the instance has no Encapsulated Document")
    data = bytes(value)
    length = ds.get("EncapsulatedDocumentLength")
    try:
        n = int(length) if length is not None and str(length) != "" else None
    except (TypeError, ValueError):
        n = None
    if n is not None and 0 <= n <= len(data):
        data = data[:n]
    return data


def document_response(rs: WadoRS, ref: InstanceRef, media: str, range_header: str | None) -> Response:
    from .wado import HTTPError, _bulk_response, _error_response
    from .wado import parse_accept as wado_accept

    ds = pydicom.dcmread(rs._source(ref), force=True)
    try:
        data = document_bytes(ds)
    except LookupError as e:
        return _error(404, str(e))
    stored_type = str(ds.get("MIMETypeOfEncapsulatedDocument", "") or "").strip()
    if media.startswith("image/"):
        try:
            return Response(pdf_page_image(data, media), media_type=media)
        except ValueError as e:
            return _error(406, f"cannot render the document: {e}")
    doc_type = stored_type or media
    try:
        response = _bulk_response(data, wado_accept("application/octet-stream"), range_header)
    except HTTPError as e:
        return _error_response(e)
    response.headers["Content-Type"] = doc_type
    response.media_type = doc_type
    return response


def pdf_page_image(pdf: bytes, media: str, dpi: int = PDF_RENDER_DPI) -> bytes:
    """The first page of a PDF as PNG or JPEG (pypdfium2, PDFium's renderer)."""
    try:
        import pypdfium2 as pdfium
    except ImportError as e:
        raise ValueError("pypdfium2 is not installed") from e
    try:
        doc = pdfium.PdfDocument(pdf)
    except pdfium.PdfiumError as e:
        raise ValueError(f"not a readable PDF ({e})") from e
    try:
        if len(doc) == 0:
            raise ValueError("the PDF has no page")
        page = doc[0]
        try:
            image = page.render(scale=dpi / 72).to_pil().convert("RGB")
        finally:
            page.close()
    finally:
        doc.close()
    out = io.BytesIO()
    image.save(out, format="PNG" if media == "image/png" else "JPEG", quality=90)
    return out.getvalue()


# -- structured reports -----------------------------------------------------------------------------------------------


def sr_response(rs: WadoRS, ref: InstanceRef, media: str) -> Response:
    ds = pydicom.dcmread(rs._source(ref), force=True)
    try:
        if media == "text/plain":
            return Response(srdoc.to_text(ds), media_type="text/plain; charset=utf-8")
        nonce = secrets.token_urlsafe(16)
        headers = {  # a document of stored text: no script, its one inline style by nonce
            "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'self'",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(srdoc.to_html(ds, nonce), media_type="text/html; charset=utf-8", headers=headers)
    except srdoc.SRError as e:
        return _error(406, f"cannot render the report: {e}")
