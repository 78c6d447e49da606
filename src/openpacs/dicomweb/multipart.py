"""multipart/related (RFC 2387 / RFC 2046) for DICOMweb: a streaming parser with hard limits and a streaming writer.

The parser never holds more than one part plus one network chunk: it is fed the request body chunk by chunk and
hands back each part as soon as its closing delimiter arrives, so STOW-RS can ingest part 1 while part 2 is still on
the wire. Everything hostile ends in :class:`MultipartError` carrying the HTTP status to answer with: a missing or
invalid boundary (400), a truncated body (400), a part or body over the limit (413), an unsupported or bomb-like
Content-Encoding (415 / 413).

The writer is an async generator of bytes for Starlette's ``StreamingResponse``; part bodies may be bytes or (async)
iterables of bytes, so a retrieve can stream blobs without loading a series into memory.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response, StreamingResponse

# Limits. Module constants so the lead can wire them to Settings; the STOW route reads them at request time.
MAX_PART_BYTES = 1 << 30  # one DICOM instance (a part is held in memory whole, as the chunks it arrived in)
MAX_BODY_BYTES = 2 << 30  # one request, after content decoding
MAX_HEADER_BYTES = 16 * 1024  # the header block of one part
MAX_PREAMBLE_BYTES = 64 * 1024  # preamble and epilogue (ignored, but bounded)
MAX_PARTS = 100_000
# Content-Encoding: a decompressed body larger than this many times its compressed size (once past the floor) is a
# bomb, not DICOM: real images compress 2-20x, padding-heavy ones rarely beyond 100x.
MAX_COMPRESSION_RATIO = 200
COMPRESSION_RATIO_FLOOR = 16 << 20
_INFLATE_STEP = 1 << 20


class MultipartError(Exception):
    """A request body that is not acceptable multipart/related; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` -> ``('multipart/related', {...})``.

    Parameter names are lower-cased; quoted values are unquoted (backslash escapes honoured); the media type is
    lower-cased. Robust against ``;`` inside quoted strings.
    """
    if not value:
        return "", {}
    params: dict[str, str] = {}
    i, n = 0, len(value)
    j = value.find(";")
    media = (value if j < 0 else value[:j]).strip().lower()
    i = n if j < 0 else j + 1
    while i < n:
        while i < n and value[i] in " \t;":
            i += 1
        eq = value.find("=", i)
        if eq < 0:
            break
        name = value[i:eq].strip().lower()
        i = eq + 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            buf = []
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(value[i])
                i += 1
            i += 1  # closing quote
            val = "".join(buf)
            k = value.find(";", i)
            i = n if k < 0 else k + 1
        else:
            k = value.find(";", i)
            val = (value[i:] if k < 0 else value[i:k]).strip()
            i = n if k < 0 else k + 1
        if name:
            params[name] = val
    return media, params


_BCHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


MAX_BOUNDARY = 200


def check_boundary(boundary: str | None) -> str:
    """The boundary parameter, checked against RFC 2046's character set. RFC 2046 caps it at 70 characters, but real
    clients send more (Orthanc's DICOMweb plugin: two UUIDs, 73), so up to MAX_BOUNDARY are accepted."""
    if not boundary:
        raise MultipartError(400, "multipart/related request without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY or boundary.endswith(" ") or not set(boundary) <= _BCHARS:
        raise MultipartError(400, f"invalid multipart boundary (1-{MAX_BOUNDARY} characters of RFC 2046's set)")
    return boundary


class Part:
    """One part: its headers and its content as the pieces of the request chunks it came in (no copy was made).

    ``chunks`` suits a consumer that writes or hashes piece by piece (STOW-RS ingest); ``content`` joins them once.
    """

    __slots__ = ("headers", "chunks", "size")

    def __init__(self, headers: dict[str, str], chunks: list[bytes | memoryview]) -> None:
        self.headers = headers  # lower-cased names
        self.chunks = chunks
        self.size = sum(len(c) for c in chunks)

    @property
    def content(self) -> bytes:
        if len(self.chunks) != 1 or not isinstance(self.chunks[0], bytes):
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]  # type: ignore[return-value]

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIM, _EPILOGUE = range(5)
_PIN_LIMIT = 64 * 1024  # parts smaller than this are copied out of the chunks they arrived in


class MultipartParser:
    """Incremental parser: ``feed()`` returns the parts completed by that chunk; ``close()`` checks the ending.

    Work is linear in the body size: each byte is searched once (plus the delimiter length of overlap). Part content
    is not copied: a part is the list of slices of the fed chunks that hold it (only the few bytes that might start a
    delimiter split across two chunks are held back and copied). Delimiter lines and part headers go through a small
    buffer, fed at most ``_WINDOW`` bytes at a time.
    """

    _WINDOW = 8192

    def __init__(
        self,
        boundary: str,
        *,
        max_part_bytes: int | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_parts: int = MAX_PARTS,
    ) -> None:
        b = check_boundary(boundary).encode("ascii")
        self._dash_boundary = b"--" + b
        self._delim = b"\r\n--" + b
        self._max_part = MAX_PART_BYTES if max_part_bytes is None else max_part_bytes
        self._max_header = max_header_bytes
        self._max_parts = max_parts
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed data in _buf
        self._scan = 0  # where the next delimiter search may start (absolute index in _buf)
        self._state = _PREAMBLE
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes | memoryview] = []  # content of the part being read
        self._size = 0
        self._carry = b""  # end of the previous chunk that may be the start of a delimiter
        self._count = 0
        self._epilogue = 0

    @property
    def parts_seen(self) -> int:
        return self._count

    @property
    def finished(self) -> bool:
        return self._state == _EPILOGUE

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._scan = max(0, self._scan - self._pos)
            self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Part]:
        if self._state == _EPILOGUE:
            self._epilogue += len(data)
            if self._epilogue > MAX_PREAMBLE_BYTES:
                raise MultipartError(400, "too much data after the closing multipart delimiter")
            return []
        if not isinstance(data, bytes):
            data = bytes(data)  # part content keeps slices of it: it must not change under them
        out: list[Part] = []
        i, n = 0, len(data)
        while True:
            if self._state == _BODY:
                if self._pos < len(self._buf):
                    # body bytes that came in the header window: scan them, keep what follows the part
                    with memoryview(self._buf) as view:
                        rest = bytes(view[self._pos :])
                    self._buf = bytearray()
                    self._pos = self._scan = 0
                    j = self._body(rest, 0, out)
                    if j < len(rest):
                        self._buf += memoryview(rest)[j:]
                    continue
                if i >= n:
                    break
                i = self._body(data, i, out)
                continue
            if self._state == _EPILOGUE:
                self._epilogue += n - i
                if self._epilogue > MAX_PREAMBLE_BYTES:
                    raise MultipartError(400, "too much data after the closing multipart delimiter")
                break
            if self._step(out) or self._state == _EPILOGUE:
                continue
            if i >= n:
                break
            # Compact before growing so the buffer stays small.
            if self._pos and (self._pos > len(self._buf) // 2 or self._pos > 1 << 20):
                self._compact()
            take = min(n - i, self._WINDOW)
            self._buf += memoryview(data)[i : i + take]
            i += take
        return out

    def _add(self, piece: bytes | memoryview) -> None:
        self._size += len(piece)
        if self._size > self._max_part:
            raise MultipartError(413, f"a part exceeds the maximum of {self._max_part} bytes")
        self._chunks.append(piece)

    def _end_part(self, out: list[Part]) -> None:
        chunks = self._chunks
        if self._size < _PIN_LIMIT:
            # a small part is copied: as slices it would keep whole network chunks alive for a few bytes
            chunks = [b"".join(chunks)]
        out.append(Part(self._headers, chunks))
        self._count += 1
        self._headers = {}
        self._chunks = []
        self._size = 0
        self._state = _AFTER_DELIM

    def _body(self, data: bytes, i: int, out: list[Part]) -> int:
        """Part content from ``data[i:]`` up to the next delimiter (the part then ends); returns where it stopped."""
        delim = self._delim
        hold = len(delim) - 1  # a shorter tail may be the start of a delimiter
        n = len(data)
        carry = self._carry
        if carry:
            window = carry + data[i : i + hold]
            k = window.find(delim)
            if k >= 0:  # it starts in the carried bytes
                self._carry = b""
                if k:
                    self._add(window[:k])
                self._end_part(out)
                return i + k + len(delim) - len(carry)
            if n - i < hold:  # still undecided: keep the tail
                keep = len(window) - hold
                if keep > 0:
                    self._add(window[:keep])
                self._carry = window[max(keep, 0) :]
                return n
            self._carry = b""
            self._add(carry)
        k = data.find(delim, i)
        if k >= 0:
            if k > i:
                self._add(memoryview(data)[i:k])
            self._end_part(out)
            return k + len(delim)
        end = max(i, n - hold)
        if end > i:
            self._add(memoryview(data)[i:end])
        self._carry = data[end:]
        return n

    def _step(self, out: list[Part]) -> bool:
        buf, pos = self._buf, self._pos
        if self._state == _PREAMBLE:
            # The first delimiter may open the body without a leading CRLF.
            if buf.startswith(self._dash_boundary, pos):
                self._pos = pos + len(self._dash_boundary)
                self._state = _AFTER_DELIM
                return True
            idx = buf.find(self._delim, max(pos, self._scan))
            if idx < 0:
                if len(buf) - pos > MAX_PREAMBLE_BYTES:
                    raise MultipartError(400, "no multipart delimiter found at the start of the body (wrong boundary?)")
                self._scan = max(pos, len(buf) - len(self._delim) + 1)
                return False
            self._pos = idx + len(self._delim)
            self._state = _AFTER_DELIM
            return True
        if self._state == _AFTER_DELIM:
            # "--" closes the body; else optional transport padding (LWSP) then CRLF opens a part.
            i = pos
            if len(buf) - i < 2:
                return False
            if buf[i : i + 2] == b"--":
                self._state = _EPILOGUE
                self._epilogue = len(buf) - i - 2
                if self._count == 0:
                    raise MultipartError(400, "multipart body has no parts")
                if self._epilogue > MAX_PREAMBLE_BYTES:
                    raise MultipartError(400, "too much data after the closing multipart delimiter")
                self._buf = bytearray()
                self._pos = self._scan = 0
                return False
            while i < len(buf) and buf[i] in b" \t":
                i += 1
                if i - pos > 1024:
                    raise MultipartError(400, "malformed multipart delimiter line")
            if len(buf) - i < 2:
                return False
            if buf[i : i + 2] != b"\r\n":
                raise MultipartError(400, "malformed multipart delimiter line (expected CRLF after the boundary)")
            self._pos = self._scan = i + 2
            self._state = _HEADERS
            if self._count >= self._max_parts:
                raise MultipartError(413, f"more than {self._max_parts} parts in one request")
            return True
        if self._state == _HEADERS:
            if buf.startswith(b"\r\n", pos):  # no headers at all
                end, hdr_end = pos, pos + 2
            else:
                end = buf.find(b"\r\n\r\n", max(pos, self._scan))
                if end < 0:
                    if len(buf) - pos > self._max_header:
                        raise MultipartError(400, f"part headers longer than {self._max_header} bytes")
                    self._scan = max(pos, len(buf) - 3)
                    return False
                hdr_end = end + 4
            if end - pos > self._max_header:
                raise MultipartError(400, f"part headers longer than {self._max_header} bytes")
            self._headers = _parse_headers(bytes(buf[pos:end]))
            self._pos = self._scan = hdr_end
            self._state = _BODY  # feed() reads the content
            return True
        return False

    def close(self) -> None:
        """The body ended: it must have ended with the closing delimiter."""
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError(400, "no multipart delimiter found in the body (wrong or missing boundary?)")
        raise MultipartError(400, "truncated multipart body: it ended before the closing delimiter")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    name = ""
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and name:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        if ":" not in line:
            raise MultipartError(400, f"malformed part header line: {line[:80]!r}")
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = value.strip()
    return headers


# ---------------------------------------------------------------------------------------------------------------------
# Request bodies: Content-Length and Content-Encoding under limits


def check_content_length(value: str | None, max_body: int | None = None) -> int | None:
    """Reject a declared body larger than the limit before reading a byte of it."""
    limit = MAX_BODY_BYTES if max_body is None else max_body
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError as exc:
        raise MultipartError(400, "invalid Content-Length header") from exc
    if n < 0:
        raise MultipartError(400, "invalid Content-Length header")
    if n > limit:
        raise MultipartError(413, f"request body of {n} bytes exceeds the maximum of {limit} bytes")
    return n


async def decoded_body(
    chunks: AsyncIterable[bytes], content_encoding: str | None, max_body: int | None = None
) -> AsyncIterator[bytes]:
    """The request body with Content-Encoding (identity, gzip, deflate) undone, never more than ``max_body`` bytes.

    Decompression is done in bounded steps, and a body that inflates beyond ``MAX_COMPRESSION_RATIO`` is refused as a
    bomb (413) long before it could fill memory.
    """
    limit = MAX_BODY_BYTES if max_body is None else max_body
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        total = 0
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise MultipartError(413, f"request body exceeds the maximum of {limit} bytes")
            if chunk:
                yield chunk
        return
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise MultipartError(415, f"unsupported Content-Encoding {content_encoding!r} (supported: gzip, deflate)")
    coding = codings[0]
    wbits = 16 + zlib.MAX_WBITS if coding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    first = True
    compressed = 0
    total = 0

    def account(n: int) -> None:
        nonlocal total
        total += n
        if total > limit:
            raise MultipartError(413, f"decoded request body exceeds the maximum of {limit} bytes")
        if total > COMPRESSION_RATIO_FLOOR and total > MAX_COMPRESSION_RATIO * max(compressed, 1):
            raise MultipartError(413, "compressed request body inflates beyond any plausible ratio (compression bomb)")

    async for chunk in chunks:
        if not chunk:
            continue
        compressed += len(chunk)
        data = chunk
        while data:
            if d.eof:  # concatenated gzip members / trailing garbage
                data = d.unused_data + data if d.unused_data else data
                if coding == "deflate":
                    raise MultipartError(400, "data after the end of the deflate stream")
                d = zlib.decompressobj(wbits)
            try:
                out = d.decompress(data, _INFLATE_STEP)
            except zlib.error as exc:
                if first and coding == "deflate":  # some clients send raw deflate without the zlib wrapper
                    d = zlib.decompressobj(-zlib.MAX_WBITS)
                    first = False
                    continue
                raise MultipartError(400, f"invalid {coding} request body: {exc}") from exc
            first = False
            if out:
                account(len(out))
                yield out
            data = d.unconsumed_tail
            if d.eof and d.unused_data:
                data = d.unused_data
                d = zlib.decompressobj(wbits)
                if coding == "deflate":
                    raise MultipartError(400, "data after the end of the deflate stream")
    try:
        out = d.flush()
    except zlib.error as exc:
        raise MultipartError(400, f"invalid {coding} request body: {exc}") from exc
    if out:
        account(len(out))
        yield out
    if not d.eof:
        raise MultipartError(400, f"truncated {coding} request body")


async def iter_parts(chunks: AsyncIterable[bytes], parser: MultipartParser) -> AsyncIterator[Part]:
    """Parts as they complete; raises MultipartError for framing problems (also at the end of the body)."""
    async for chunk in chunks:
        for part in parser.feed(chunk):
            yield part
    parser.close()


# ---------------------------------------------------------------------------------------------------------------------
# Writer


def new_boundary() -> str:
    return "openpacs-" + secrets.token_hex(16)


def related_content_type(boundary: str, type_: str = "application/dicom", transfer_syntax: str | None = None) -> str:
    """The Content-Type header of a multipart/related response."""
    value = f'multipart/related; type="{type_}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


Body = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]


@dataclass
class OutPart:
    """One part to write: its media type, the body (bytes or a stream of bytes) and any extra headers."""

    content_type: str
    body: Body
    headers: Mapping[str, str] = field(default_factory=dict)


_COALESCE = 64 * 1024


def part_head(boundary: bytes, content_type: str, length: int | None = None) -> bytes:
    """Delimiter and headers of one part (Content-Length when known)."""
    head = b"--" + boundary + b"\r\nContent-Type: " + content_type.encode("latin-1")
    if length is not None:
        head += b"\r\nContent-Length: " + str(length).encode()
    return head + b"\r\n\r\n"


class PiecesResponse(Response):
    """A body already in memory as several pieces, sent one after another with its exact Content-Length (no copy
    to join them, no chunked framing for the client to undo)."""

    def __init__(self, pieces: list[bytes], headers: Mapping[str, str]) -> None:
        self.pieces = _coalesced(pieces)
        super().__init__(b"", headers={**headers, "Content-Length": str(sum(len(p) for p in self.pieces))})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for i, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})
        if not self.pieces:
            await send({"type": "http.response.body", "body": b""})


def _coalesced(pieces: list[bytes]) -> list[bytes]:
    """Runs of small pieces joined up to ``_COALESCE`` bytes: every piece is one trip through the middleware and one
    socket write, which cost more than copying a few kilobytes (a viewer's tile is part head, ~3 kB, delimiter);
    a large frame is still sent as it is, never copied."""
    if len(pieces) < 2:
        return pieces
    out: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for p in pieces:
        if size + len(p) > _COALESCE and run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, size = [], 0
        if len(p) > _COALESCE:
            out.append(p)
            continue
        run.append(p)
        size += len(p)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def multipart_response(
    parts: Iterable[tuple[str, bytes]],
    type_: str,
    transfer_syntax: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> PiecesResponse:
    """A multipart/related response of parts already in memory: (content type, bytes) per part, sent piece by
    piece with its Content-Length, never joined into one copy (frames of a viewer, small XML sets)."""
    boundary = new_boundary()
    b = boundary.encode()
    pieces: list[bytes] = []
    sep = b""
    for ctype, data in parts:
        pieces.append(sep + part_head(b, ctype, len(data)))
        pieces.append(data)
        sep = b"\r\n"
    pieces.append(sep + b"--" + b + b"--\r\n")
    return PiecesResponse(pieces, {**(headers or {}),
                                   "Content-Type": related_content_type(boundary, type_, transfer_syntax)})


def streaming_multipart_response(
    parts: Iterable[OutPart] | AsyncIterable[OutPart], type_: str, transfer_syntax: str | None = None
) -> StreamingResponse:
    """A multipart/related response streamed part by part (``write_multipart``)."""
    boundary = new_boundary()
    return StreamingResponse(
        write_multipart(parts, boundary), media_type=related_content_type(boundary, type_, transfer_syntax)
    )


def _part_head(boundary: bytes, part: OutPart) -> bytes:
    lines = [b"--" + boundary, b"Content-Type: " + part.content_type.encode("latin-1")]
    for k, v in part.headers.items():
        lines.append(k.encode("latin-1") + b": " + v.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _aiter(it: Iterable[object] | AsyncIterable[object]) -> AsyncIterator[object]:
    if isinstance(it, AsyncIterable):
        async for x in it:
            yield x
    elif isinstance(it, list | tuple):
        for x in it:
            yield x
    else:  # a lazy sync iterable may block (file reads, index queries): keep it off the event loop
        async for x in iterate_in_threadpool(iter(it)):
            yield x


async def write_multipart(parts: Iterable[OutPart] | AsyncIterable[OutPart], boundary: str) -> AsyncIterator[bytes]:
    """Stream a multipart/related body. Small parts are coalesced into ~64 KB writes; large bodies pass through."""
    b = boundary.encode("ascii")
    pending = bytearray()
    async for obj in _aiter(parts):
        part = obj if isinstance(obj, OutPart) else OutPart(*obj)  # type: ignore[misc]
        pending += _part_head(b, part)
        body = part.body
        if isinstance(body, bytes | bytearray | memoryview):
            if len(body) + len(pending) <= _COALESCE:
                pending += body
            else:
                if pending:
                    yield bytes(pending)
                    pending.clear()
                yield bytes(body) if not isinstance(body, bytes) else body
        else:
            async for chunk in _aiter(body):
                data = chunk if isinstance(chunk, bytes) else bytes(chunk)  # type: ignore[call-overload]
                if len(pending) + len(data) <= _COALESCE:
                    pending += data
                    continue
                if pending:
                    yield bytes(pending)
                    pending.clear()
                yield data
        pending += b"\r\n"
        if len(pending) >= _COALESCE:
            yield bytes(pending)
            pending.clear()
    pending += b"--" + b + b"--\r\n"
    yield bytes(pending)
