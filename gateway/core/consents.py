"""Consent records (protocol-free): record, withdraw, list. Every change is audited in the same transaction.

Levels follow the Institute of Medical Illustrators: record < teaching <
publication. A best-interests decision (adult lacking capacity) covers the
record only, so it can only be recorded at level 'record'. Publication consent
names the specific use (purpose_note). A consent is not dated in the future.
Withdrawal takes effect at once for teaching and publication; the photos stay in
the record for care (see gateway/core/policy/rules.py).

record_consent is the one writer: the consent API, a consent captured with an
upload or an import (the ingest pipeline, in the transaction that stores the
photos) and the demo data all record through it, so every consent passes the same
rules (check_consent, which the pipeline also runs before it writes any blob) and
gets the same audit record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core import access_audit, patient_refs
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.policy.rules import AccessContext, filter_except_consent, knows_patient, resolve, scope_context
from gateway.core.refusals import Kind, Refused
from store import audit
from store.audit import AuditEntry
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient
from store.patients import survivor

LEVELS = ("record", "teaching", "publication")
GIVEN_BY = ("patient", "parent", "best-interests")
SCOPES = ("patient", "encounter", "photos")


class ConsentError(ValueError):
    """The consent cannot be recorded or changed as asked; the message says why, `field` which value is at fault
    (a record_consent argument: level, given_by, purpose_note, consent_date, captured_by, ...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConsentNotFound(ConsentError):
    """No consent with that id."""


class PhotoNotFound(ConsentError):
    """No photo with that id (the doors answer 404 as for a hidden photo)."""


def _audit(session: Session, consent: Consent, action: str, actor: str, role: str | None, network: str | None,
           detail: dict[str, Any]) -> None:
    access_audit.append(session, [AuditEntry(
        type_code=audit.PATIENT_RECORD, action=action, subtype="consent", agent_who=actor, agent_role=role,
        agent_network=network, patient_id=consent.patient_id,
        entities=[{"type": "consent", "id": consent.id}, {"type": "patient", "id": consent.patient_id}],
        detail={"level": consent.level, "status": consent.status, "scope": consent.scope, **detail},
    )])


# A consent date is not in the future: "today" is judged by the latest clock on Earth (UTC+14), so a consent
# taken just after midnight in the UK, still "yesterday" in UTC, is never refused for its date.
_LATEST_CLOCK = timedelta(hours=14)


def check_consent(*, level: str, given_by: str, captured_by: str | None, consent_date: date | None = None,
                  scope: str = "patient", purpose_note: str | None = None) -> None:
    """The rules on a consent's own values, without the database; ConsentError names the value at fault.

    record_consent runs them first; the ingest pipeline runs them before it writes any blob, so a request
    that will be refused stores nothing."""
    if level not in LEVELS:
        raise ConsentError(f"unknown consent level {level!r}; use one of {', '.join(LEVELS)}", "level")
    if given_by not in GIVEN_BY:
        raise ConsentError(f"unknown given_by {given_by!r}; use one of {', '.join(GIVEN_BY)}", "given_by")
    if scope not in SCOPES:
        raise ConsentError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}", "scope")
    if given_by == "best-interests" and level != "record":
        # GMC: an adult lacking capacity is photographed for care only; other use needs their own consent later
        raise ConsentError("a best-interests decision covers the record only: level must be 'record'", "given_by")
    if level == "publication" and not (purpose_note or "").strip():
        # the words every door shows: each names the value in its own terms (purposeNote, consent.purpose, ...)
        raise ConsentError("publication consent must name the specific use it is given for (the journal, book or "
                           "course)", "purpose_note")
    if not (captured_by or "").strip():
        raise ConsentError("captured_by is required", "captured_by")
    if len(captured_by or "") > 200:
        raise ConsentError("captured_by may have at most 200 characters", "captured_by")
    if consent_date is not None and consent_date > (datetime.now(timezone.utc) + _LATEST_CLOCK).date():
        raise ConsentError(f"the consent date {consent_date.isoformat()} is in the future", "consent_date")


def record_consent(
    session: Session,
    *,
    patient_id: int,
    level: str,
    given_by: str,
    captured_by: str,
    consent_date: date | None = None,
    scope: str = "patient",
    encounter_id: int | None = None,
    asset_ids: Sequence[str] = (),
    purpose_note: str | None = None,
    actor: str | None = None,
    actor_role: str | None = None,
    actor_network: str | None = None,
) -> Consent:
    """Record a consent inside the caller's write transaction; scope 'photos' links the given photos to it.

    The one consent writer (see the module docstring): the rules of check_consent, the patient through
    merges, the photos of that patient, and the consent's audit record, all in the caller's transaction."""
    check_consent(level=level, given_by=given_by, captured_by=captured_by, consent_date=consent_date, scope=scope,
                  purpose_note=purpose_note)
    patient = session.get(Patient, patient_id)
    if patient is None:
        raise ConsentError(f"no patient {patient_id}", "patient_id")
    patient = survivor(session, patient)
    if scope == "encounter":
        encounter = session.get(Encounter, encounter_id) if encounter_id is not None else None
        if encounter is None or encounter.patient_id != patient.id:
            raise ConsentError("scope 'encounter' needs an encounter of this patient (encounter_id)", "encounter_id")
    elif encounter_id is not None:
        raise ConsentError(f"encounter_id is only for scope 'encounter', not {scope!r}", "encounter_id")
    assets: list[Asset] = []
    if scope == "photos":
        if not asset_ids:
            raise ConsentError("scope 'photos' needs the photos it covers (asset_ids)", "asset_ids")
        asset_ids = list(dict.fromkeys(asset_ids))  # a photo named twice is linked once
        assets = list(session.scalars(select(Asset).where(Asset.id.in_(asset_ids))))
        missing = set(asset_ids) - {a.id for a in assets}
        foreign = [a.id for a in assets if a.patient_id != patient.id]
        if missing or foreign:
            raise ConsentError(f"photos not of this patient: {', '.join(sorted(missing | set(foreign)))}", "asset_ids")
    elif asset_ids:
        raise ConsentError(f"asset_ids are only for scope 'photos', not {scope!r}", "asset_ids")
    consent = Consent(
        patient_id=patient.id, level=level, given_by=given_by, captured_by=captured_by.strip(),
        consent_date=consent_date or datetime.now(timezone.utc).date(), status="active", scope=scope,
        encounter_id=encounter_id, purpose_note=(purpose_note or "").strip() or None,
    )
    session.add(consent)
    session.flush()
    # a link row per photo: the photo keeps the cover of any consent it already had
    # (Asset.consent_id is the consent captured at upload and is not overwritten)
    session.add_all([ConsentAsset(consent_id=consent.id, asset_id=asset.id) for asset in assets])
    session.flush()
    _audit(session, consent, "C", actor or captured_by, actor_role, actor_network,
           {"assets": [a.id for a in assets], "given_by": given_by, "captured_by": consent.captured_by})
    return consent


def withdraw_consent(
    session: Session, consent_id: str, *, withdrawn_by: str, when: datetime | None = None,
    actor_role: str | None = None, actor_network: str | None = None,
) -> Consent:
    """Withdraw a consent at once (teaching and publication use end now; care use of existing photos stays)."""
    consent = session.get(Consent, consent_id, with_for_update=True)
    if consent is None:
        raise ConsentNotFound(f"no consent {consent_id}")
    if consent.status == "withdrawn":
        raise ConsentError(f"consent {consent_id} was already withdrawn")
    consent.status = "withdrawn"
    consent.withdrawn_at = when or datetime.now(timezone.utc)
    session.flush()
    _audit(session, consent, "U", withdrawn_by, actor_role, actor_network, {"withdrawn_at": consent.withdrawn_at.isoformat()})
    return consent


def list_consents(session: Session, patient_id: int, *, include_withdrawn: bool = True) -> list[Consent]:
    """A patient's consents, newest first (the patient as found, i.e. the survivor of any merge)."""
    query = select(Consent).where(Consent.patient_id == patient_id)
    if not include_withdrawn:
        query = query.where(Consent.status == "active")
    return list(session.scalars(query.order_by(Consent.created_at.desc(), Consent.id)))


# ---------------------------------------------------------------------------
# The consent service the doors call: who may handle consents, for which patients, through one writer.


@dataclass(frozen=True)
class ConsentCaller:
    """A caller allowed to handle consents: the resolved request, and how far the scopes reach ('any' patient,
    or only the token's 'patient')."""

    ctx: AccessContext
    reach: str


def caller(gw: Gateway, subject: Subject, perm: str, what: str) -> ConsentCaller:
    """Role and scope, checked before anything is looked up (a refusal reveals nothing about the patient or
    consent named); every refusal audited."""
    ctx = resolve(subject, gw.settings.policy, interaction="read" if perm == "c" else None)
    if subject.role not in gw.settings.policy.consent_roles:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.FORBIDDEN, f"role {subject.role} may not handle consent records"))
    reach = scope_context(subject.scopes, "Consent", perm)
    if reach is None:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.INSUFFICIENT_SCOPE, f"the token's scopes do not allow "
                                                                                  f"'{perm}' on Consent", needs=f"Consent.{perm}"))
    return ConsentCaller(ctx, reach)


def _within_reach(gw: Gateway, who: ConsentCaller, patient_id: int | None, what: str) -> None:
    """A patient/ scope covers only the token's patient (named by public id, or by row id in older tokens); an
    unknown patient is 'another patient' too."""
    if who.reach != "patient":
        return
    token_patient = str(who.ctx.subject.patient or "").removeprefix("Patient/")
    public = None
    if patient_id is not None:
        with gw.db.read() as session:
            public = session.scalar(select(Patient.public_id).where(Patient.id == patient_id))
    if patient_id is None or token_patient not in (str(patient_id), public):
        raise access_audit.refuse(gw, who.ctx, what, Refused(Kind.FORBIDDEN, "the token's patient/ scope is for another patient"),
                                  patient_id=patient_id)


def _find(session: Session, patient: tuple[str, str]) -> Patient | None:
    try:
        return patient_refs.find(session, *patient)
    except patient_refs.BadPatientRef as exc:
        raise Refused(Kind.BAD_REQUEST, f"patient: {exc}") from None


def _patient(gw: Gateway, patient: tuple[str, str]) -> int | None:
    with gw.db.read() as session:
        found = _find(session, patient)
        return found.id if found is not None else None


@dataclass(frozen=True)
class ConsentView:
    """A consent as the doors show it: the patient by public id, the encounter by visit number, the photos it
    names."""

    id: str
    patient: str
    level: str
    given_by: str
    captured_by: str
    consent_date: date | None
    status: str
    withdrawn_at: datetime | None
    scope: str
    encounter: str | None
    purpose_note: str | None
    photos: list[str]


def views(session: Session, consents: Sequence[Consent]) -> list[ConsentView]:
    """Each consent with its patient's public id, its encounter's visit number and its linked photos."""
    if not consents:
        return []
    ids = [c.id for c in consents]
    public = {pid: public_id for pid, public_id in session.execute(
        select(Patient.id, Patient.public_id).where(Patient.id.in_({c.patient_id for c in consents})))}
    visits = {eid: visit for eid, visit in session.execute(
        select(Encounter.id, Encounter.visit_number).where(Encounter.id.in_({c.encounter_id for c in consents if c.encounter_id})))}
    photos: dict[str, list[str]] = {i: [] for i in ids}
    for consent_id, asset_id in session.execute(select(ConsentAsset.consent_id, ConsentAsset.asset_id)
                                                .where(ConsentAsset.consent_id.in_(ids)).order_by(ConsentAsset.asset_id)):
        photos[consent_id].append(asset_id)
    return [ConsentView(
        id=c.id, patient=public[c.patient_id], level=c.level, given_by=c.given_by, captured_by=c.captured_by or "",
        consent_date=c.consent_date, status=c.status, withdrawn_at=c.withdrawn_at, scope=c.scope,
        encounter=visits.get(c.encounter_id) if c.encounter_id else None, purpose_note=c.purpose_note,
        photos=photos[c.id]) for c in consents]


def _view(gw: Gateway, consent: Consent) -> ConsentView:
    with gw.db.read() as session:
        return views(session, [session.get(Consent, consent.id) or consent])[0]


def _encounter_id(gw: Gateway, patient_id: int, visit_number: str | None) -> int | None:
    """The patient's encounter with this visit number (through merges); unknown is INVALID, naming it."""
    if visit_number is None:
        return None
    with gw.db.read() as session:
        for row in session.scalars(select(Encounter).where(Encounter.visit_number == visit_number)):
            owner = session.get(Patient, row.patient_id)
            if owner is not None and survivor(session, owner).id == patient_id:
                return row.id
    raise Refused(Kind.INVALID, f"encounter: this patient has no encounter with visit number {visit_number!r}")


def record(gw: Gateway, who: ConsentCaller, patient: tuple[str, str], *, level: str, given_by: str,
           captured_by: str | None, consent_date: date | None, scope: str, encounter: str | None,
           photos: Sequence[str], purpose_note: str | None, what: str) -> ConsentView:
    """Record a consent for a patient (system, value) the caller's scopes reach; the encounter is named by its visit
    number; photos named must be ones the caller could see once covered (every rule but consent): a hidden photo
    is NOT_FOUND, audited."""
    patient_id = _patient(gw, patient)
    _within_reach(gw, who, patient_id, what)
    if patient_id is None:
        raise Refused(Kind.NOT_FOUND, "patient not found")
    encounter_id = _encounter_id(gw, patient_id, encounter)
    if photos:
        with gw.db.read() as session:
            where = filter_except_consent(who.ctx, gw.settings.policy)
            seen = set(session.scalars(select(Asset.id).where(Asset.id.in_(photos), where)))
        hidden = [p for p in photos if p not in seen]
        if hidden:
            raise access_audit.refuse(gw, who.ctx, what, Refused(
                Kind.NOT_FOUND, f"photo not found: {hidden[0]}", audit_reason=f"photo not visible to the caller: {hidden[0]}"),
                patient_id=patient_id, entities=[{"type": "asset", "id": p} for p in hidden])
    subject = who.ctx.subject
    try:
        with gw.db.write() as session:
            made = record_consent(
                session, patient_id=patient_id, level=level, given_by=given_by, captured_by=captured_by or subject.sub,
                consent_date=consent_date, scope=scope, encounter_id=encounter_id, asset_ids=photos,
                purpose_note=purpose_note, actor=subject.sub, actor_role=subject.role,
                actor_network=access_audit.source_of(subject),
            )
    except ConsentError as exc:
        raise Refused(Kind.INVALID, str(exc)) from None
    return _view(gw, made)


def withdraw(gw: Gateway, who: ConsentCaller, consent_id: str, what: str) -> ConsentView:
    """Withdraw a consent at once; a patient/ token learns nothing of other patients' consents."""
    with gw.db.read() as session:
        found = session.get(Consent, consent_id) if len(consent_id) <= 32 else None
        owner = found.patient_id if found is not None else None
    if who.reach == "patient":
        _within_reach(gw, who, owner, what)  # before "not found"
    if found is None:
        raise Refused(Kind.NOT_FOUND, "consent not found")
    subject = who.ctx.subject
    try:
        with gw.db.write() as session:
            withdrawn = withdraw_consent(session, consent_id, withdrawn_by=subject.sub, actor_role=subject.role,
                                         actor_network=access_audit.source_of(subject))
    except ConsentNotFound:
        raise Refused(Kind.NOT_FOUND, "consent not found") from None
    except ConsentError as exc:
        raise Refused(Kind.CONFLICT, str(exc)) from None
    return _view(gw, withdrawn)


def one(gw: Gateway, who: ConsentCaller, consent_id: str, what: str) -> ConsentView:
    """One consent, for a caller with a need to know its patient; otherwise NOT_FOUND like a missing one."""
    with gw.db.read() as session:
        found = session.get(Consent, consent_id) if len(consent_id) <= 32 else None
        patient_id = found.patient_id if found is not None else None
        known = found is not None and bool(session.scalar(select(knows_patient(who.ctx, gw.settings.policy, found.patient_id))))
        view = views(session, [found])[0] if found is not None and known else None
    if who.reach == "patient":
        _within_reach(gw, who, patient_id, what)
    if view is None:
        reason = "no such consent" if found is None else "no need to know this patient (specialty rule)"
        raise access_audit.refuse(gw, who.ctx, what, Refused(Kind.NOT_FOUND, "consent not found", audit_reason=reason),
                                  patient_id=patient_id)
    access_audit.write(gw, [access_audit.make_entry(
        who.ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="consent", patient_id=patient_id,
        entities=[{"type": "patient", "id": patient_id}, {"type": "consent", "id": consent_id}])])
    return view


def for_patient(gw: Gateway, who: ConsentCaller, patient: tuple[str, str], what: str) -> list[ConsentView]:
    """A patient's consents for a caller with a need to know the patient (the specialty rule, as for photos);
    a patient the caller may not know is NOT_FOUND exactly like an unknown one, the real reason audited."""
    with gw.db.read() as session:
        found = _find(session, patient)
        patient_id = found.id if found is not None else None
        known = patient_id is not None and bool(session.scalar(select(knows_patient(who.ctx, gw.settings.policy, patient_id))))
        consents = views(session, list_consents(session, patient_id)) if known and patient_id is not None else []
    _within_reach(gw, who, patient_id, what)
    if not known or patient_id is None:
        reason = "no such patient" if patient_id is None else "no need to know this patient (specialty rule)"
        raise access_audit.refuse(gw, who.ctx, what, Refused(Kind.NOT_FOUND, "patient not found", audit_reason=reason),
                                  patient_id=patient_id)
    access_audit.write(gw, [access_audit.make_entry(
        who.ctx, type_code=audit.PATIENT_RECORD, action="R", subtype="consent", patient_id=patient_id,
        entities=[{"type": "patient", "id": patient_id}] + [{"type": "consent", "id": c.id} for c in consents])])
    return consents


# ---------------------------------------------------------------------------
# Who else may see a photo: its access list (for V photos) and its sensitivity.
# Kept beside consent because both are governance records set by medical
# illustration staff, and both are audited the same way.

SENSITIVITIES = ("N", "R", "V")


def _audit_asset(session: Session, asset: Asset, action: str, actor: str, role: str | None, network: str | None,
                 detail: dict[str, Any]) -> None:
    access_audit.append(session, [AuditEntry(
        type_code=audit.PATIENT_RECORD, action=action, subtype="access-list" if "subject" in detail else "sensitivity",
        agent_who=actor, agent_role=role, agent_network=network, patient_id=asset.patient_id,
        entities=[{"type": "asset", "id": asset.id}, {"type": "patient", "id": asset.patient_id}], detail=detail,
    )])


def _asset(session: Session, asset_id: str) -> Asset:
    asset = session.get(Asset, asset_id, with_for_update=True)
    if asset is None:
        raise PhotoNotFound(f"no photo {asset_id}")
    return asset


def access_list(session: Session, asset_id: str) -> list[AssetAccess]:
    return list(session.scalars(select(AssetAccess).where(AssetAccess.asset_id == asset_id).order_by(AssetAccess.subject)))


def grant_access(session: Session, asset_id: str, subject: str, *, granted_by: str, actor_role: str | None = None,
                 actor_network: str | None = None) -> bool:
    """Name a person (user sub), or a DICOM peer as ae:AETITLE, on the photo's access list; False if already there."""
    subject = (subject or "").strip()
    if not subject or len(subject) > 200:
        raise ConsentError("the subject to grant must be 1-200 characters")
    asset = _asset(session, asset_id)
    if session.get(AssetAccess, (asset.id, subject)) is not None:
        return False
    session.add(AssetAccess(asset_id=asset.id, subject=subject, granted_by=granted_by))
    session.flush()
    _audit_asset(session, asset, "C", granted_by, actor_role, actor_network, {"subject": subject, "change": "granted"})
    return True


def revoke_access(session: Session, asset_id: str, subject: str, *, revoked_by: str, actor_role: str | None = None,
                  actor_network: str | None = None) -> bool:
    """Take a person off the photo's access list at once; False if they were not on it."""
    asset = _asset(session, asset_id)
    row = session.get(AssetAccess, (asset.id, subject))
    if row is None:
        return False
    session.delete(row)
    session.flush()
    _audit_asset(session, asset, "D", revoked_by, actor_role, actor_network, {"subject": subject, "change": "revoked"})
    return True


def set_sensitivity(session: Session, asset_id: str, sensitivity: str, *, changed_by: str, actor_role: str | None = None,
                    actor_network: str | None = None) -> Asset:
    """Reclassify a photo (N normal, R restricted, V very restricted); effective for every exit at once."""
    if sensitivity not in SENSITIVITIES:
        raise ConsentError(f"unknown sensitivity {sensitivity!r}; use N, R or V")
    asset = _asset(session, asset_id)
    before = asset.sensitivity
    if before != sensitivity:
        asset.sensitivity = sensitivity
        session.flush()
        _audit_asset(session, asset, "U", changed_by, actor_role, actor_network, {"from": before, "to": sensitivity})
    return asset
