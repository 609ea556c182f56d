"""The core's views as FHIR R4 resources: Patient, and one photo as Media and as DocumentReference.

Dicts built straight from the rows (the hot path of every search); the tests check each shape with the
fhir.resources R4B models, which would cost ~1 ms a resource here."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from gateway.core.access import PhotoView
from gateway.core.patient_refs import NHS_SYSTEM
from gateway.core.patient_views import PatientView

SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONFIDENTIALITY_DISPLAY = {"N": "normal", "R": "restricted", "V": "very restricted"}
LOINC = "http://loinc.org"
PHOTO_TYPE = {"system": LOINC, "code": "72170-4", "display": "Photographic image"}
MEDIA_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image", "display": "Image"}
# SOP classes as DICOM modality codes (PS3.3: VL Photographic XC, Dermoscopic DMS, Secondary Capture OT)
MODALITY = {
    "1.2.840.10008.5.1.4.1.1.77.1.4": ("XC", "External-camera Photography"),
    "1.2.840.10008.5.1.4.1.1.77.1.7": ("DMS", "Dermoscopy"),
    "1.2.840.10008.5.1.4.1.1.7": ("OT", "Other"),
}
# SNOMED CT laterality values (refinement 272741003 |Laterality|)
LATERALITY = {"left": ("7771000", "Left"), "right": ("24028007", "Right"), "both": ("51440002", "Right and left")}
LATERALITY_ATTRIBUTE = "272741003"
# the photo's status as an R4 EventStatus (Media) and a DocumentReferenceStatus
MEDIA_STATUS = {"active": "completed", "quarantined": "on-hold", "entered-in-error": "entered-in-error"}
DOCUMENT_STATUS = {"active": "current", "quarantined": "current", "entered-in-error": "entered-in-error"}
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown"}


def instant(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in (None, [], {}, "")}


def patient(view: PatientView) -> dict[str, Any]:
    identifiers = []
    for i in view.identifiers:
        ident: dict[str, Any] = {"system": i.system, "value": i.value}
        if i.type_code and i.system != NHS_SYSTEM:
            ident["type"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": i.type_code}]}
        if i.assigner:
            ident["assigner"] = {"display": i.assigner}
        identifiers.append(ident)
    name = _drop_empty({"family": view.family_name, "given": (view.given_names or "").split() or None,
                        "prefix": [view.name_prefix] if view.name_prefix else None, "use": "official"})
    resource = _drop_empty({
        "resourceType": "Patient",
        "id": view.id,
        "identifier": identifiers,
        "active": view.merged_into is None,
        "name": [name] if len(name) > 1 else None,
        "gender": GENDER.get((view.sex or "").upper()),
        "birthDate": view.birth_date.isoformat() if isinstance(view.birth_date, date) else None,
        "deceasedDateTime": instant(view.deceased_at),
    })
    resource["active"] = view.merged_into is None
    if view.merged_into:
        resource["link"] = [{"other": {"reference": f"Patient/{view.merged_into}"}, "type": "replaced-by"}]
    return resource


def body_site(view: PhotoView) -> dict[str, Any] | None:
    a = view.asset
    if not (a.body_site_code or a.body_site_display or a.laterality):
        return None
    side = LATERALITY.get((a.laterality or "").lower())
    text = " ".join(x for x in ((side[1] if side else a.laterality), a.body_site_display) if x) or None
    if a.body_site_code and side:
        # a post-coordinated SNOMED CT expression: the site refined by its laterality
        coding = {"system": SNOMED, "code": f"{a.body_site_code}:{LATERALITY_ATTRIBUTE}={side[0]}"}
    elif a.body_site_code:
        coding = _drop_empty({"system": SNOMED, "code": a.body_site_code, "display": a.body_site_display})
    else:
        return {"text": text}
    return _drop_empty({"coding": [coding], "text": text})


def attachment(view: PhotoView, base: str) -> dict[str, Any]:
    a = view.asset
    size: int | None
    if view.original_allowed and a.original_kept:
        content_type, size, sha1, url = a.media_type, a.size, a.sha1, f"{base}/Binary/{a.id}"
    else:
        # the caller may have the preview only: the attachment describes what its url serves
        content_type, size, sha1, url = "image/jpeg", a.preview_size, a.preview_sha1, f"{base}/Binary/{a.id}?_rendition=preview"
    return _drop_empty({"contentType": content_type, "url": url, "size": size, "hash": sha1, "title": a.original_filename,
                        "creation": instant(a.taken_at)})


def _security(view: PhotoView) -> dict[str, Any]:
    code = view.asset.sensitivity
    return {"system": CONFIDENTIALITY, "code": code, "display": CONFIDENTIALITY_DISPLAY.get(code, code)}


def _encounter(view: PhotoView) -> dict[str, Any] | None:
    if view.encounter is None:
        return None
    system, number = view.encounter
    return {"identifier": _drop_empty({"system": system or None, "value": number}), "display": f"visit {number}"}


def media(view: PhotoView, base: str) -> dict[str, Any]:
    a = view.asset
    modality = MODALITY.get(a.sop_class_uid)
    return _drop_empty({
        "resourceType": "Media",
        "id": a.id,
        "meta": {"security": [_security(view)]},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{a.sop_instance_uid}"}],
        "status": MEDIA_STATUS.get(a.status, "unknown"),
        "type": {"coding": [MEDIA_TYPE]},
        "modality": {"coding": [{"system": DCM, "code": modality[0], "display": modality[1]}]} if modality else None,
        "view": {"text": a.view} if a.view else None,
        "subject": {"reference": f"Patient/{view.patient}"},
        "encounter": _encounter(view),
        "createdDateTime": instant(a.taken_at or a.created_at),
        "issued": instant(a.created_at),
        "operator": {"display": a.photographer} if a.photographer else None,
        "bodySite": body_site(view),
        "deviceName": a.device,
        "height": a.height,
        "width": a.width,
        "content": attachment(view, base),
        "note": [{"text": a.description}] if a.description else None,
    })


def document_reference(view: PhotoView, base: str) -> dict[str, Any]:
    a = view.asset
    context = _drop_empty({
        "encounter": [_encounter(view)] if view.encounter else None,
        "related": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{a.study_uid}"}, "display": "DICOM study"}],
    })
    return _drop_empty({
        "resourceType": "DocumentReference",
        "id": a.id,
        "meta": {"security": [_security(view)]},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{a.sop_instance_uid}"}],
        "status": DOCUMENT_STATUS.get(a.status, "current"),
        "type": {"coding": [PHOTO_TYPE]},
        "category": [{"coding": [{"system": DCM, "code": MODALITY.get(a.sop_class_uid, ("XC", ""))[0]}], "text": "Clinical photograph"}],
        "subject": {"reference": f"Patient/{view.patient}"},
        "date": instant(a.created_at),
        "author": [{"display": a.photographer}] if a.photographer else None,
        "description": a.description,
        "securityLabel": [{"coding": [_security(view)]}],
        "content": [{"attachment": attachment(view, base)}],
        "context": context,
    })


# elements a resource must have (cardinality 1..1): kept whatever _elements asks, as FHIR says servers should
MANDATORY = {"Media": {"status", "content"}, "DocumentReference": {"status", "content"}, "Patient": set()}


def only(resource: dict[str, Any], elements: set[str] | None) -> dict[str, Any]:
    """A search's _elements: the named top-level elements, and the mandatory ones, marked SUBSETTED as FHIR asks."""
    if elements is None:
        return resource
    keep = elements | {"resourceType", "id", "meta"} | MANDATORY.get(resource["resourceType"], set())
    kept = {k: v for k, v in resource.items() if k in keep}
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}]
    kept["meta"] = meta
    return kept


def bundle(entries: list[tuple[dict[str, Any], str]], *, base: str, total: int | None, links: dict[str, str]) -> dict[str, Any]:
    """A searchset: entries are (resource, mode) with mode match or include."""
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        out["total"] = total
    out["link"] = [{"relation": rel, "url": url} for rel, url in links.items()]
    out["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": mode}}
                    for r, mode in entries]
    if not out["entry"]:
        del out["entry"]
    return out
