"""A visible watermark burnt into the pixels of a restricted (R) or very restricted (V) photo as a viewer shows it:
who is looking and when, tiled across the image, so a screenshot or a saved copy still says where it came from.
Burnt in by the server (an overlay in the page would be one CSS rule away from gone)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MARKED = frozenset({"R", "V"})


def needed(sensitivity: str) -> bool:
    return sensitivity in MARKED


def burn(path: Path, text: str, quality: int = 88) -> bytes:
    """The JPEG at `path` with `text` tiled across it (semi-transparent white on a dark edge), as a new JPEG."""
    with Image.open(path) as source:
        image = source.convert("RGB")
    size = max(12, min(image.size) // 28)
    font = ImageFont.load_default(size=size)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    step_x, step_y = int(right - left) + size * 3, int(bottom - top) + size * 4
    for row, y in enumerate(range(-step_y, image.height + step_y, step_y)):
        for x in range(-step_x + (row % 2) * step_x // 2, image.width + step_x, step_x):
            draw.text((x, y), text, font=font, fill=(255, 255, 255, 110), stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0, 110))
    marked = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    out = io.BytesIO()
    marked.save(out, "JPEG", quality=quality)
    return out.getvalue()
