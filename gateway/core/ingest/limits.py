"""Size and pixel limits, checked from the file header before anything is decoded.

A decompression bomb (a small file whose header claims a huge image) is refused
here: JPEG dimensions come from our marker walk, PNG from IHDR, TIFF and HEIF from
the container headers (Pillow and pillow-heif open lazily and decode nothing).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gateway.core.ingest.errors import CORRUPT, NOT_FAITHFUL, TOO_LARGE, TOO_MANY_PIXELS, IngestRejected
from gateway.core.ingest.sniff import HEAD_BYTES, sniff
from gateway.core.objects import jpeg, part10

# Our own (configurable) limit is checked from the header first; Pillow's global
# bomb guard (2 x MAX_IMAGE_PIXELS) stays on as a second line.


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    detail: str = ""  # e.g. "16-bit", "CMYK"


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise IngestRejected(TOO_LARGE, f"file too large: over the {mib(max_bytes)} limit")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise IngestRejected(
            TOO_MANY_PIXELS,
            f"image too large: the header declares {width} x {height} = {width * height / 1e6:.1f} megapixels, "
            f"over the {max_pixels / 1e6:g} MP limit (refused without decoding)",
        )


def png_header(head: bytes) -> Header:
    # IHDR is always the first chunk: width, height, bit depth, colour type
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise IngestRejected(CORRUPT, "corrupt PNG: no IHDR header")
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    if width == 0 or height == 0:
        raise IngestRejected(CORRUPT, "corrupt PNG: zero width or height")
    return Header(width, height, f"{head[24]}-bit colour-type-{head[25]}")


def tiff_or_heif_header(path: Path) -> Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                return Header(im.width, im.height, im.mode)
        except Image.DecompressionBombError as exc:
            raise IngestRejected(TOO_MANY_PIXELS, f"image too large: {exc}") from None
        except Exception as exc:
            raise IngestRejected(CORRUPT, f"corrupt or unreadable image header: {exc}") from None


def read_header(kind: str, path: Path, head: bytes, buf: bytes | jpeg.FileView | None = None) -> tuple[Header, jpeg.JpegInfo | None]:
    """Dimensions from the header; JPEG also returns its marker walk for later use."""
    if kind == "jpeg":
        try:
            info = jpeg.parse(buf if buf is not None else path.read_bytes(), find_end=False)
        except jpeg.JpegError as exc:
            raise IngestRejected(CORRUPT, str(exc)) from None
        return Header(info.width, info.height, info.colour_model), info
    if kind == "png":
        return png_header(head), None
    return tiff_or_heif_header(path), None


def _dicom_size(path: Path) -> tuple[int, int] | None:
    """(Columns, Rows) of a DICOM Part 10 file, from its header (the pixel data is not read)."""
    try:
        ds = part10.read_head(path).dataset
        columns, rows = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    except (part10.Part10Error, TypeError, ValueError):
        return None
    return (columns, rows) if columns > 0 and rows > 0 else None


def declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the file's header declares it; None when it has none we read (its own checks refuse it)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    if head[128:132] == b"DICM":  # a received DICOM object (gateway/core/ingest/received.py)
        return _dicom_size(path)
    try:
        kind = sniff(head).kind
        if kind != "jpeg":
            header = read_header(kind, path, head)[0]
        else:
            view = jpeg.FileView(path)  # the marker segments only, never the whole file
            try:
                header = read_header(kind, path, head, view)[0]
            finally:
                view.close()
    except IngestRejected:
        return None
    return header.width, header.height


def check_request_pixels(files: list[tuple[Path, str | None, tuple[int, int] | None]], max_pixels: int,
                         max_request_pixels: int) -> None:
    """Before any file of a request is decoded: each within max_pixels, all together within max_request_pixels.

    `files` are (path, filename, size) in request order, size (width, height) when the caller has read the header
    already (a received DICOM object's: parsing it again cost ~0.7 ms of a C-STORE's ~12), else None to read it here;
    a refusal of one file names it.
    """
    total = 0
    for index, (path, filename, known) in enumerate(files):
        size = known or declared_size(path)
        if size is None:
            continue
        try:
            check_pixels(*size, max_pixels)
        except IngestRejected as exc:
            raise exc.for_item(index, filename) from None
        total += size[0] * size[1]
    if total > max_request_pixels:
        raise IngestRejected(
            TOO_MANY_PIXELS,
            f"request too large: its {len(files)} images declare {total / 1e6:.1f} megapixels together, over the "
            f"{max_request_pixels / 1e6:g} MP one request may hold (setting ingest.max_request_pixels; checked from "
            "the headers, nothing was decoded): send the photos in smaller batches",
            field="files",
        )


def refuse_unfaithful(reason: str) -> IngestRejected:
    return IngestRejected(NOT_FAITHFUL, reason)
