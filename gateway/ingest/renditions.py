"""Preview and thumbnail JPEGs: upright, no metadata, made with the decoder's own downscaling.

For JPEG sources Pillow's draft mode asks libjpeg to decode at 1/2, 1/4 or 1/8
scale (DCT scaling), so a 12 MP photo becomes a 256 px thumbnail without a full
decode. Other formats reuse the image the pipeline already decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from gateway.ingest.exif import upright


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
    if image.mode in ("RGB", "L"):
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


def from_image(
    image: Image.Image, orientation: int, *, preview: int, thumbnail: int, quality: int, min_fraction: float = 0.95
) -> Renditions:
    """Renditions from an opened image; a JPEG not yet loaded is decoded in draft mode.

    The preview may come out up to (1 - min_fraction) smaller than `preview` when
    the decoder's 1/2, 1/4 or 1/8 scaling lands there: a 4032 px phone photo gives a
    2016 px preview from a half-scale decode (~50 ms) instead of a full decode and
    resample (~200 ms).
    """
    if image.format == "JPEG" and getattr(image, "_im", None) is None:
        want = fit(image.width, image.height, max(1, int(preview * min_fraction)))
        image.draft("L" if image.mode == "L" else "RGB", want)
    big = _shrink(_rgb_or_gray(image), preview)
    big = upright(big, orientation)
    small = _shrink(big, thumbnail)
    return Renditions(_encode(big, quality), _encode(small, quality), big.size, small.size)
