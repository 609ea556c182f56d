"""A received object's JPEG frame as served: without the metadata a camera or phone put in it.

A photo converted to DICOM as it came off a phone (dcmtk's img2dcm keeps the JPEG whole when told to keep APPn
segments) carries its EXIF (GPS, the camera's serial number), XMP, IPTC and comments inside the Pixel Data. Ingest
leaves all of these out of an upload's served photo (jpeg.clean_pieces); a received object is stored byte for byte
(the original, for the roles allowed originals), so here they are left out of the object every other role is sent,
by the same rule: the frame becomes the pieces clean_pieces keeps, which decode to the same pixels.

The whole frame is walked, once per object (the served header, and this with it, is cached: coerce.HEADERS): 1.4-2.0
ms for the bench's 2.8 MB photo, and reading it. A first version judged from the frame's head and last bytes alone, and
a re-attack got metadata through four ways that passes by: a second JPEG appended after end-of-image (it ends in FFD9
too), an Adobe segment padded with text, a comment between the scan and end-of-image, a JPGn (FFF0) segment. A frame
clean_pieces would keep byte for byte is sent as stored; one it cannot read (an unknown marker) is not sent at all.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from gateway.core.objects import jpeg, part10
from gateway.core.objects.jpeg import Piece

# the JPEG (ISO 10918) transfer syntaxes ingest takes photos in; JPEG-LS and RLE come from our own encoders
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian


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
        frame = b"".join(part10.read_range(f, a, b) for a, b in element.fragments)
    pieces = _cleaned(frame)
    if pieces is None:
        return whole
    kept = [_file_ranges(p, element.fragments) if isinstance(p, tuple) else [p] for p in pieces]
    length = sum(_length(p) for ranges in kept for p in ranges)
    pad = [b"\x00"] if length % 2 else []  # an item's value has an even length
    # the tag, VR, length and Basic Offset Table as stored (one frame: its offset stays 0); the frame as one fragment;
    # the sequence delimiter and whatever follows the element as stored
    return ((head.pixel_offset, element.fragments[0][0] - 8), ITEM + (length + len(pad)).to_bytes(4, "little"),
            *[p for ranges in kept for p in ranges], *pad, (element.value_end, head.size))


def served_frame(path: Path, head: part10.Head, *, as_stored: bool = False) -> bytes:
    """The single frame's bytes as served: the codestream of an encapsulated object (its fragments joined, its JPEG
    metadata left out), the native pixel bytes of an uncompressed one. `as_stored`: served_tail found nothing to leave
    out (coerce.Served.as_stored), so the frame is not walked again (1.4-2.0 ms a 12-MP photo, each /frames call)."""
    with open(path, "rb") as f:
        element = part10.pixel_element(f, head)
        if not element.encapsulated:
            return part10.read_range(f, element.value_offset, element.value_offset + (element.length or 0))
        frame = b"".join(part10.read_range(f, a, b) for a, b in element.fragments)
    pieces = _cleaned(frame) if head.transfer_syntax in JPEG_SYNTAXES and not as_stored else None
    if pieces is None:
        return frame
    cleaned = b"".join(frame[p[0]:p[1]] if isinstance(p, tuple) else p for p in pieces)
    return cleaned + b"\x00" * (len(cleaned) % 2)  # as in the served object's fragment, padded to even


def _cleaned(frame: bytes) -> list[Piece] | None:
    """The pieces of the frame clean_pieces keeps, or None when they are the frame itself (raises jpeg.JpegError)."""
    pieces = jpeg.clean_pieces(frame, jpeg.parse(frame, find_end=False))
    return None if _kept_whole(frame, pieces) else pieces


def _kept_whole(frame: bytes, pieces: list[Piece]) -> bool:
    """Whether `pieces` (clean_pieces') are the frame itself: ranges end to end, made-up segments (a rebuilt JFIF or
    Adobe header) the same as the bytes they replace, and nothing left out but the fragment's pad byte."""
    at = 0
    for piece in pieces:
        if isinstance(piece, tuple):
            if piece[0] != at:
                return False
            at = piece[1]
        elif frame[at : at + len(piece)] == piece:
            at += len(piece)
        else:
            return False
    return at == len(frame) or (at == len(frame) - 1 and frame[-1] == 0)


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
