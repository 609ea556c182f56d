"""Settings of the HL7 v2 door (`settings.hl7`, env CLINPHOTO_HL7__*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class Hl7Settings(BaseModel):
    host: str | None = Field(
        None, description="Address the MLLP listener binds; default the HTTP address (use 0.0.0.0 for a PAS on another host)."
    )
    mapping_file: Path | None = Field(
        None, description="Mapping YAML for incoming ADT; default the NHS England mapping shipped in mapping/default.yaml."
    )
    mrn_system: str = Field(
        "https://clinphoto.local/Id/mrn/{authority}",
        description="Identifier system for local MRNs (PID-3 type MR); {authority} is replaced by CX.4, the trust's ODS code.",
    )
    merged_policy: Literal["reject", "survivor"] = Field(
        "reject",
        description="A message about an identifier of a merged patient: reject it with AE, or apply it to the survivor.",
    )
    unknown_action: Literal["accept", "reject"] = Field(
        "accept", description="Messages of a type/event we do not handle: AA without change (accept) or AR (reject). Always stored."
    )
    type_actions: dict[str, Literal["accept", "reject"]] = Field(
        default_factory=dict,
        description="Per message type or type^event (e.g. ORU, ADT^A60) override of unknown_action.",
    )
    supported_versions: list[str] = Field(
        default_factory=lambda: ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"],
        description="MSH-12 versions accepted; others get AR (table 0357 code 203).",
    )
    default_charset: str = Field("utf-8", description="Python codec for messages with an empty MSH-18.")
    receiving_application: str = Field("CLINPHOTO", description="MSH-3 of the ACKs we send.")
    receiving_facility: str = Field("", description="MSH-4 of the ACKs we send; empty echoes the message's MSH-6.")
    strict_validation: bool = Field(
        False, description="Also validate each message's structure with hl7apy (slow: ~15 ms/message)."
    )
    max_frame_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest MLLP frame; a larger one closes the connection.")
    max_segments: int = Field(1000, ge=10, description="Most segments in one message; a longer message gets AE (102).")
    max_repetitions: int = Field(
        100, ge=1, description="Most repetitions of one field (e.g. PID-3 identifiers); more gets AE (102) naming the field."
    )
    idle_timeout: float = Field(
        600.0, gt=0,
        description="Seconds a connection may stay silent before it is closed, and may take none of the ACKs waiting "
        "for it (reading from it is held meanwhile) before it is aborted.",
    )
    frame_timeout: float = Field(
        60.0, gt=0,
        description="Seconds a connection may take to send one whole frame (from its first byte, or from stray bytes "
        "outside a frame), not counting time the gateway holds it back; a slower sender is closed, so a connection "
        "trickling a byte at a time cannot be held open.",
    )
    max_connections: int = Field(
        100, ge=1,
        description="Most MLLP connections open at once; further ones are closed at once (logged). Lowered at start-up "
        "if the process's open-file limit could not hold them beside the other doors.",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate; with tls_key, the listener speaks TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; when set, clients must present a certificate it signed.")
    allowed_sources: list[str] = Field(
        default_factory=list, description="Source addresses or CIDR networks allowed to connect; empty allows all."
    )
    batch_max: int = Field(1000, ge=1, description="Most messages applied in one group commit.")
