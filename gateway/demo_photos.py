"""Synthetic clinical photos for `clinphoto demo`, stored through the real ingest pipeline.

Drawn here (a skin-toned field with a lesion, a ruler and a label), so the demo
needs no image files and no real person appears. Body sites, specialties,
sensitivities, EXIF orientations and formats vary so every path shows up in the
viewer: rotated phone shots, a photo whose GPS tags are stripped, a PNG, a HEIC.
"""

from __future__ import annotations

import io
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw
from sqlalchemy import select

from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.metadata import NHS_SYSTEM, parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ImageFile, Source
from store.models import Encounter, PatientIdentifier

SOURCE = Source.demo()

# (body site SNOMED CT, laterality, view, specialty, sensitivity, EXIF orientation, format)
Shot = tuple[str, str | None, str, str, str, int, str]
PLANS: list[list[Shot]] = [
    [("85562004", "left", "dorsal", "330", "N", 1, "jpeg"), ("89545001", None, "frontal", "330", "N", 6, "jpeg"),
     ("15497006", None, "vertex", "330", "N", 1, "heic")],
    [("368209003", "right", "lateral", "160", "N", 1, "jpeg"), ("76248009", "left", "frontal", "160", "R", 8, "jpeg")],
    [("56459004", "both", "plantar", "420", "N", 1, "png"), ("14975008", "right", "volar", "420", "N", 3, "jpeg")],
    [("818983003", None, "frontal", "100", "N", 1, "jpeg"), ("181262009", None, "close-up", "100", "V", 1, "jpeg")],
    [("40689003", "left", "lateral", "161", "R", 6, "jpeg"), ("30021000", "right", "anterior", "161", "N", 1, "jpeg")],
]

SKIN = [(224, 172, 105), (198, 134, 66), (141, 85, 36), (241, 194, 125), (255, 219, 172)]


def _draw(seed: int, width: int = 1600, height: int = 1200) -> Image.Image:
    tone = SKIN[seed % len(SKIN)]
    image = Image.new("RGB", (width, height), tone)
    draw = ImageDraw.Draw(image)
    for i in range(0, height, 6):  # gentle shading, like skin under clinic light
        shade = int(18 * (i / height))
        draw.line([(0, i), (width, i)], fill=tuple(max(0, c - shade) for c in tone), width=6)
    cx, cy = width // 2 + (seed * 37) % 300 - 150, height // 2 + (seed * 53) % 200 - 100
    rx, ry = 120 + seed * 11 % 90, 80 + seed * 7 % 70
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(150, 40 + seed % 40, 50), outline=(90, 20, 30), width=8)
    # a scale ruler along the bottom and an "up" marker top-left, so orientation is visible
    draw.rectangle([60, height - 110, 60 + 800, height - 70], fill=(250, 250, 250), outline=(0, 0, 0), width=3)
    for mm in range(0, 801, 20):
        draw.line([(60 + mm, height - 110), (60 + mm, height - (85 if mm % 100 else 70))], fill=(0, 0, 0), width=2)
    draw.polygon([(80, 140), (130, 60), (180, 140)], fill=(20, 20, 160))
    draw.text((200, 80), f"SYNTHETIC DEMO {seed}", fill=(0, 0, 0))
    return image


def _stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    return upright.transpose(inverse[orientation]) if orientation in inverse else upright


def _encode(image: Image.Image, orientation: int, fmt: str, taken: datetime, gps: bool) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Apple" if fmt == "heic" else "Canon"
    exif[0x0110] = "iPhone 15" if fmt == "heic" else "Canon EOS R6"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")
    if gps:  # shows the privacy rule: kept in the sealed original only
        g = exif.get_ifd(0x8825)
        g[1], g[2], g[3], g[4] = "N", (53.0, 48.0, 2.5), "W", (1.0, 32.0, 51.2)
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG", exif=exif.tobytes())
    elif fmt == "heic":
        import pillow_heif

        pillow_heif.register_heif_opener()
        image.save(out, "HEIF", quality=85, exif=exif.tobytes())
    else:
        image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def seed_demo_photos(gw, patients) -> int:
    """Ingest synthetic photos for the demo patients; returns how many are stored (new or already there)."""
    stored = 0
    with tempfile.TemporaryDirectory(prefix="demo-", dir=gw.spool.path) as tmp:  # a kill -9 leaves nothing for good
        folder = Path(tmp)
        for index, patient in enumerate(patients):
            with gw.db.read() as session:
                nhs = session.execute(select(PatientIdentifier.value).where(
                    PatientIdentifier.patient_id == patient.id, PatientIdentifier.system == NHS_SYSTEM)).scalar_one_or_none()
                visit = session.execute(select(Encounter.visit_number).where(Encounter.patient_id == patient.id)
                                        .order_by(Encounter.id.desc()).limit(1)).scalar_one_or_none()
            if nhs is None:
                continue
            plan = PLANS[index % len(PLANS)]
            for shot, (site, side, view, specialty, sensitivity, orientation, fmt) in enumerate(plan):
                seed = index * 10 + shot
                taken = datetime(2024, 3, 1, 9, 30) + timedelta(days=index, minutes=shot * 7)
                data = _encode(_stored_for(_draw(seed), orientation), orientation, fmt, taken, gps=shot == 0)
                path = folder / f"p{index}-{shot}.{ {'jpeg': 'jpg'}.get(fmt, fmt) }"
                path.write_bytes(data)
                metadata = {
                    "patient": f"nhs|{nhs}", "bodySite": {"code": site, **({"laterality": side} if side else {})},
                    "view": view, "specialty": specialty, "sensitivity": sensitivity, "photographer": "Demo Photographer",
                    "device": "Clinic camera 2", "description": f"Synthetic demo photo {seed}",
                }
                if visit:
                    metadata["encounter"] = visit
                if index == 4 and shot == 0:  # a consent captured in the app with the photo
                    metadata["consent"] = {"level": "record", "givenBy": "patient", "capturedBy": "Demo Photographer"}
                try:
                    meta = parse_metadata(metadata)
                    result = ingest(gw, CaptureRequest(
                        source=SOURCE, items=[ImageFile(path, filename=path.name)], patient=meta.patient_ref(),
                        governance=meta.governance(), session_key=f"demo|{nhs}|{visit}"))
                except IngestRejected:
                    continue
                stored += len(result.photos)
    return stored
