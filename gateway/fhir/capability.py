"""What this FHIR server implements, exactly: the CapabilityStatement and the SMART discovery document."""

from __future__ import annotations

from typing import Any

from gateway.core.policy.settings import AuthSettings

SOFTWARE_VERSION = "0.1.0"


def _param(name: str, kind: str, doc: str) -> dict[str, str]:
    return {"name": name, "type": kind, "documentation": doc}


_PHOTO_COMMON = [
    _param("_id", "token", "the photo's id"),
    _param("patient", "reference", "Patient/<id>; a merged patient's id finds its survivor's photos"),
    _param("patient.identifier", "token", "the patient's identifier, e.g. https://fhir.nhs.uk/Id/nhs-number|9990000018"),
    _param("subject", "reference", "as patient"),
    _param("identifier", "token", "the SOP Instance UID (urn:dicom:uid|urn:oid:<uid>)"),
    _param("encounter", "reference", "the encounter's visit number"),
    _param("status", "token", "the resource's status"),
]
_PAGING = ("_count (default 20, max 200); _elements; _total (none, estimate, accurate); next/previous links are keyset "
           "cursors that stay right while photos arrive")

RESOURCES = [
    {
        "type": "Patient",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            _param("_id", "token", "the patient's opaque id"),
            _param("identifier", "token", "system|value (NHS number, MRN)"),
            _param("family", "string", "starts with, case-insensitive"),
            _param("given", "string", "starts with, case-insensitive"),
            _param("birthdate", "date", "the full date"),
        ],
    },
    {
        "type": "Media",
        "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "create"}],
        "searchInclude": ["Media:patient"],
        "searchParam": [*_PHOTO_COMMON,
                        _param("created", "date", "eq, ne, gt, lt, ge, le, sa, eb; repeat for a range"),
                        _param("site", "token", "SNOMED CT body structure"),
                        _param("modality", "token", "DICOM modality: XC, DMS, OT"),
                        _param("view", "token", "the view as recorded")],
        "documentation": f"_sort created or -created (default); _summary=count; {_PAGING}",
    },
    {
        "type": "DocumentReference",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchInclude": ["DocumentReference:patient"],
        "searchParam": [*_PHOTO_COMMON,
                        _param("date", "date", "when the photo was stored; prefixes as for Media.created"),
                        _param("type", "token", "LOINC 72170-4 Photographic image"),
                        _param("category", "token", "DICOM modality: XC, DMS, OT")],
        "documentation": f"_sort date or -date (default); _summary=count; {_PAGING}",
    },
    {
        "type": "Consent",
        "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "create"}, {"code": "update"}],
        "searchParam": [_param("patient", "reference", "Patient/<id> (required)"), _param("status", "token", "active, inactive")],
        "documentation": "Levels as provision purposes (record: TREAT; teaching: + TRAIN, HRESCH; publication: + PUBLISH, a local "
                         "code); who gave it as an extension; update may only withdraw (status inactive), If-Match honoured.",
    },
    {
        "type": "AuditEvent",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [_param("patient", "reference", "the patient the record is about"), _param("agent", "token", "the user id"),
                        _param("date", "date", "when recorded"), _param("entity", "reference", "e.g. Media/<id>"),
                        _param("type", "token", "DICOM audit event id or rest"), _param("subtype", "token", "e.g. search, read"),
                        _param("outcome", "token", "0, 4, 8, 12")],
        "documentation": "For audit roles only (admin, privacy officer); IHE Basic Audit Log Patterns; reading the trail is audited.",
    },
    {
        "type": "Binary",
        "interaction": [{"code": "read"}],
        "documentation": "The image bytes (Accept an image type) or the Binary resource (Accept: application/fhir+json); "
                         "_rendition=preview|thumbnail; originals only for the roles the policy names; HTTP Range; never "
                         "compressed, never cached.",
    },
]


def statement(base: str, auth: AuthSettings) -> dict[str, Any]:
    security: dict[str, Any] = {
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
        "description": "Bearer tokens (SMART v2 scopes only narrow the gateway's policy); X-Purpose-Of-Use and X-Break-Glass "
                       "headers; every search and read is filtered by consent, sensitivity and need to know, and audited.",
    }
    uris = [{"url": name, "valueUri": value} for name, value in (("authorize", auth.authorization_endpoint),
                                                                   ("token", auth.token_endpoint)) if value]
    if uris:
        # SMART App Launch: where a client gets its token, for clients that read it here rather than in
        # .well-known/smart-configuration
        security["extension"] = [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": uris}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-06",
        "kind": "instance",
        "software": {"name": "clinphoto", "version": SOFTWARE_VERSION},
        "implementation": {"description": "clinphoto clinical photo gateway", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{"mode": "server", "security": security, "resource": RESOURCES,
                  "interaction": [{"code": "transaction", "documentation": "IHE MHD Provide Document Bundle: Binary + "
                                   "DocumentReference or Media (+ SubmissionSet List), stored whole or not at all"}]}],
    }


def smart_configuration(auth: AuthSettings) -> dict[str, Any]:
    """SMART App Launch discovery: the hospital's authorization server, from the settings (this is a resource server)."""
    doc: dict[str, Any] = {
        "capabilities": ["launch-ehr", "client-confidential-symmetric", "context-ehr-patient", "permission-v2", "permission-user",
                         "permission-patient"],
        "scopes_supported": ["openid", "fhirUser", "launch", "launch/patient", "patient/Media.rs", "user/Media.rs",
                             "patient/DocumentReference.rs", "user/DocumentReference.rs", "patient/Patient.rs", "user/Patient.rs",
                             "patient/Binary.r", "user/Binary.r"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code"],
    }
    if auth.issuer:
        doc["issuer"] = auth.issuer
    if auth.jwks_url:
        doc["jwks_uri"] = auth.jwks_url
    if auth.authorization_endpoint:
        doc["authorization_endpoint"] = auth.authorization_endpoint
    if auth.token_endpoint:
        doc["token_endpoint"] = auth.token_endpoint
    return doc
