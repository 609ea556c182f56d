"""The records officer's reconciliation worklist: photos held in quarantine, released to the right patient or rejected.

With ingest.quarantine_unknown_patients on, a photo naming a patient no feed has registered is stored with status
`quarantined` under a placeholder patient holding only the identifier the sender gave (ingest/pipeline.py,
ingest/dicom_patients.py), and every exit hides it. Here, protocol-free (the CLI is the door):

- held():    the quarantined photos, oldest first, with what an officer reconciles them by: when and from whom each
             came, the identifier the sender gave, body site and specialty. No patient name (a placeholder has none).
- release(): files photos under a registered patient (not a placeholder, not a record merged into another), status
             active, in one transaction with their audit records and their routing, as ingest would have stored them
             for that patient: no encounter (a quarantined photo never had one: ingest refuses an encounter of an
             unregistered patient), its own specialty, the consent captured with it moved to the patient along with
             it. The stored DICOM object is not rewritten: every object is served with the Patient Module the index
             holds now (objects/coerce.py), so it goes out under the new patient's PatientID.
- reject():  marks photos entered-in-error (hidden for good), audited.

Every refusal is a QuarantineError raised before anything is written: nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from gateway.core import patient_refs, routing
from gateway.core.access_audit import fit
from gateway.core.context import Gateway
from gateway.core.ingest.dicom_patients import PLACEHOLDER_SYSTEM, is_placeholder
from gateway.core.patients import Actor
from store import audit
from store.models import Asset, Consent, ConsentAsset, Patient, PatientIdentifier

log = logging.getLogger(__name__)

QUARANTINED = "quarantined"
ACTIVE = "active"
ENTERED_IN_ERROR = "entered-in-error"  # access.ENTERED_IN_ERROR, the status every exit hides for good
MAX_REASON = 1000
MAX_PHOTOS = 500  # photos per release or reject (one transaction, one line each to the operator)


class QuarantineError(ValueError):
    """A request refused as a whole, before anything was written: the text says why, in one line."""


@dataclass(frozen=True)
class HeldPhoto:
    """One quarantined photo as the worklist shows it."""

    id: str
    received_at: datetime
    source: str  # upload, import, dimse, stow
    sender: str | None  # the uploader's user id, or the sending AE title
    identifier: str  # the identifier the sender gave (the placeholder's), as an operator types it
    placeholder: str  # the public id of the patient record it is held under
    body_site: str | None
    laterality: str | None
    specialty: str | None


@dataclass(frozen=True)
class Released:
    id: str
    identifier: str  # the placeholder identifier it was held under
    routed: int  # outbox items queued for it


@dataclass(frozen=True)
class Release:
    patient: str  # the public id of the patient the photos were filed under
    patient_identifier: str  # the reference the officer gave, as normalised
    photos: list[Released]


def identifier_text(ident: PatientIdentifier | None) -> str:
    """A placeholder's identifier as an operator reads and types it: nhs|..., system|..., or a DICOM PatientID with its
    issuer (issuer|PatientID) when the sender's issuer is not the NHS."""
    if ident is None:
        return "-"
    if ident.system == patient_refs.NHS_SYSTEM:
        return f"nhs|{ident.value}"
    if ident.system.startswith(PLACEHOLDER_SYSTEM):
        return f"{ident.system[len(PLACEHOLDER_SYSTEM):] or '?'}|{ident.value} (DICOM issuer|PatientID)"
    return f"{ident.system}|{ident.value}"


def _first_identifiers(session: Session, patient_ids: Sequence[int]) -> dict[int, PatientIdentifier]:
    """Each patient's first identifier. Of a held photo, read on the record it was filed under (filed_patient_id):
    its placeholder, holding the identifier the sender gave, even after an A40 merged the placeholder into a
    registered record and moved the photo there (still held), where the survivor's first identifier is not it."""
    found: dict[int, PatientIdentifier] = {}
    for ident in session.scalars(select(PatientIdentifier).where(PatientIdentifier.patient_id.in_(list(set(patient_ids))))
                                 .order_by(PatientIdentifier.id)):
        found.setdefault(ident.patient_id, ident)
    return found


def held(gw: Gateway, actor: Actor, limit: int = 200) -> list[HeldPhoto]:
    """The quarantined photos, oldest first; the look is on the audit trail (the photos and their patients)."""
    with gw.db.read() as session:
        rows = list(session.execute(
            select(Asset, Patient.public_id).join(Patient, Patient.id == Asset.patient_id)
            .where(Asset.status == QUARANTINED).order_by(Asset.created_at, Asset.id).limit(limit)).tuples())
        idents = _first_identifiers(session, [a.filed_patient_id for a, _ in rows])
        photos = [HeldPhoto(id=a.id, received_at=a.created_at, source=a.source, sender=a.uploaded_by,
                            identifier=identifier_text(idents.get(a.filed_patient_id)), placeholder=public_id,
                            body_site=a.body_site_display or a.body_site_code, laterality=a.laterality,
                            specialty=a.specialty) for a, public_id in rows]
        patient_ids = sorted({a.patient_id for a, _ in rows})
    with gw.db.write() as session:
        audit.append(session, audit.AuditEntry(
            type_code=audit.APPLICATION_ACTIVITY, action="R", subtype="quarantine-list", agent_who=actor.who,
            agent_role=actor.role, agent_network=actor.network,
            entities=[*({"type": "asset", "id": p.id} for p in photos[:MAX_PHOTOS]),
                      *({"type": "patient", "id": i} for i in patient_ids[:MAX_PHOTOS])],
            detail={"returned": len(photos)}))
    return photos


def _reason(reason: str) -> str:
    text = " ".join((reason or "").replace("\x00", " ").split())
    if not text:
        raise QuarantineError("a reason is required (--reason TEXT): it goes on the audit trail with the change")
    return text[:MAX_REASON]


def _held_photos(session: Session, photo_ids: Sequence[str]) -> list[Asset]:
    """The photos named, each quarantined, in the order named (a repeat once); else the first problem, refused."""
    ids = list(dict.fromkeys(p.strip() for p in photo_ids if p.strip()))
    if not ids:
        raise QuarantineError("name at least one photo id (see `clinphoto quarantine list`)")
    if len(ids) > MAX_PHOTOS:
        raise QuarantineError(f"at most {MAX_PHOTOS} photos at a time")
    # locked (PostgreSQL; SQLite's write lock is already ours): a concurrent release or merge waits for this one
    found = {a.id: a for a in session.scalars(select(Asset).where(Asset.id.in_(ids)).with_for_update())}
    for photo_id in ids:
        asset = found.get(photo_id)
        if asset is None:
            raise QuarantineError(f"no photo {photo_id}")
        if asset.status != QUARANTINED:
            raise QuarantineError(f"photo {photo_id} is not quarantined (it is {asset.status})")
    return [found[i] for i in ids]


def _target(session: Session, reference: str) -> tuple[Patient, str]:
    """The registered patient a reference names (system|value in any form the doors accept, or the patient's id from
    `clinphoto patients list`), with the reference as normalised. Not through merges: the officer files photos under
    a record they name, and a record merged into another is refused naming its survivor."""
    reference = (reference or "").strip()
    if "|" in reference:
        try:
            system, value = patient_refs.resolve(session, *patient_refs.parse(reference))
        except patient_refs.BadPatientRef as exc:
            raise QuarantineError(f"--patient: {exc}") from None
        label = f"nhs|{value}" if system == patient_refs.NHS_SYSTEM else f"{system}|{value}"
        patient = session.scalar(select(Patient).join(PatientIdentifier).where(PatientIdentifier.system == system,
                                                                               PatientIdentifier.value == value))
        if patient is None and system != patient_refs.NHS_SYSTEM:
            try:
                patient_refs.check_known_system(session, system)
            except patient_refs.BadPatientRef as exc:
                raise QuarantineError(f"--patient: {exc}") from None
    else:
        label = reference
        patient = session.scalar(select(Patient).where(Patient.public_id == reference)) if 0 < len(reference) <= 32 else None
    if patient is None:
        raise QuarantineError(f"no registered patient {label}")
    # locked as ingest locks the patient it files under: a merge either comes first (refused here) or waits
    session.refresh(patient, with_for_update=True)
    if patient.merged_into_id is not None:
        survivor = session.get_one(Patient, patient.merged_into_id)
        raise QuarantineError(f"patient {label} was merged into patient {survivor.public_id}: name that record")
    if is_placeholder(patient):
        raise QuarantineError(f"patient {label} is a quarantine placeholder (no feed has registered it): "
                              "name a registered patient")
    return patient, label


def release(gw: Gateway, actor: Actor, photo_ids: Sequence[str], patient: str, reason: str) -> Release:
    """File quarantined photos under a registered patient, active, routed and audited, in one transaction."""
    why = _reason(reason)
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        photos = _held_photos(session, photo_ids)
        target, label = _target(session, patient)
        # the patient holds one stored copy of each content (ingest answers a repeat with the photo it has): a held
        # copy of a photo already filed for them is a duplicate to reject, not a second copy to release
        shas = [a.sha256 for a in photos]
        ids = {a.id for a in photos}
        taken = session.scalar(select(Asset.id).where(Asset.patient_id == target.id, Asset.sha256.in_(shas),
                                                      Asset.id.not_in(ids)).limit(1))
        if taken is not None or len(set(shas)) < len(shas):
            raise QuarantineError(f"patient {label} already holds the same image (photo {taken or 'named twice'}): "
                                  "reject the held copy instead")
        holders = {a.id: a.patient_id for a in photos}
        given = {a.id: a.filed_patient_id for a in photos}  # the placeholder each was filed under (a merge moves it)
        idents = _first_identifiers(session, list(given.values()))
        for asset in photos:
            asset.patient_id = target.id
            # filed under the patient as ingest would have filed it: the placeholder was a holding place
            asset.filed_patient_id = target.id
            asset.status = ACTIVE
            asset.updated_at = now
        session.flush()
        moved = _move_captured_consents(session, photos, holders, target.id, now)
        queued = {a.id: routing.enqueue(session, gw.settings.routing, [a], now) for a in photos}
        # The placeholders stay, even with no photo left. They are not registered patients (no exit shows them,
        # ingest holds any further photo naming them, release refuses them as a target), and each is what the
        # audit trail's earlier records name as these photos' patient: the identifier a sender gave. Deleting one
        # would leave those records naming a patient id that no longer resolves to it, and a wrong identifier
        # sent again would simply make a new one. If a feed registers the identifier later, the row becomes that
        # patient's record, as it would have without the release; if a feed adds it to a registered patient, the
        # row is merged into theirs (PatientIndex._fold_placeholders).
        audit.append_many(session, [fit(audit.AuditEntry(
            type_code=audit.IMPORT, action="U", subtype="quarantine-release", outcome=audit.SUCCESS,
            agent_who=actor.who, agent_role=actor.role, agent_network=actor.network, patient_id=target.id,
            entities=[{"type": "asset", "id": a.id, "role": "stored", "sop_instance_uid": a.sop_instance_uid,
                       "study_uid": a.study_uid},
                      {"type": "patient", "id": target.id},
                      {"type": "patient", "id": given[a.id], "role": "placeholder"}],
            detail={"change": "released", "reason": why, "placeholder_patient_id": given[a.id],
                    "placeholder_identifier": identifier_text(idents.get(given[a.id])), "patient_id": target.id,
                    "patient_identifier": label, "status": ACTIVE, "routed": queued[a.id],
                    "consents_moved": moved.get(a.id, [])},
        )) for a in photos])
        result = Release(patient=target.public_id, patient_identifier=label,
                         photos=[Released(a.id, identifier_text(idents.get(given[a.id])), queued[a.id]) for a in photos])
    log.info("released %d photo(s) from quarantine: %s", len(photos), ", ".join(p.id for p in result.photos))
    return result


def _move_captured_consents(session: Session, photos: list[Asset], holders: dict[str, int], target_id: int,
                            now: datetime) -> dict[str, list[str]]:
    """The consent captured with a held photo was recorded under its placeholder (the person photographed, not yet
    known): it moves to the patient with the photos, as ingest would have recorded it under them. Only once none of
    the photos it is linked to is still held under the placeholder: those may yet prove to be someone else's (a
    linked consent covers its photos whoever's record holds it, rules.ConsentCovers, so a release waits for
    nothing). Returns photo id -> the ids of the consents moved with it."""
    links: dict[str, set[str]] = {a.id: {a.consent_id} if a.consent_id else set() for a in photos}
    for consent_id, asset_id in session.execute(select(ConsentAsset.consent_id, ConsentAsset.asset_id)
                                                .where(ConsentAsset.asset_id.in_(list(links)))):
        links[asset_id].add(consent_id)
    wanted = sorted({c for linked in links.values() for c in linked})
    moved: dict[str, list[str]] = {}
    for consent in session.scalars(select(Consent).where(Consent.id.in_(wanted)).with_for_update()):
        if consent.patient_id not in set(holders.values()):
            continue  # already the patient's own (or another record's): not the placeholder's to move
        still_held = session.scalar(
            select(Asset.id).where(Asset.status == QUARANTINED, Asset.patient_id == consent.patient_id,
                                   or_(Asset.consent_id == consent.id,
                                       Asset.id.in_(select(ConsentAsset.asset_id).where(ConsentAsset.consent_id == consent.id))))
            .limit(1))
        if still_held is not None:
            continue
        consent.patient_id = target_id
        consent.updated_at = now
        for photo_id, linked in links.items():
            if consent.id in linked:
                moved.setdefault(photo_id, []).append(consent.id)
    session.flush()
    return moved


def reject(gw: Gateway, actor: Actor, photo_ids: Sequence[str], reason: str) -> list[str]:
    """Mark quarantined photos entered-in-error: out of the record, hidden by every exit for good; audited."""
    why = _reason(reason)
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        photos = _held_photos(session, photo_ids)
        idents = _first_identifiers(session, [a.filed_patient_id for a in photos])
        for asset in photos:
            asset.status = ENTERED_IN_ERROR
            asset.updated_at = now
        session.flush()
        audit.append_many(session, [fit(audit.AuditEntry(
            type_code=audit.IMPORT, action="D", subtype="quarantine-reject", outcome=audit.SUCCESS,
            agent_who=actor.who, agent_role=actor.role, agent_network=actor.network, patient_id=a.patient_id,
            entities=[{"type": "asset", "id": a.id, "role": "stored", "sop_instance_uid": a.sop_instance_uid,
                       "study_uid": a.study_uid},
                      {"type": "patient", "id": a.filed_patient_id, "role": "placeholder"}],
            detail={"change": "rejected", "reason": why, "placeholder_identifier": identifier_text(idents.get(a.filed_patient_id)),
                    "status": ENTERED_IN_ERROR},
        )) for a in photos])
        ids = [a.id for a in photos]
    log.info("rejected %d photo(s) from quarantine: %s", len(ids), ", ".join(ids))
    return ids
