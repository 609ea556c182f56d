"""The viewer's settings (under `viewer:` in the gateway's settings)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ViewerSettings(BaseModel):
    frame_ancestors: list[str] = Field(default_factory=list, description="Origins allowed to show the viewer in a frame "
                                       "(the EPR's, e.g. https://epr.example.nhs.uk); empty: only this gateway's own pages.")
    session_minutes: float = Field(30, gt=0, le=720, description="How long a viewer session lasts after its launch.")
    launch_seconds: float = Field(120, gt=0, le=3600, description="How long a launch link may wait before it is used (once).")
    # SMART on FHIR EHR launch (off while smart_client_id is unset)
    smart_client_id: str | None = Field(None, description="The viewer's client id at the authorization server (a public "
                                        "client: authorization code with PKCE); unset: no SMART launch.")
    smart_issuers: list[str] = Field(default_factory=list, description="FHIR base URLs (`iss`) allowed to launch the viewer; "
                                     "any other is refused, so a crafted launch cannot send users to a stranger's sign-in page.")
    smart_scope: str = Field("launch openid fhirUser user/Media.rs user/Patient.rs", description="Scopes the viewer asks for.")
