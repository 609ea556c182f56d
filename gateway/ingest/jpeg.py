"""Marker-level JPEG handling: frame header, chroma subsampling, metadata segments.

Hand-written because it is hot (every upload) and must not decode: we only walk
the marker segments (a few hundred bytes) and find the end of the image with one
memchr-speed search, so a 12 MP photo is wrapped into DICOM in milliseconds and a
header claiming 65000 x 65000 pixels is refused before any pixel is decoded.
Works on any buffer (bytes, or a FileView over the spooled file) so a large file is never read into memory whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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

# Segments that may carry who/where/what-device (EXIF, XMP, IPTC, maker data, MPF
# secondary images, comments). APP0 (JFIF) and APP14 (Adobe colour transform) are
# kept: decoders need them to interpret the colours. APP2 ICC profiles move to the
# DICOM ICC Profile attribute.
_KEEP_APPS = {(0xE0, b"JFIF\x00"), (0xE0, b"JFXX\x00"), (0xEE, b"Adobe")}


class JpegError(ValueError):
    """The bytes are not a complete, well-formed JPEG."""


@dataclass
class Segment:
    marker: int
    start: int  # offset of the 0xFF of the marker
    end: int  # offset just past the segment
    payload_start: int
    ident: bytes = b""  # first bytes of the payload (APPn identifier)

    @property
    def id(self) -> tuple[int, bytes]:
        return (self.marker, self.ident[:5] if self.marker in (0xE0, 0xEE) else b"")


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
    jfif: bool = False
    exif_offset: int | None = None  # payload offset of the APP1 Exif segment
    icc_profile: bytes | None = None

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


def parse(buf, *, find_end: bool = True) -> JpegInfo:
    """Walk the marker segments up to the first scan; optionally locate EOI.

    `buf` is any object supporting len, indexing, slicing and .find (bytes, FileView).
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
    jfif = False
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
        elif marker == 0xE0 and payload[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xE1 and payload[:6] == b"Exif\x00\x00":
            exif_offset = seg.payload_start + 6
        elif marker == 0xE2 and payload[:12] == b"ICC_PROFILE\x00" and len(payload) > 14:
            icc_chunks[payload[12]] = bytes(payload[14:])
        elif marker == 0xEE and payload[:5] == b"Adobe" and len(payload) >= 12:
            adobe = payload[11]
        pos += length
    info.segments = segments
    info.adobe_transform = adobe
    info.jfif = jfif
    info.exif_offset = exif_offset
    if icc_chunks:
        info.icc_profile = b"".join(icc_chunks[k] for k in sorted(icc_chunks))
    if find_end:
        info.eoi_end = find_eoi(buf, info)
    return info


def find_eoi(buf, info: JpegInfo) -> int:
    """Offset just past the primary image's EOI.

    In entropy-coded data a 0xFF byte is always followed by 0x00 (stuffing) or a
    restart marker, so the first FF D9 after the first scan header is the end of the
    image. Bytes after it (phones append MPF previews and depth maps there) are not
    part of the image and are never copied into derived objects.
    """
    at = buf.find(EOI, info.scan_start)
    if at < 0:
        raise JpegError("truncated JPEG: no end-of-image marker")
    return at + 2


def clean_ranges(info: JpegInfo) -> list[tuple[int, int]]:
    """Byte ranges of the stream without metadata APP segments and comments.

    Ranges are (start, end) offsets into the original buffer; their concatenation is
    a valid JPEG holding the same compressed image, byte for byte.
    """
    ranges: list[tuple[int, int]] = []
    cursor = 0
    for seg in info.segments:
        drop = (0xE0 <= seg.marker <= 0xEF and seg.id not in _KEEP_APPS) or seg.marker == 0xFE
        if drop:
            if seg.start > cursor:
                ranges.append((cursor, seg.start))
            cursor = seg.end
    end = info.eoi_end
    if end <= cursor:
        raise JpegError("corrupt JPEG: no image data")
    ranges.append((cursor, end))
    return _merge(ranges)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def has_thumbnail_in_jfif(buf, info: JpegInfo) -> bool:
    for seg in info.segments:
        if seg.marker == 0xE0 and buf[seg.payload_start : seg.payload_start + 5] == b"JFIF\x00":
            p = seg.payload_start
            return seg.end - p >= 14 and (buf[p + 12] or buf[p + 13])
    return False


class FileView:
    """Read-only bytes-like view of a file for parse()/find_eoi()/slicing, without mapping it.

    An mmap would do, but every page it touches counts in the process's resident
    memory; a 200 MiB upload scanned through a mapping shows as 200 MiB of RSS.
    Here the header is cached and everything else is read with pread in chunks.
    """

    def __init__(self, path) -> None:
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

    def __getitem__(self, key):
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

    def close(self) -> None:
        self._f.close()


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
