"""What WADO-RS makes of a served DICOM object beyond sending it whole: its frame as stored, its pixels decoded
(the transcoding a client that accepts nothing stored gets), its header as DICOM JSON, a rendered image."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from gateway.core.access import DicomObject
from gateway.core.objects import part10


def frame(obj: DicomObject) -> bytes:
    """The single frame's bytes as stored: the JPEG (JPEG-LS, RLE) codestream of an encapsulated object, its
    fragments joined; the native pixel bytes of an uncompressed one."""
    path = obj.served.source
    head = part10.read_head(path)
    with open(path, "rb") as f:
        element = part10.pixel_element(f, head)
        if not element.encapsulated:
            return part10.read_range(f, element.value_offset, element.value_offset + (element.length or 0))
        return b"".join(part10.read_range(f, a, b) for a, b in element.fragments)


def decoded(obj: DicomObject) -> Any:
    """The object as a pydicom data set in Explicit VR Little Endian, pixels decoded (colour as RGB): the one
    transcoding offered, for clients that accept no stored syntax. 12 MP: ~0.3 s and 36 MB, hence never the default."""
    ds = dcmread(io.BytesIO(obj.served.read()))
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        ds.decompress()  # pydicom: decodes, converts YCbCr to RGB, sets the transfer syntax and photometric interpretation
    return ds


def decoded_part10(obj: DicomObject) -> Iterator[bytes]:
    out = io.BytesIO()
    decoded(obj).save_as(out, enforce_file_format=True)
    yield out.getvalue()


def decoded_frame(obj: DicomObject) -> bytes:
    ds = decoded(obj)
    return bytes(ds.PixelData)


def header_json(obj: DicomObject) -> dict[str, Any]:
    """The served object's attributes as DICOM JSON (PS3.18 F.2), Pixel Data left out (the caller points at it)."""
    ds = dcmread(io.BytesIO(obj.served.header), stop_before_pixels=True)
    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=1 << 30)
    return out


def fits(path: Path, viewport: tuple[int, int]) -> bool:
    """Whether a stored rendition already fits the viewport (its header only is read)."""
    with Image.open(path) as image:
        return image.width <= viewport[0] and image.height <= viewport[1]


def rendered(source: bytes, media: str, viewport: tuple[int, int] | None, quality: int | None) -> bytes:
    """A stored rendition (JPEG) fitted into the viewport (never enlarged), as JPEG or PNG."""
    with Image.open(io.BytesIO(source)) as image:
        image.load()
        if viewport is not None:
            image.thumbnail(viewport, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if media == "image/png":
            image.save(out, "PNG")
        else:
            image.save(out, "JPEG", quality=quality or 90)
        return out.getvalue()
