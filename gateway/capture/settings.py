"""The capture app's settings (under `capture:` in the gateway's settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class CaptureSettings(BaseModel):
    client_id: str | None = Field(None, description="The capture app's client id at the authorization server (jwt mode: "
                                  "authorization code with PKCE, a public client).")
    scope: str = Field("openid user/Media.cruds user/Patient.rs user/Consent.cruds", description="Scopes the app asks for.")
    options_file: Path | None = Field(None, description="The body sites, views and consent wording the app offers (YAML); "
                                      "default: the list shipped in gateway/capture/options.yaml.")
    vendor_dir: Path = Field(Path(__file__).resolve().parents[2] / "node_modules", description="Where `npm ci` put the "
                             "browser libraries the app uses (@zxing/library, the barcode reader for browsers without "
                             "BarcodeDetector); missing: the app asks for the number to be typed.")
    idle_minutes: float = Field(5, gt=0, le=120, description="Minutes without a touch after which the app signs out and "
                                "erases what it holds (asking first when photos wait to upload).")
