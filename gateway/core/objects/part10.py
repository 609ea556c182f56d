"""Reading a stored or received DICOM Part 10 file without loading its Pixel Data.

The header (file meta and every element before Pixel Data) is parsed by pydicom
(dcmread with stop_before_pixels, which leaves the file positioned at the Pixel Data
tag); the Pixel Data element is located by its byte offset and read in place: native
pixels as a byte range, encapsulated pixels as the byte ranges of their fragments.
So a 100 MB pixel element is never held in memory to look at an object's header,
serve it with another patient module, or find its frames.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.uid import ImplicitVRLittleEndian

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
# a single-frame photo has one fragment, or a handful; many thousands is a malformed or hostile object
MAX_FRAGMENTS = 10_000
CHUNK = 1 << 20


class Part10Error(ValueError):
    """The file is not a readable DICOM Part 10 object; the message says what is wrong."""


@dataclass(frozen=True)
class Head:
    """A Part 10 file's header and where its Pixel Data element starts."""

    dataset: FileDataset  # file meta and every element before Pixel Data
    pixel_offset: int | None  # file offset of the (7FE0,0010) tag; None when the object has no Pixel Data
    size: int  # bytes in the file

    @property
    def transfer_syntax(self) -> str:
        return str(self.dataset.file_meta.get("TransferSyntaxUID", "") or "")

    @property
    def implicit_vr(self) -> bool:
        return self.transfer_syntax == ImplicitVRLittleEndian


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data value sits: native (a byte range) or encapsulated (fragments of one frame)."""

    value_offset: int
    length: int | None  # None: encapsulated (undefined length)
    offset_table: tuple[int, int] | None = None  # the Basic Offset Table item's value range (encapsulated)
    fragments: tuple[tuple[int, int], ...] = ()  # byte ranges of the fragments' values (encapsulated)

    @property
    def encapsulated(self) -> bool:
        return self.length is None

    @property
    def fragment_bytes(self) -> int:
        return sum(end - start for start, end in self.fragments)

    @property
    def value_end(self) -> int:
        """Where the value ends: native pixels' last byte, or the last item's (the sequence delimiter follows)."""
        if self.length is not None:
            return self.value_offset + self.length
        last = self.fragments[-1] if self.fragments else self.offset_table
        return last[1] if last is not None else self.value_offset

    @property
    def element_end(self) -> int:
        """Where the element ends (after the sequence delimiter item of encapsulated pixels)."""
        return self.value_end + (8 if self.encapsulated else 0)


def read_head(path: Path) -> Head:
    """The header of a Part 10 file (raises Part10Error when it is not one)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            ds = dcmread(f, stop_before_pixels=True)
            at = f.tell()  # stop_before_pixels leaves the file at the Pixel Data tag (or at its end)
            tag = f.read(4)
    except Exception as exc:  # pydicom raises many kinds on garbage: each means "not a readable object"
        raise Part10Error(f"not a readable DICOM Part 10 file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(ds, FileDataset) or "TransferSyntaxUID" not in ds.file_meta:
        raise Part10Error("not a DICOM Part 10 file: no file meta information with a Transfer Syntax UID")
    return Head(dataset=ds, pixel_offset=at if tag == PIXEL_DATA_TAG else None, size=size)


def pixel_element(f: BinaryIO, head: Head) -> PixelElement:
    """The Pixel Data element of `head`'s file (open in `f`): its value range, or its fragments."""
    if head.pixel_offset is None:
        raise Part10Error("the object has no Pixel Data (7FE0,0010)")
    f.seek(head.pixel_offset + 4)
    if head.implicit_vr:
        (length,) = struct.unpack("<I", _read(f, 4))
        start = head.pixel_offset + 8
    else:
        vr = _read(f, 4)[:2]
        if vr not in (b"OB", b"OW"):
            raise Part10Error(f"Pixel Data has VR {vr.decode('latin-1')!r}, not OB or OW")
        (length,) = struct.unpack("<I", _read(f, 4))
        start = head.pixel_offset + 12
    if length != UNDEFINED:
        if start + length > head.size:
            raise Part10Error(f"Pixel Data claims {length} bytes, but the file ends {head.size - start} bytes after its start")
        return PixelElement(value_offset=start, length=length)
    items = _items(f, start, head.size)
    if not items:
        raise Part10Error("encapsulated Pixel Data has no Basic Offset Table item")
    return PixelElement(value_offset=start, length=None, offset_table=items[0], fragments=tuple(items[1:]))


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise Part10Error("the file ends inside the Pixel Data element")
    return data


def _items(f: BinaryIO, pos: int, size: int) -> list[tuple[int, int]]:
    """Value ranges of the items of an encapsulated Pixel Data element, up to its sequence delimiter."""
    items: list[tuple[int, int]] = []
    while True:
        f.seek(pos)
        group, element, length = struct.unpack("<HHI", _read(f, 8))
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            return items
        if tag != _ITEM or length == UNDEFINED:
            raise Part10Error(f"encapsulated Pixel Data holds ({group:04X},{element:04X}) where an item belongs")
        if pos + 8 + length > size:
            raise Part10Error("encapsulated Pixel Data is cut short: a fragment runs past the end of the file")
        if len(items) > MAX_FRAGMENTS:
            raise Part10Error(f"encapsulated Pixel Data has more than {MAX_FRAGMENTS} fragments")
        items.append((pos + 8, pos + 8 + length))
        pos += 8 + length


def read_range(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    return _read(f, end - start)


def copy_range(f: BinaryIO, start: int, end: int, out: BinaryIO, chunk: int = CHUNK) -> None:
    """Bytes [start, end) of `f` to `out`, a chunk at a time."""
    f.seek(start)
    left = end - start
    while left > 0:
        data = _read(f, min(chunk, left))
        out.write(data)
        left -= len(data)


META_START = 128 + 4  # the preamble and "DICM"


def meta_length(start: bytes) -> int:
    """The length of the file meta group, with its group length element, from a Part 10 object's first bytes."""
    group, element, vr = struct.unpack_from("<HH2s", start, META_START)
    if (group, element, vr) != (0x0002, 0x0000, b"UL"):
        raise Part10Error("the file meta has no group length (0002,0000)")
    (length,) = struct.unpack_from("<I", start, META_START + 8)
    return 12 + int(length)


def data_set_digest(path: Path) -> str:
    """SHA-256 of the data set alone (after the preamble and file meta).

    Two copies of one object relayed by different senders differ in their file meta
    (implementation and source AE title) but not in this: it tells "the same object
    again" from "another object under a known SOP Instance UID".
    """
    with open(path, "rb") as f:
        f.seek(META_START + meta_length(_read(f, META_START + 12)))
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
