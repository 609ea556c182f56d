"""Settings of identity and the access policy (settings.auth, settings.policy).

Every knob is documented in its Field description; `clinphoto policy explain`
and the settings reference print these texts. The rules themselves live in
gateway/core/policy/rules.py; this module only holds what a hospital may tune.

Roles and what they may see (defaults; see PolicySettings):

- clinician: purposes TREAT, ETREAT (break-glass), TRAIN. Sees N photos of a
  patient when one of their specialties matches the photo's specialty or the
  specialty of the patient's current encounter; R photos only of their own
  specialty (photo specialty); V only as uploader or when named on the photo's
  access list. Break-glass (ETREAT + reason) lifts the specialty rule and
  permits R.
- medical-illustration: purposes TREAT, TRAIN, HRESCH, PUBLISH. Sees N and R
  photos of every specialty; V only as uploader or named on the access list.
  The only role given originals by default.
- educator: purpose TRAIN. N photos under teaching consent.
- researcher: purpose HRESCH. N photos under teaching consent.
- integration-engineer, admin: no clinical images (no purposes); they run the
  gateway, its audit and its configuration (console_roles: the /console door).
- privacy-officer: no clinical images; reads the audit trail (audit_roles) to
  answer who saw a patient's photos.
- system: a DICOM peer. Its purpose, sensitivities and specialties come from
  its entry in auth.dicom_peers.

Medical illustration staff (governance_roles) set a photo's sensitivity and
its access list; clinicians and medical illustration (consent_roles) record
and withdraw consent.

Every role also needs a consent that fits the purpose (TREAT/ETREAT: any
consent recorded for the photo, a withdrawn one still counting for photos
taken before the withdrawal; TRAIN/HRESCH: an active teaching or publication
consent not given as a best-interests decision; PUBLISH: an active publication
consent not given as a best-interests decision) and a SMART scope that grants
reading Media.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

PURPOSES = ("TREAT", "ETREAT", "TRAIN", "HRESCH", "PUBLISH")
ROLES = ("clinician", "medical-illustration", "integration-engineer", "admin", "privacy-officer", "educator", "researcher", "system")
SENSITIVITIES = ("N", "R", "V")

Purpose = Literal["TREAT", "ETREAT", "TRAIN", "HRESCH", "PUBLISH"]
Sensitivity = Literal["N", "R", "V"]
RoleSensitivity = Literal["N", "R"]  # V is never granted by role: only the uploader and the access list see V
Service = Literal["echo", "store", "find", "get", "move"]
Algorithm = Literal["RS256", "ES256"]


def _default_role_purposes() -> dict[str, list[Purpose]]:
    return {
        "clinician": ["TREAT", "ETREAT", "TRAIN"],
        "medical-illustration": ["TREAT", "TRAIN", "HRESCH", "PUBLISH"],
        "educator": ["TRAIN"],
        "researcher": ["HRESCH"],
        "integration-engineer": [],
        "admin": [],
        "privacy-officer": [],
        "system": ["TREAT", "ETREAT", "TRAIN", "HRESCH", "PUBLISH"],
    }


def _peer_sensitivities() -> list[RoleSensitivity]:
    return ["N"]


def _all_services() -> list[Service]:
    return ["echo", "store", "find", "get", "move"]


def _algorithms() -> list[Algorithm]:
    return ["RS256", "ES256"]


def _default_role_sensitivities() -> dict[str, list[RoleSensitivity]]:
    return {
        "clinician": ["N", "R"],
        "medical-illustration": ["N", "R"],
        "educator": ["N"],
        "researcher": ["N"],
        "integration-engineer": [],
        "admin": [],
        "privacy-officer": [],
        "system": ["N"],
    }


class DicomPeer(BaseModel):
    """A DICOM application entity allowed to associate with us, and the identity it acts as."""

    ae_title: str = Field(..., min_length=1, max_length=16, description="The peer's calling AE title (exact, case-sensitive, as DICOM compares).")
    hosts: list[str] = Field(
        ...,
        min_length=1,
        description=(
            "Addresses the peer may connect from: IP addresses, CIDR networks (10.1.2.0/24) or host names (resolved when checked). A known AE "
            "title from any other address is rejected."
        ),
    )
    port: int | None = Field(
        None, ge=1, le=65535,
        description="The peer's own DICOM port, where C-MOVE sends to it; empty if it is never a move destination.",
    )
    purpose_of_use: Purpose = Field("TREAT", description="Purpose of use of everything this peer asks for (HL7 v3 ActReason, or PUBLISH).")
    sensitivities: list[RoleSensitivity] = Field(
        default_factory=_peer_sensitivities,
        description=(
            "Sensitivities of photos the peer may query and retrieve. V photos are never sent to a peer unless it is on the photo's access list, "
            "named ae:AETITLE (e.g. ae:PACS1)."
        ),
    )
    specialties: list[str] = Field(
        default_factory=list,
        description="NHS Treatment Function codes the peer may see photos of (specialty rule as for clinicians); empty means every specialty.",
    )
    allow: list[Service] = Field(
        default_factory=_all_services,
        description="DIMSE services the peer may use.",
    )
    name: str | None = Field(None, description="Display name for the audit trail (e.g. 'Main PACS').")
    tls: bool = Field(
        False,
        description="Connect to this peer's port (C-MOVE, routing) over TLS, its certificate checked against tls_ca and "
        "its host name (hosts[0]); dicom_tls_cert is presented if it asks for one.",
    )
    tls_ca: Path | None = Field(None, description="PEM CA bundle that signed this peer's certificate; default the system's trusted CAs.")

    @model_validator(mode="after")
    def _tls_ca_only_with_tls(self) -> DicomPeer:
        # a CA given for a peer left on plain DICOM reads as if its traffic were protected
        if self.tls_ca is not None and not self.tls:
            raise ValueError(f"DICOM peer {self.ae_title}: tls_ca is set but tls is not (it would be reached without TLS)")
        return self


class AuthSettings(BaseModel):
    mode: Literal["dev", "jwt", "api-key"] = Field(
        "dev",
        description=(
            "dev: tokens signed with a local key kept in DATA_DIR (`clinphoto token` prints one); jwt: tokens from the configured issuer (JWKS URL "
            "or PEM key); api-key: static keys from `api_keys` (tests and bootstrap only; every key acts as medical-illustration)."
        ),
    )
    issuer: str | None = Field(None, description="Expected `iss` claim of tokens; required in jwt mode (start-up fails without it).")
    audience: str | None = Field(None, description="Expected `aud` claim; required in jwt mode (start-up fails without it).")
    jwks_url: str | None = Field(
        None,
        description="JWKS URL of the issuer (keys picked by `kid`, cached). jwt mode needs this or a PEM key; "
        "/readyz fails while it cannot be fetched.",
    )
    public_key_pem: str | None = Field(
        None,
        description="PEM public key of the issuer (RSA for RS256, EC P-256 for ES256), inline. Alternative to jwks_url.",
    )
    public_key_file: Path | None = Field(None, description="File holding the issuer's PEM public key. Alternative to public_key_pem.")
    algorithms: list[Algorithm] = Field(default_factory=_algorithms, description="Signature algorithms accepted; nothing else (never none or HS*).")
    leeway_seconds: int = Field(30, ge=0, le=600, description="Clock skew allowed on exp/nbf/iat.")
    jwks_cache_seconds: int = Field(300, ge=0, description="How long keys fetched from jwks_url are reused before fetching again.")
    realm: str = Field("clinphoto", description="Realm named in WWW-Authenticate.")
    # SMART discovery (/fhir/.well-known/smart-configuration): where clients get the tokens this gateway checks
    authorization_endpoint: str | None = Field(None, description="The authorization server's OAuth2 authorize URL (SMART discovery).")
    token_endpoint: str | None = Field(None, description="The authorization server's OAuth2 token URL (SMART discovery).")

    # claim names: identity providers spell them differently
    role_claim: str = Field("role", description=(
        "Claim holding the role (one of clinician, medical-illustration, integration-engineer, admin, privacy-officer, educator, "
        "researcher); a list takes its first known role."
    ))
    name_claim: str = Field("name", description="Claim holding the display name.")
    specialties_claim: str = Field(
        "specialties",
        description="Claim holding the NHS Treatment Function codes of the user (list or space-separated string).",
    )
    scope_claim: str = Field("scope", description="Claim holding SMART v2 scopes (space-separated string or list).")
    patient_claim: str = Field("patient", description="Claim naming the patient in context (clinphoto patient id) for patient/ scopes.")
    purpose_claim: str = Field("purpose_of_use", description="Claim with a default purpose of use; the X-Purpose-Of-Use header overrides it.")
    default_scopes: list[str] = Field(
        default_factory=lambda: ["user/*.cruds"],
        description="Scopes assumed when a token carries none (identity providers that issue no SMART scopes). Set to [] to require explicit scopes.",
    )

    # dev mode
    dev_key_file: Path | None = Field(
        None,
        description="Dev-mode signing key (EC P-256 PEM); default DATA_DIR/auth/dev-signing-key.pem, made on first use with mode 0600.",
    )
    dev_issuer: str = Field("clinphoto-dev", description="`iss` of dev-mode tokens.")
    dev_token_minutes: int = Field(12 * 60, ge=1, description="Lifetime of tokens printed by `clinphoto token`.")

    dev_demo_peer: bool = Field(
        True,
        description="Dev mode only: with no dicom_peers configured, a demo peer DEMOPACS may associate from 127.0.0.1 "
        "(echo), so a fresh `make run` answers dcmtk at once. Never in jwt or api-key mode.",
    )
    dicom_peers: list[DicomPeer] = Field(
        default_factory=list,
        description="DICOM peers allowed to associate. An unknown calling AE title, or a known one from another address, is rejected at association.",
    )

    @model_validator(mode="after")
    def _jwt_mode_complete(self) -> AuthSettings:
        # a half-configured jwt mode must stop start-up, not answer 503 to every call once running
        if self.mode == "jwt":
            missing = []
            if not (self.jwks_url or self.public_key_pem or self.public_key_file):
                missing.append("a key source (auth.jwks_url, auth.public_key_pem or auth.public_key_file)")
            if not self.issuer:
                missing.append("auth.issuer")
            if not self.audience:
                missing.append("auth.audience")
            if missing:
                raise ValueError("auth mode jwt needs " + ", ".join(missing))
        return self

    @field_validator("dicom_peers")
    @classmethod
    def _unique_peers(cls, peers: list[DicomPeer]) -> list[DicomPeer]:
        seen: set[str] = set()
        for peer in peers:
            if peer.ae_title in seen:
                raise ValueError(f"AE title {peer.ae_title!r} is listed twice")
            seen.add(peer.ae_title)
        return peers


class PolicySettings(BaseModel):
    specialty_match: Literal["photo-or-encounter", "photo-only"] = Field(
        "photo-or-encounter",
        description=(
            "A clinician sees a normal (N) photo when one of their specialties matches the photo's specialty, or (photo-or-encounter) the "
            "specialty of one of the patient's current encounters (status in-progress, not discharged). R photos always need the photo's own "
            "specialty."
        ),
    )
    treat_without_consent: bool = Field(
        False,
        description=(
            "Clinical exemption: TREAT and ETREAT need no recorded consent (e.g. a trust that treats photos as part of the record under implied "
            "consent). Teaching, research and publication always need consent."
        ),
    )
    role_purposes: dict[str, list[Purpose]] = Field(
        default_factory=_default_role_purposes,
        description="Purposes of use each role may act under. A role not listed may use none, so sees nothing.",
    )
    role_sensitivities: dict[str, list[Literal["N", "R"]]] = Field(
        default_factory=_default_role_sensitivities,
        description=(
            "Sensitivities each role may see (N normal, R restricted). V photos are seen only by their uploader and the people on their access "
            "list, whatever the role."
        ),
    )
    specialty_rule_roles: list[str] = Field(
        default_factory=lambda: ["clinician"],
        description="Roles bound by the specialty (need-to-know) rule. DICOM peers with specialties are bound too.",
    )
    break_glass_roles: list[str] = Field(
        default_factory=lambda: ["clinician"],
        description="Roles that may break the glass (purpose ETREAT with an X-Break-Glass reason): lifts the specialty rule and permits R photos.",
    )
    break_glass_allows_very_restricted: bool = Field(
        False, description="Break-glass also opens V (very restricted) photos. Off: V stays limited to the uploader and the access list."
    )
    original_roles: list[str] = Field(
        default_factory=lambda: ["medical-illustration"],
        description="Roles given the original as received (with its EXIF, possibly location). Others get the derived renditions only.",
    )
    consent_roles: list[str] = Field(
        default_factory=lambda: ["clinician", "medical-illustration"],
        description="Roles that may record, withdraw and read consent records (/api/v1/consents).",
    )
    governance_roles: list[str] = Field(
        default_factory=lambda: ["medical-illustration"],
        description="Roles that may set a photo's sensitivity and its access list (who may see a V photo).",
    )
    audit_roles: list[str] = Field(
        default_factory=lambda: ["admin", "privacy-officer"],
        description="Roles that may read the audit trail through the doors (FHIR AuditEvent).",
    )
    console_roles: list[str] = Field(
        default_factory=lambda: ["integration-engineer", "admin"],
        description=(
            "Roles that may use the integration engineer's console (/console): received HL7 messages (their raw text holds "
            "patient data) and reprocessing, the mapping bench, DICOM peers and the routing outbox, recent audit records and "
            "the chain's check. Never photos: these roles see no clinical image."
        ),
    )
    visible_statuses: list[str] = Field(
        default_factory=lambda: ["active"],
        description="Photo statuses any exit may show; quarantined and entered-in-error photos are hidden.",
    )

    @field_validator("role_purposes", "role_sensitivities")
    @classmethod
    def _known_roles(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
        return value
