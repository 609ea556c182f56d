"""What a file is, from its first bytes only (never its name or declared type)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.ingest.errors import UNSUPPORTED_TYPE, IngestRejected

HEAD_BYTES = 512

# ISO BMFF major/compatible brands of HEIF still images (ISO/IEC 23008-12)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"heif"}
_AVIF_BRANDS = {b"avif", b"avis"}


@dataclass(frozen=True)
class Sniffed:
    kind: str  # jpeg, png, heif, tiff
    media_type: str


ACCEPTED = {
    "jpeg": Sniffed("jpeg", "image/jpeg"),
    "png": Sniffed("png", "image/png"),
    "heif": Sniffed("heif", "image/heic"),
    "tiff": Sniffed("tiff", "image/tiff"),
}


def _ftyp_brands(head: bytes) -> set[bytes]:
    if len(head) < 16 or head[4:8] != b"ftyp":
        return set()
    size = int.from_bytes(head[0:4], "big")
    end = min(max(size, 16), len(head))
    brands = {head[8:12]}
    brands.update(head[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _what_else(head: bytes) -> str | None:
    """Name a refused format precisely, so the caller's message says what was found."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "a ZIP archive"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script")):
        return "an HTML document"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing (scriptable vector graphics)"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "an XML/markup document"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if head.startswith(b"BM"):
        return "a BMP image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if _ftyp_brands(head) & _AVIF_BRANDS:
        return "an AVIF image"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "a JPEG 2000 image"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file (send DICOM objects by C-STORE or STOW-RS)"
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "a compressed archive"
    if head.startswith(b"\x7fELF") or head.startswith(b"MZ"):
        return "an executable"
    if head[4:8] == b"ftyp":
        return "a video or other ISO media file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        return "a text file"
    return None


def sniff(head: bytes) -> Sniffed:
    """Identify an accepted image type from the first HEAD_BYTES bytes, or refuse (415)."""
    if head[:3] == b"\xff\xd8\xff":
        return ACCEPTED["jpeg"]
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return ACCEPTED["png"]
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ACCEPTED["tiff"]
    if _ftyp_brands(head) & _HEIF_BRANDS:
        return ACCEPTED["heif"]
    found = _what_else(head)
    accepted = "JPEG, PNG, HEIC/HEIF or 8-bit RGB TIFF"
    if not head:
        raise IngestRejected(UNSUPPORTED_TYPE, "empty file: expected a JPEG, PNG, HEIC/HEIF or TIFF image")
    if found:
        raise IngestRejected(UNSUPPORTED_TYPE, f"unsupported file type: the content is {found}, not a {accepted}")
    raise IngestRejected(UNSUPPORTED_TYPE, f"unsupported file type: the content is not a recognised image ({accepted} accepted)")
