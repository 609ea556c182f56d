"""Preview and thumbnail JPEGs: upright, no metadata, made from pixels the pipeline already decoded.

For JPEG sources the pipeline's strict check decodes at 1/2, 1/4 or 1/8 scale (DCT
scaling, see decode_target), so a 12 MP photo becomes a 2016 px preview and a 256 px
thumbnail from one reduced decode. Other formats reuse their full decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from gateway.core.ingest.exif import upright

# Asset.rendition_state: NULL made; DUE a received object answered before its pixels were decoded
# (deferred.py makes them); FAILED its pixels did not decode
DUE = "due"
FAILED = "failed"


@dataclass(frozen=True)
class Renditions:
    preview: bytes
    thumbnail: bytes
    preview_size: tuple[int, int]
    thumbnail_size: tuple[int, int]


def fit(width: int, height: int, longest: int) -> tuple[int, int]:
    """Size with the longest side at most `longest`, aspect kept (never enlarged)."""
    if max(width, height) <= longest:
        return width, height
    if width >= height:
        return longest, max(1, round(height * longest / width))
    return max(1, round(width * longest / height)), longest


def _rgb_or_gray(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "RGBX", "L"):  # RGBX: a decoder's buffer, resized and saved as RGB
        return image
    return image.convert("RGB")


def _encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # no exif=, icc_profile= or comment: renditions carry no metadata at all
    image.save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def _shrink(image: Image.Image, longest: int) -> Image.Image:
    size = fit(image.width, image.height, longest)
    if size == image.size:
        return image
    # reducing_gap: box-reduce by an integer factor first, then resample (fast, still sharp)
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def decode_target(width: int, height: int, preview: int, min_fraction: float) -> tuple[int, int]:
    """Smallest size a JPEG decoder may scale down to and still give the preview.

    The preview may come out up to (1 - min_fraction) smaller than `preview` when
    the decoder's 1/2, 1/4 or 1/8 scaling lands there: a 4032 px phone photo gives a
    2016 px preview from a half-scale decode (~47 ms) instead of a full decode and
    resample (~200 ms).
    """
    return fit(width, height, max(1, int(preview * min_fraction)))


def from_image(image: Image.Image, orientation: int, *, preview: int, thumbnail: int, quality: int) -> Renditions:
    """Renditions from decoded pixels, turned upright by `orientation`."""
    big = _shrink(_rgb_or_gray(image), preview)
    big = upright(big, orientation)
    small = _shrink(big, thumbnail)
    return Renditions(_encode(big, quality), _encode(small, quality), big.size, small.size)
