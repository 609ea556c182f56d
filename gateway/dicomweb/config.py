"""Settings of the DICOMweb door (`settings.dicomweb`, env CLINPHOTO_DICOMWEB__*)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DicomwebSettings(BaseModel):
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (e.g. https://viewer.trust.nhs.uk) whose browser pages may call /dicomweb with a bearer token; "
        "empty (the default): no CORS, only same-origin pages.",
    )
