"""A received object's JPEG frame as served: without the metadata a camera or phone put in it.

A photo converted to DICOM as it came off a phone (dcmtk's img2dcm keeps the JPEG whole) carries its EXIF (GPS,
the camera's serial number), XMP, IPTC and comments inside the Pixel Data, and a phone's preview images after the
end-of-image marker. Ingest leaves all of these out of an upload's served photo (jpeg.clean_pieces); a received
object is stored byte for byte (the original, for the roles allowed originals), so here they are left out of the
object every other role is sent, by the same rule: the frame becomes the pieces clean_pieces keeps, which decode to
the same pixels.

Most frames carry none of it: the check reads the first fragment's head (jpeg.parse) and the last fragment's last
bytes, and the object goes out as stored. Metadata hidden between the scan and its end-of-image marker, where
cameras put none, is not looked for.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from gateway.core.objects import jpeg, part10
from gateway.core.objects.jpeg import Piece

# the JPEG (ISO 10918) transfer syntaxes ingest takes photos in; JPEG-LS and RLE come from our own encoders
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
HEAD_READ = 256 * 1024  # a frame's header segments read to decide: EXIF is at most 64 KiB; more is read if needed
ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian
EOI = b"\xff\xd9"
JFIF_WITHOUT_THUMBNAIL = 18  # bytes of an APP0 JFIF segment with a 0 x 0 thumbnail, marker and length included


def served_tail(path: Path, head: part10.Head) -> tuple[Piece, ...]:
    """The stored file from its Pixel Data tag on, as served: one range of the file when there is nothing to leave
    out (raises part10.Part10Error, and jpeg.JpegError for a frame that cannot be read)."""
    assert head.pixel_offset is not None
    whole: tuple[Piece, ...] = ((head.pixel_offset, head.size),)
    if head.transfer_syntax not in JPEG_SYNTAXES:
        return whole
    with open(path, "rb") as f:
        element = part10.pixel_element(f, head)
        if not element.encapsulated or not element.fragments:
            return whole
        (first, first_end), (last, last_end) = element.fragments[0], element.fragments[-1]
        start = part10.read_range(f, first, min(first_end, first + HEAD_READ))
        end = part10.read_range(f, max(last, last_end - 3), last_end)
        if not _carries_metadata(start, end):
            return whole
        frame = b"".join(part10.read_range(f, a, b) for a, b in element.fragments)
    pieces = jpeg.clean_pieces(frame, jpeg.parse(frame, find_end=False))
    kept = [_file_ranges(p, element.fragments) if isinstance(p, tuple) else [p] for p in pieces]
    length = sum(_length(p) for ranges in kept for p in ranges)
    pad = [b"\x00"] if length % 2 else []  # an item's value has an even length
    # the tag, VR, length and Basic Offset Table as stored (one frame: its offset stays 0); the frame as one fragment;
    # the sequence delimiter and whatever follows the element as stored
    return ((head.pixel_offset, element.fragments[0][0] - 8), ITEM + (length + len(pad)).to_bytes(4, "little"),
            *[p for ranges in kept for p in ranges], *pad, (element.value_end, head.size))


def served_frame(path: Path, head: part10.Head) -> bytes:
    """The single frame's bytes as served: the codestream of an encapsulated object (its fragments joined, its JPEG
    metadata left out), the native pixel bytes of an uncompressed one."""
    with open(path, "rb") as f:
        element = part10.pixel_element(f, head)
        if not element.encapsulated:
            return part10.read_range(f, element.value_offset, element.value_offset + (element.length or 0))
        frame = b"".join(part10.read_range(f, a, b) for a, b in element.fragments)
    if head.transfer_syntax not in JPEG_SYNTAXES or not _carries_metadata(frame[:HEAD_READ], frame[-3:]):
        return frame
    pieces = jpeg.clean_pieces(frame, jpeg.parse(frame, find_end=False))
    cleaned = b"".join(frame[p[0]:p[1]] if isinstance(p, tuple) else p for p in pieces)
    return cleaned + b"\x00" * (len(cleaned) % 2)  # as in the served object's fragment, padded to even


def _carries_metadata(start: bytes, end: bytes) -> bool:
    """Whether a frame beginning `start` and ending `end` has anything clean_pieces leaves out."""
    try:
        info = jpeg.parse(start, find_end=False)
    except jpeg.JpegError:
        return True  # a header longer than HEAD_READ (many APP segments), or one to be read whole and judged there
    for seg in info.segments:
        if seg.marker == 0xE0 and seg.ident.startswith(b"JFIF\x00") and seg.end - seg.start == JFIF_WITHOUT_THUMBNAIL:
            continue
        if seg.marker == 0xEE and seg.ident.startswith(b"Adobe"):
            continue  # its flags and colour transform only, rebuilt the same
        if 0xE0 <= seg.marker <= 0xEF or seg.marker == 0xFE:
            return True
    return not (end.endswith(EOI) or end.endswith(EOI + b"\x00"))  # bytes after end-of-image: a phone's previews


def _file_ranges(piece: tuple[int, int], fragments: tuple[tuple[int, int], ...]) -> list[Piece]:
    """A range of the frame (its fragments joined) as ranges of the file."""
    start, end = piece
    ranges: list[Piece] = []
    at = 0  # where this fragment begins in the frame
    for a, b in fragments:
        lo, hi = max(start, at), min(end, at + b - a)
        if lo < hi:
            ranges.append((a + lo - at, a + hi - at))
        at += b - a
    return ranges


def _length(piece: Piece) -> int:
    return piece[1] - piece[0] if isinstance(piece, tuple) else len(piece)
