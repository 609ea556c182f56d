"""HTTP media of DICOMweb (PS3.18 8.7): the Accept header read as media ranges, multipart/related written as a
stream and read from a spooled body. Protocol plumbing only: no DICOM decoding, no rule."""

from __future__ import annotations

import mmap
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# the media type each stored transfer syntax's frames are sent as when the client takes it as stored (PS3.18 Table 8.7.3-2)
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.1": OCTET_STREAM,
    "1.2.840.10008.1.2": OCTET_STREAM,
}

_TOKEN = re.compile(r'\s*([^=;,\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,]*))?\s*')


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header, e.g. multipart/related; type="application/dicom"; transfer-syntax=*."""

    media: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str | None:
        """The type of a multipart/related range's parts (its `type` parameter)."""
        return self.params.get("type")

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def covers(self, media: str) -> bool:
        """Whether this range admits `media` (wildcards `*/*` and `type/*`)."""
        if self.media == "*/*":
            return True
        kind, _, sub = self.media.partition("/")
        return sub == "*" and media.startswith(kind + "/") or self.media == media


def _split(header: str) -> list[str]:
    """The comma-separated ranges of a header, commas inside quoted parameters kept."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [s for s in (x.strip() for x in out) if s]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The header's media ranges, most preferred first (q=0 ranges dropped); none given: `*/*`."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = []
    for order, text in enumerate(_split(header)):
        media, _, rest = text.partition(";")
        params: dict[str, str] = {}
        for piece in rest.split(";"):
            m = _TOKEN.fullmatch(piece)
            if not piece.strip() or not m:
                continue
            value = (m.group(2) or "").strip()
            if value.startswith('"') and value.endswith('"'):
                value = value[1:-1]
            params[m.group(1).lower()] = value
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append((-q, order, MediaRange(media.strip().lower(), params, q)))
    return [r for _, _, r in sorted(ranges, key=lambda x: (x[0], x[1]))]


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header as its media type and parameters."""
    ranges = parse_accept(value)
    if not ranges:
        return "", {}
    return ranges[0].media, ranges[0].params


# -- writing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One body part: its content type and its bytes (a stream of chunks)."""

    content_type: str
    chunks: Iterable[bytes]


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'{MULTIPART}; type="{part_type}"{ts}; boundary={boundary}'


def multipart(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The multipart/related body (RFC 2387), streamed: each part's chunks pass through as they come."""
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: {part.content_type}\r\n\r\n".encode("ascii")
        yield from part.chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


# -- reading --------------------------------------------------------------------------------------------


class BadMultipart(ValueError):
    """The body is not the multipart/related its Content-Type says."""


@dataclass(frozen=True)
class BodyPart:
    """A received part: its headers (lower-case names) and where its content lies in the spooled body."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").strip()


class SpooledBody:
    """A request body on disk (never whole in memory), its parts found by their boundaries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        size = path.stat().st_size
        self.view: mmap.mmap | bytes = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def close(self) -> None:
        if isinstance(self.view, mmap.mmap):
            self.view.close()
        self._file.close()

    def parts(self, boundary: str) -> list[BodyPart]:
        view = self.view
        delimiter = b"--" + boundary.encode("latin-1")
        first = view.find(delimiter)
        if first < 0:
            raise BadMultipart(f"the body holds no part: boundary {boundary!r} not found")
        pos = first + len(delimiter)
        parts: list[BodyPart] = []
        while True:
            if view[pos:pos + 2] == b"--":
                return parts  # the close delimiter
            line_end = view.find(b"\r\n", pos)
            if line_end < 0:
                raise BadMultipart("the body ends inside a part's delimiter line")
            head_end = view.find(b"\r\n\r\n", line_end)
            if head_end < 0:
                raise BadMultipart("a part has no end of headers")
            headers = {}
            for line in bytes(view[line_end + 2:head_end]).decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            start = head_end + 4
            nxt = view.find(b"\r\n" + delimiter, start)
            if nxt < 0:
                raise BadMultipart("the body ends before its close delimiter (--boundary--)")
            parts.append(BodyPart(headers, start, nxt))
            pos = nxt + 2 + len(delimiter)

    def write_part(self, part: BodyPart, out: Path, chunk: int = 1 << 20) -> None:
        with open(out, "wb") as f:
            for at in range(part.start, part.end, chunk):
                f.write(self.view[at:min(at + chunk, part.end)])

    def read_part(self, part: BodyPart) -> bytes:
        return bytes(self.view[part.start:part.end])
