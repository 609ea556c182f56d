"""Settings of the DICOMweb door (`settings.dicomweb`, env CLINPHOTO_DICOMWEB__*)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DicomwebSettings(BaseModel):
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (e.g. https://viewer.trust.nhs.uk) whose browser pages may call /dicomweb with a bearer token; "
        "empty (the default): no CORS, only same-origin pages.",
    )
    public_url: str | None = Field(
        None,
        description="The door's URL as clients reach it (e.g. https://pacs.trust.nhs.uk/dicomweb), for the RetrieveURLs and "
        "BulkDataURIs in answers; default: from the request's Host header (set it behind a reverse proxy).",
    )
