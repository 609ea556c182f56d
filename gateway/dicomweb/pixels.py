"""What WADO-RS makes of a served DICOM object beyond sending it whole: its frame as stored, its pixels decoded
(the transcoding a client that accepts nothing stored gets), its header as DICOM JSON, a rendered image."""

from __future__ import annotations

import io
import logging
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian

from gateway.core.access import DicomObject
from gateway.core.objects import part10
from gateway.core.objects.served_pixels import served_frame

log = logging.getLogger("clinphoto.dicomweb")


def frame(obj: DicomObject) -> bytes:
    """The single frame's bytes as served: the JPEG (JPEG-LS, RLE) codestream of an encapsulated object, its
    fragments joined and its JPEG metadata left out; the native pixel bytes of an uncompressed one."""
    path = obj.served.source
    return served_frame(path, part10.read_head(path), as_stored=obj.served.as_stored)


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
    return _json_of(dcmread(io.BytesIO(obj.served.header), stop_before_pixels=True))


def _json_of(ds: Dataset) -> dict[str, Any]:
    """Each element as pydicom's to_json_dict writes it, but one whose stored value cannot be written is left out
    (logged by its tag alone), a sequence's items each written this way: JSON carries DS and IS as numbers (PS3.18
    F.2.3), and a camera's "abc" or "1,5" in a DS that ingest kept made pydicom raise, and every /metadata answer
    naming that object a 500: its study could not be opened in a viewer."""
    out: dict[str, Any] = {}
    for tag in ds.keys():
        key = f"{tag:08X}"
        try:
            element = ds[tag]
            if element.VR == "SQ" and element.value:
                out[key] = {"vr": "SQ", "Value": [_json_of(item) for item in element.value]}
            else:
                out[key] = element.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 30)
        except Exception:  # pydicom raises several kinds for a value it cannot convert
            log.warning("DICOM JSON: attribute (%04X,%04X) left out, its stored value is not valid for its VR", tag.group, tag.element)
    return out


def fits(path: Path, viewport: tuple[int, int]) -> bool:
    """Whether a stored rendition already fits the viewport (its header only is read)."""
    with Image.open(path) as image:
        return image.width <= viewport[0] and image.height <= viewport[1]


# -- rendering parameters (PS3.18 8.3.5.1) ------------------------------------------------------------------

WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
ANNOTATIONS = ("patient", "technique")


@dataclass(frozen=True)
class Window:
    """window=center,width,function (PS3.18 8.3.5.1.3), the VOI LUT Function of PS3.3 C.11.2.1.2-3."""

    center: float
    width: float
    function: str

    def lut(self) -> list[int]:
        """The 256-entry table from a stored 8-bit value to the displayed one (output range 0-255)."""
        c, w = self.center, self.width
        x = np.arange(256, dtype=np.float64)
        if self.function == "linear":  # PS3.3 C.11.2.1.2.1
            low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 if w > 1 else np.zeros_like(x)
            y = np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
        elif self.function == "linear-exact":  # PS3.3 C.11.2.1.3.2
            y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, ((x - c) / w + 0.5) * 255))
        else:  # sigmoid, PS3.3 C.11.2.1.3.1
            y = 255 / (1 + np.exp(-4 * (x - c) / w))
        return [int(v) for v in np.clip(np.rint(y), 0, 255)]


def apply_window(image: Image.Image, window: Window) -> Image.Image:
    """The VOI LUT function applied to each channel of a colour photo alike.

    PS3.3 defines VOI LUT functions for grey images only (C.11.2); an RGB photo has no VOI. What a client asking for
    a window of a photo can mean is the same contrast curve on R, G and B, so each channel goes through the same
    table as if it were a grey image of 8-bit stored values (the Modality LUT of a photo is the identity). Hue shifts
    where a channel clips, as with any per-channel curve; nothing is converted to grey."""
    table = window.lut()
    return image.point(table * len(image.getbands()))


# DejaVu Sans (Debian fonts-dejavu-core, in the image and CI) covers Latin, Greek and Cyrillic names; Pillow's own
# bundled font has no accented letters and would draw "Ó Súilleabháin" with empty boxes, a name no one can check
FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


def _font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """A font and whether it draws any Latin, Greek or Cyrillic name (else: names are folded to ASCII letters)."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    return ImageFont.load_default(size), False


def _ascii(text: str) -> str:
    """Accents dropped (Ó -> O) where the font has no glyph for them: a readable name rather than empty boxes."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return folded or "?"


def annotate(image: Image.Image, lines: list[str]) -> Image.Image:
    """Text burned into the image (PS3.18 8.3.5.1.1 annotation): white on a dark band along the top edge, sized to
    the image, so it is legible on any photo. The caller decides what the lines say (and that the requester may see
    them); nothing here logs or keeps them."""
    if not lines:
        return image
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    size = max(10, min(image.width, image.height) // 28)
    font, full = _font(size)
    if not full:
        lines = [_ascii(line) for line in lines]
    while size > 8 and max(draw.textlength(line, font=font) for line in lines) > image.width - 2 * max(2, size // 4):
        size -= 1  # a long name on a small image: smaller text rather than text cut off at the edge
        font, _ = _font(size)
    pad = max(2, size // 4)
    height = pad + len(lines) * (size + pad)
    draw.rectangle((0, 0, image.width, height), fill=(0, 0, 0, 170))
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * (size + pad)), line, fill=(255, 255, 255, 255), font=font)
    return image


def rendered(source: bytes, media: str, viewport: tuple[int, int] | None, quality: int | None,
             window: Window | None = None, annotation: list[str] | None = None) -> bytes:
    """A stored rendition (JPEG) fitted into the viewport (never enlarged), windowed and annotated when asked, as JPEG
    or PNG. The window goes on the stored values before any resampling (the LUT is of stored values); the text
    after it, so it is sized for the image the client gets."""
    with Image.open(io.BytesIO(source)) as image:
        image.load()
        out_image: Image.Image = image
        if window is not None:
            out_image = apply_window(out_image, window)
        if viewport is not None:
            out_image.thumbnail(viewport, Image.Resampling.LANCZOS)
        if annotation:
            out_image = annotate(out_image, annotation)
        return encode(out_image, media, quality)


JPEG_QUALITY = 90


def encode(image: Image.Image, media: str, quality: int | None = None) -> bytes:
    """The image as PNG, or as baseline JPEG (quality 90 unless asked; 4:2:0 as cameras write)."""
    out = io.BytesIO()
    if media == "image/png":
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=quality or JPEG_QUALITY, progressive=False)
    return out.getvalue()


def frame_image(obj: DicomObject, media: str) -> bytes:
    """The frame of an object not stored as JPEG (native, RLE, JPEG-LS) decoded and encoded as `media`: the stored
    values as they are (no windowing, MONOCHROME1 not inverted: a frame is data, not a display), baseline JPEG of
    quality 90, or PNG (lossless)."""
    array = decoded(obj).pixel_array  # colour as RGB (pydicom converts YBR)
    return encode(Image.fromarray(np.ascontiguousarray(array)), media)
