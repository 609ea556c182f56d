"""Marker-level JPEG handling: frame header, chroma subsampling, metadata segments.

Hand-written because it is hot (every upload) and must not decode: we walk the
marker segments and skip each scan's entropy-coded data with a regex search, so a
12 MP photo is wrapped into DICOM in milliseconds and a header claiming 65000 x
65000 pixels is refused before any pixel is decoded. Works on any buffer (bytes,
or a FileView over the spooled file) so a large file is never read into memory whole.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias, overload

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"

# SOF markers: 0xC0..0xCF except DHT (C4), JPG (C8), DAC (CC)
_SOF_NAMES = {
    0xC0: "baseline",
    0xC1: "extended-sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential-sequential",
    0xC6: "differential-progressive",
    0xC7: "differential-lossless",
    0xC9: "extended-sequential-arithmetic",
    0xCA: "progressive-arithmetic",
    0xCB: "lossless-arithmetic",
    0xCD: "differential-sequential-arithmetic",
    0xCE: "differential-progressive-arithmetic",
    0xCF: "differential-lossless-arithmetic",
}

# What a decoder needs, kept byte for byte wherever it sits: frame headers, tables
# (DHT, DQT, DAC), restart interval (DRI), and between scans DNL. Every APPn and COM
# segment is dropped wherever it sits (EXIF, XMP, IPTC, maker data, MPF images,
# JFXX thumbnails, comments); JFIF APP0 and Adobe APP14 are rebuilt from the few
# fields decoders read (see clean_pieces). APP2 ICC profiles move to the DICOM ICC
# Profile attribute.
_TABLES = {0xC4, 0xCC, 0xDB, 0xDD}
_KEEP_IN_HEADER = set(_SOF_NAMES) | _TABLES
_KEEP_BETWEEN_SCANS = _TABLES | {0xDC}
_RST = range(0xD0, 0xD8)

# Inside entropy-coded data a 0xFF byte is followed by 0x00 (stuffing) or a restart
# marker; anything else ends the scan. A regex, not a Python loop over the 0xFF
# bytes: 1.5 ms over a 12 MP photo's 5 MB scan, and 86 ms over 20 MiB of FF 00
# pairs where a bytes.find loop takes 1.3 s (an attacker chooses the bytes).
_SCAN_STOP = re.compile(rb"\xff[^\x00\xd0-\xd7]")
CHUNK = 4 * 1024 * 1024

Piece = tuple[int, int] | bytes  # a byte range (start, end) of the source, or literal bytes


class JpegError(ValueError):
    """The bytes are not a complete, well-formed JPEG."""


@dataclass
class Segment:
    marker: int
    start: int  # offset of the 0xFF of the marker
    end: int  # offset just past the segment
    payload_start: int
    ident: bytes = b""  # first bytes of the payload (APPn identifier)


@dataclass
class JpegInfo:
    sof: int
    process: str
    precision: int
    width: int
    height: int
    components: list[tuple[int, int, int]]  # (id, h sampling, v sampling)
    segments: list[Segment] = field(default_factory=list)
    scan_start: int = 0  # offset of the first SOS marker
    eoi_end: int = 0  # offset just past EOI of the primary image (0 when not yet located)
    adobe_transform: int | None = None
    jfif_fields: bytes | None = None  # version, units, X and Y density of the first complete JFIF APP0
    exif_offset: int | None = None  # payload offset of the APP1 Exif segment
    icc_profile: bytes | None = None

    @property
    def jfif(self) -> bool:
        return self.jfif_fields is not None

    @property
    def progressive(self) -> bool:
        return self.sof in (0xC2, 0xC6, 0xCA, 0xCE)

    @property
    def baseline(self) -> bool:
        return self.sof == 0xC0 and self.precision == 8

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def colour_model(self) -> str:
        """'GRAY', 'YCbCr', 'RGB', 'CMYK' or 'YCCK', as a decoder would interpret the samples."""
        n = len(self.components)
        ids = bytes(c[0] for c in self.components)
        if n == 1:
            return "GRAY"
        if n == 3:
            if self.adobe_transform is not None:
                return "YCbCr" if self.adobe_transform == 1 else "RGB"
            if self.jfif:
                return "YCbCr"
            # libjpeg's rule for files with neither marker: component ids R, G, B mean RGB
            return "RGB" if ids == b"RGB" else "YCbCr"
        if n == 4:
            return "YCCK" if self.adobe_transform == 2 else "CMYK"
        return f"{n}-component"

    @property
    def subsampled(self) -> bool:
        return len({(h, v) for _, h, v in self.components}) > 1

    @property
    def photometric(self) -> str:
        """DICOM Photometric Interpretation of the encapsulated stream (PS3.5 8.2.1, CP-1654)."""
        model = self.colour_model
        if model == "GRAY":
            return "MONOCHROME2"
        if model == "RGB":
            return "RGB"
        if model == "YCbCr":
            return "YBR_FULL_422" if self.subsampled else "YBR_FULL"
        raise JpegError(f"{model} JPEG has no DICOM photometric interpretation")

    @property
    def subsampling_label(self) -> str:
        if len(self.components) != 3:
            return "n/a"
        (_, h0, v0), (_, h1, v1), (_, h2, v2) = self.components
        if (h1, v1) != (h2, v2):
            return "other"
        ratio = (h0 // max(h1, 1), v0 // max(v1, 1))
        return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0", (1, 2): "4:4:0", (4, 1): "4:1:1"}.get(ratio, "other")


def is_jpeg(head: bytes) -> bool:
    return head[:3] == b"\xff\xd8\xff"


def parse(buf: ByteSource, *, find_end: bool = True) -> JpegInfo:
    """Walk the marker segments up to the first scan; optionally locate EOI.

    `buf` is the file's bytes, or a FileView over it.
    """
    size = len(buf)
    if buf[0:2] != SOI:
        raise JpegError("not a JPEG (no start-of-image marker)")
    if size < 4:
        raise JpegError("truncated JPEG: ends inside the header")
    pos = 2
    segments: list[Segment] = []
    info: JpegInfo | None = None
    adobe = None
    jfif_fields = None
    exif_offset = None
    icc_chunks: dict[int, bytes] = {}
    while True:
        # skip fill bytes (any number of 0xFF before a marker code)
        if pos >= size:
            raise JpegError("truncated JPEG: ends inside the header")
        if buf[pos] != 0xFF:
            raise JpegError(f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < size and buf[pos] == 0xFF:
            pos += 1
        if pos >= size:
            raise JpegError("truncated JPEG: ends inside the header")
        marker = buf[pos]
        start = pos - 1
        pos += 1
        if marker == 0xD9:
            raise JpegError("corrupt JPEG: end-of-image before any scan")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # parameterless markers
        if pos + 2 > size:
            raise JpegError("truncated JPEG: ends inside a marker segment")
        length = (buf[pos] << 8) | buf[pos + 1]
        if length < 2 or pos + length > size:
            raise JpegError("truncated JPEG: a marker segment runs past the end of the file")
        payload = buf[pos + 2 : pos + length]
        seg = Segment(marker, start, pos + length, pos + 2, bytes(payload[:8]))
        if marker == 0xDA:  # SOS: header done, entropy-coded data follows
            if info is None:
                raise JpegError("corrupt JPEG: scan before the frame header")
            info.scan_start = start
            break
        segments.append(seg)
        if marker in _SOF_NAMES:
            if info is not None:
                raise JpegError("corrupt JPEG: more than one frame header")
            if len(payload) < 6:
                raise JpegError("corrupt JPEG: short frame header")
            precision = payload[0]
            height = (payload[1] << 8) | payload[2]
            width = (payload[3] << 8) | payload[4]
            ncomp = payload[5]
            if len(payload) < 6 + 3 * ncomp or ncomp == 0:
                raise JpegError("corrupt JPEG: frame header lists fewer components than it claims")
            comps = []
            for i in range(ncomp):
                cid, hv = payload[6 + 3 * i], payload[7 + 3 * i]
                comps.append((cid, hv >> 4, hv & 0x0F))
            if width == 0 or height == 0:
                # height 0 means "defined by a later DNL marker": legal but unheard of in photos
                raise JpegError("unsupported JPEG: image size not given in the frame header")
            info = JpegInfo(marker, _SOF_NAMES[marker], precision, width, height, comps)
        elif marker == 0xE0 and payload[:5] == b"JFIF\x00" and len(payload) >= 14 and jfif_fields is None:
            # libjpeg reads a JFIF APP0 only when it holds all 14 fixed bytes
            jfif_fields = bytes(payload[5:12])
        elif marker == 0xE1 and payload[:6] == b"Exif\x00\x00":
            exif_offset = seg.payload_start + 6
        elif marker == 0xE2 and payload[:12] == b"ICC_PROFILE\x00" and len(payload) > 14:
            icc_chunks[payload[12]] = bytes(payload[14:])
        elif marker == 0xEE and payload[:5] == b"Adobe" and len(payload) >= 12:
            adobe = payload[11]
        pos += length
    info.segments = segments
    info.adobe_transform = adobe
    info.jfif_fields = jfif_fields
    info.exif_offset = exif_offset
    if icc_chunks:
        info.icc_profile = b"".join(icc_chunks[k] for k in sorted(icc_chunks))
    if find_end:
        clean_pieces(buf, info)  # sets info.eoi_end
    return info


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _is_metadata(marker: int) -> bool:
    return 0xE0 <= marker <= 0xEF or marker == 0xFE  # APPn, COM


def unexpected_in_header(info: JpegInfo) -> Segment | None:
    """The first segment before the scan that is neither the decoder's nor metadata (a JPGn, FFF0-FFFD, say): a
    stream holding one does not decode here (libjpeg-turbo: "broken data stream") and is not passed on cleaned."""
    return next((seg for seg in info.segments if seg.marker not in _KEEP_IN_HEADER and not _is_metadata(seg.marker)), None)


def clean_pieces(buf: ByteSource, info: JpegInfo, *, chunk: int = CHUNK) -> list[Piece]:
    """The stream without metadata: SOI, rebuilt JFIF/Adobe segments, then the decoder's segments and scans.

    Walks the whole stream, not just the header: after each SOS the entropy-coded
    data is skipped to the marker that ends it, and APPn/COM segments between or
    after scans are dropped like those before the first. Fill bytes and bytes
    outside any segment or scan are not copied, nor anything after EOI (phones
    append MPF previews and depth maps there). Sets info.eoi_end. The pieces'
    concatenation decodes to the same pixels as the source.
    """
    pieces: list[Piece] = [(0, 2)]
    if info.jfif_fields is not None:
        # identifier, version, density units and densities; thumbnail 0 x 0 and no thumbnail data
        pieces.append(_segment(0xE0, b"JFIF\x00" + info.jfif_fields + b"\x00\x00"))
    if info.adobe_transform is not None:
        # version 100, no flags: decoders read only the colour transform
        pieces.append(_segment(0xEE, b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes((info.adobe_transform,))))
    if (odd := unexpected_in_header(info)) is not None:
        raise JpegError(f"corrupt JPEG: unexpected marker 0x{odd.marker:02X} at byte {odd.start}")
    pieces.extend((seg.start, seg.end) for seg in info.segments if seg.marker in _KEEP_IN_HEADER)
    size = len(buf)
    pos = info.scan_start
    while True:
        if bytes(buf[pos : pos + 1]) != b"\xff":
            pos = _scan_end(buf, pos, chunk)  # bytes outside any segment: not copied
        code_at = _skip_fill(buf, pos + 1)
        if code_at >= size:
            raise JpegError("truncated JPEG: no end-of-image marker")
        marker, start = bytes(buf[code_at : code_at + 1])[0], code_at - 1  # a slice: FileView reads, never caches
        if marker == 0xD9:
            pieces.append((start, start + 2))
            info.eoi_end = start + 2
            return _merge(pieces)
        if marker in _RST or marker in (0x00, 0x01):
            pos = code_at + 1  # a stray parameterless marker outside a scan: dropped
            continue
        length_bytes = bytes(buf[code_at + 1 : code_at + 3])
        length = int.from_bytes(length_bytes, "big")
        end = code_at + 1 + length
        if len(length_bytes) < 2 or length < 2 or end > size:
            raise JpegError("truncated JPEG: a marker segment runs past the end of the file")
        if marker == 0xDA:
            stop = _scan_end(buf, end, chunk)
            pieces.append((start, stop))
            pos = stop
        elif marker in _KEEP_BETWEEN_SCANS:
            pieces.append((start, end))
            pos = end
        elif _is_metadata(marker):
            pos = end
        else:
            raise JpegError(f"corrupt JPEG: unexpected marker 0x{marker:02X} at byte {start}")


def _find(buf: ByteSource, pattern: re.Pattern[bytes], start: int, chunk: int) -> int:
    if isinstance(buf, FileView):  # chunked reads
        return buf.search(pattern, start, chunk=chunk)
    found = pattern.search(buf, start)
    return found.start() if found else -1


def _skip_fill(buf: ByteSource, pos: int) -> int:
    """Offset of the first byte at or after pos that is not 0xFF."""
    while True:
        window = bytes(buf[pos : pos + 256])
        rest = window.lstrip(b"\xff")
        if rest or len(window) < 256:
            return pos + len(window) - len(rest)
        pos += 256


def _scan_end(buf: ByteSource, pos: int, chunk: int) -> int:
    """Offset of the marker (its first fill byte) that ends entropy-coded data starting at pos."""
    while True:
        at = _find(buf, _SCAN_STOP, pos, chunk)
        if at < 0:
            raise JpegError("truncated JPEG: no end-of-image marker")
        if bytes(buf[at + 1 : at + 2]) != b"\xff":
            return at
        # a run of 0xFF: libjpeg reads FF..FF 00 as a stuffed 0xFF and FF..FF Dn as a restart marker
        code_at = _skip_fill(buf, at + 1)
        code = bytes(buf[code_at : code_at + 1])
        if not code:
            raise JpegError("truncated JPEG: no end-of-image marker")
        if code[0] != 0x00 and code[0] not in _RST:
            return at
        pos = code_at + 1


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if isinstance(piece, tuple) and isinstance(last, tuple) and last[1] == piece[0]:
            merged[-1] = (last[0], piece[1])
        else:
            merged.append(piece)
    return merged


class FileView:
    """Read-only bytes-like view of a file for parse()/clean_pieces()/slicing, without mapping it.

    An mmap would do, but every page it touches counts in the process's resident
    memory; a 200 MiB upload scanned through a mapping shows as 200 MiB of RSS.
    Here the header is cached and everything else is read with pread in chunks.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._f = open(path, "rb")
        self._fd = self._f.fileno()
        self._size = os.fstat(self._fd).st_size
        self._head = b""
        self._grow(256 * 1024)

    def _grow(self, upto: int) -> None:
        upto = min(max(upto, 2 * len(self._head)), self._size)
        if upto > len(self._head):
            self._head = os.pread(self._fd, upto, 0)

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._size)
            if step != 1:
                raise ValueError("FileView slices have step 1")
            if stop <= len(self._head):
                return self._head[start:stop]
            if stop <= start:
                return b""
            return os.pread(self._fd, stop - start, start)
        if key < 0:
            key += self._size
        if not 0 <= key < self._size:
            raise IndexError(key)
        if key >= len(self._head) and key < 16 * 1024 * 1024:
            self._grow(key + 1)  # headers with big APP segments: cache grows, still bounded
        if key < len(self._head):
            return self._head[key]
        return os.pread(self._fd, 1, key)[0]

    def find(self, sub: bytes, start: int = 0, chunk: int = 4 * 1024 * 1024) -> int:
        overlap = len(sub) - 1
        pos = start
        while pos < self._size:
            block = os.pread(self._fd, chunk + overlap, pos)
            at = block.find(sub)
            if at >= 0:
                return pos + at
            pos += chunk
        return -1

    def search(self, pattern: re.Pattern[bytes], start: int = 0, chunk: int = CHUNK, span: int = 2) -> int:
        """Offset of the first match of `pattern` (matches exactly `span` bytes) at or after start, or -1."""
        pos = start
        while pos < self._size:
            found = pattern.search(os.pread(self._fd, chunk + span - 1, pos))
            if found:
                return pos + found.start()
            pos += chunk
        return -1

    def close(self) -> None:
        self._f.close()


ByteSource: TypeAlias = bytes | FileView  # what parse() and clean_pieces() walk


# --- lossless re-coding with jpegtran (libjpeg-turbo-progs) ---------------------

# EXIF orientation -> jpegtran transform that makes the image upright
ORIENTATION_TRANSFORMS = {
    2: ["-flip", "horizontal"],
    3: ["-rotate", "180"],
    4: ["-flip", "vertical"],
    5: ["-transpose"],
    6: ["-rotate", "90"],
    7: ["-transverse"],
    8: ["-rotate", "270"],
}


class LosslessNotPossible(Exception):
    """jpegtran cannot do this transform without touching pixels (partial edge MCUs)."""


def jpegtran_available() -> bool:
    return shutil.which("jpegtran") is not None


def recode(src: Path, dst: Path, orientation: int = 1) -> None:
    """Write a baseline, metadata-free JPEG holding the same DCT coefficients, upright.

    Progressive -> sequential is pure entropy re-coding (no loss). Rotation and
    flips are lossless with -perfect; when the image size is not a multiple of the
    MCU size jpegtran refuses and we raise LosslessNotPossible.
    """
    args = ["jpegtran", "-copy", "none", "-optimize"]
    if orientation in ORIENTATION_TRANSFORMS:
        args += ["-perfect", *ORIENTATION_TRANSFORMS[orientation]]
    args += ["-outfile", os.fspath(dst), os.fspath(src)]
    try:
        proc = subprocess.run(args, capture_output=True, timeout=300)
    except FileNotFoundError:
        raise LosslessNotPossible("jpegtran (libjpeg-turbo-progs) is not installed") from None
    if proc.returncode != 0 or not dst.exists() or dst.stat().st_size == 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        if "not perfect" in message:
            raise LosslessNotPossible(message)
        raise JpegError(f"corrupt JPEG: {message or 'jpegtran failed'}")
    warnings = proc.stderr.decode("utf-8", "replace").strip()
    if warnings:
        # e.g. "Premature end of JPEG file": the source is damaged
        raise JpegError(f"corrupt JPEG: {warnings.splitlines()[0]}")


def recode_to_temp(src: Path, orientation: int, tmp_dir: Path | None = None) -> Path:
    fd, name = tempfile.mkstemp(suffix=".jpg", dir=tmp_dir)
    os.close(fd)
    dst = Path(name)
    try:
        recode(src, dst, orientation)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst
