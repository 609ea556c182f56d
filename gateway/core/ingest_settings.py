"""Settings of the photo ingest pipeline (settings.ingest, env CLINPHOTO_INGEST__...).

Outside the ingest package so the gateway context can name them without importing the pipeline.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class IngestSettings(BaseModel):
    max_pixels: int = Field(100_000_000, gt=0, description="Largest image (width x height) accepted; checked from the header before decoding.")
    max_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Largest file accepted.")
    max_files: int = Field(50, gt=0, description="Most image parts in one upload request.")
    max_request_pixels: int = Field(
        1_200_000_000, gt=0,
        description="Most pixels (width x height, summed over its files) one request may hold: 50 phone photos of "
        "24 MP. Checked from every file's header before any is decoded.",
    )
    keep_originals: bool = Field(True, description="Keep the untouched original as sealed evidence (served only to roles allowed to see originals).")
    quarantine_unknown_patients: bool = Field(
        False,
        description="Photos for an identifier no ADT feed has registered are refused (false) or stored as "
        "status=quarantined under a placeholder patient holding only that identifier (true), for a records officer to reconcile.",
    )
    upload_roles: list[str] = Field(
        default_factory=lambda: ["clinician", "medical-illustration"],
        description="Roles that may upload photos (POST /api/v1/photos) and import archives.",
    )
    thumbnail_size: int = Field(256, ge=16, description="Longest side of the thumbnail rendition (JPEG).")
    preview_size: int = Field(2048, ge=64, description="Longest side of the preview rendition (JPEG).")
    preview_min_fraction: float = Field(
        0.95, gt=0.5, le=1.0,
        description="A JPEG preview may be this fraction of preview_size when the decoder's 1/2-1/4-1/8 scaling gets there, saving a full decode.",
    )
    received_renditions: Literal["after-answer", "before-answer"] = Field(
        "after-answer",
        description="Received DICOM objects (C-STORE, STOW-RS): 'after-answer' answers once the object is checked and "
        "durably stored, then decodes its pixels and makes the preview and thumbnail (a frame that does not decode is "
        "marked failed and audited); 'before-answer' decodes first and refuses a frame that does not decode. Every "
        "structural check (SOP class, syntax, pixel description, the frame's header and its end) runs before the answer "
        "either way. Image uploads always decode before the answer.",
    )
    rendition_quality: int = Field(85, ge=30, le=95, description="JPEG quality of the renditions.")
    encode_quality: int = Field(
        95, ge=50, le=100,
        description="JPEG quality when a lossy source (HEIC, or a JPEG that cannot be turned losslessly) must be encoded once for DICOM.",
    )
    jpeg_444: Literal["decode", "wrap"] = Field(
        "decode",
        description="Non-subsampled (4:4:4) or RGB-coded JPEGs: the VL Image IOD (PS3.3 C.8.12.1) allows only YBR_FULL_422 "
        "with JPEG lossy transfer syntaxes, so by default their decoded pixels are stored losslessly (JPEG-LS Lossless, "
        "history recorded). 'wrap' encapsulates them as they are, labelled YBR_FULL / RGB per PS3.5 8.2.1 (dciodvfy flags this).",
    )
    spool_dir: Path | None = Field(None, description="Where uploads are streamed before checking; default DATA_DIR/spool.")
