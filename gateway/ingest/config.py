"""Settings of the photo ingest pipeline (settings.ingest, env CLINPHOTO_INGEST__...)."""

from pydantic import BaseModel, Field


class IngestSettings(BaseModel):
    max_pixels: int = Field(100_000_000, description="Largest image (width x height) accepted; checked from the header before decoding.")
    max_bytes: int = Field(200 * 1024 * 1024, description="Largest file accepted.")
    keep_originals: bool = Field(True, description="Keep the untouched original as sealed evidence (served only to roles allowed to see originals).")
