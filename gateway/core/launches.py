"""Viewer launches: who may open the viewer on which patient, as the EPR asks for it.

- A launch link: an EPR, for the signed-in user, asks the API for a link to one patient's photos; the link is
  a random secret (only its SHA-256 is stored), lives `ttl` seconds and opens the viewer once. A second use, or a
  late one, is refused and audited as a security alert (a link that is used twice has leaked).
- IHE Invoke Image Display and a SMART launch resolve the patient (or the study) under the caller's policy.

The viewer door turns a redeemed launch into a browser session; this module knows no HTTP.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from gateway.core import access_audit
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.policy.rules import AccessContext, filter_for
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Asset, LaunchLink

NOT_USABLE = "this launch link is unknown, expired or already used; open the viewer from the patient record again"


@dataclass(frozen=True)
class FirstView:
    """What the viewer shows first (IHE IID's parameters): a date range, one study, the most recent N."""

    lower: datetime | None = None
    upper: datetime | None = None
    study_uid: str | None = None
    most_recent: int | None = None

    def to_json(self) -> str:
        return json.dumps({"lower": self.lower.isoformat() if self.lower else None, "upper": self.upper.isoformat() if self.upper else None,
                           "study_uid": self.study_uid, "most_recent": self.most_recent})

    @classmethod
    def from_json(cls, text: str) -> FirstView:
        raw = json.loads(text or "{}")
        return cls(lower=_moment(raw.get("lower")), upper=_moment(raw.get("upper")), study_uid=raw.get("study_uid"),
                   most_recent=raw.get("most_recent"))


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def subject_to_json(subject: Subject) -> str:
    return json.dumps(asdict(subject))


def subject_from_json(text: str) -> Subject:
    raw: dict[str, Any] = json.loads(text)
    for key in ("specialties", "scopes"):
        raw[key] = tuple(raw.get(key) or ())
    if raw.get("sensitivities") is not None:
        raw["sensitivities"] = tuple(raw["sensitivities"])
    raw["peer"] = None  # launches are for people, never DICOM peers
    return Subject(**raw)


@dataclass(frozen=True)
class Launch:
    subject: Subject
    patient_id: int | None  # None: nobody registered under the reference the launch named
    first: FirstView


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(gw: Gateway, ctx: AccessContext, patient_id: int | None, first: FirstView, ttl_seconds: float) -> str:
    """A new launch link's secret for the caller and a patient they know (the door checked that, audited)."""
    secret = secrets.token_urlsafe(32)
    now = datetime.now(timezone.utc)
    subject = ctx.subject
    with gw.db.write() as session:
        session.add(LaunchLink(key_hash=_hash(secret), subject=subject_to_json(subject), patient_id=patient_id,
                               view=first.to_json(), created_at=now, expires_at=now + timedelta(seconds=ttl_seconds)))
        access_audit.append(session, [access_audit.make_entry(
            ctx, type_code=audit.APPLICATION_ACTIVITY, action="C", subtype="viewer-launch-issued", patient_id=patient_id,
            entities=[{"type": "patient", "id": patient_id}] if patient_id is not None else [],
            detail={"expires_in_seconds": ttl_seconds})])
    return secret


def redeem(gw: Gateway, secret: str, address: str | None) -> Launch:
    """The launch a link names, marked used in the same statement that checks it is unused and in time (two
    browsers racing for one link: one wins). Refused (and audited) otherwise."""
    now = datetime.now(timezone.utc)
    key = _hash(secret)
    with gw.db.write() as session:
        done = session.execute(update(LaunchLink).where(LaunchLink.key_hash == key, LaunchLink.used_at.is_(None),
                                                        LaunchLink.expires_at > now)
                               .values(used_at=now, used_from=(address or "")[:100]))
        row = session.get(LaunchLink, key)
        if cast(CursorResult[Any], done).rowcount == 1 and row is not None:
            return Launch(subject_from_json(row.subject), row.patient_id, FirstView.from_json(row.view))
        why = ("a launch link used again" if row is not None and row.used_at is not None and row.used_at < now else
               "an expired launch link" if row is not None else "an unknown launch link")
        who = json.loads(row.subject).get("sub") if row is not None else None
        patient_id = row.patient_id if row is not None else None
    # the refusal on the trail in a transaction of its own (the one above changed nothing)
    with gw.db.write() as session:
        audit.append(session, audit.AuditEntry(
            type_code=audit.SECURITY_ALERT, action="E", subtype="viewer-launch-refused", outcome=audit.SERIOUS_FAILURE,
            outcome_desc=why, agent_who=who, agent_network=address, patient_id=patient_id, entities=[{"type": "viewer-launch"}]))
    raise Refused(Kind.NOT_FOUND, NOT_USABLE)


def patient_of_study(gw: Gateway, ctx: AccessContext, study_uid: str, what: str) -> int:
    """The patient of a study the caller may see a photo of (IID requestType=STUDY); NOT_FOUND (audited) otherwise."""
    with gw.db.read() as session:
        found = session.scalar(select(Asset.patient_id).where(Asset.study_uid == study_uid, filter_for(ctx, gw.settings.policy)).limit(1))
    if found is None:
        raise access_audit.refuse(gw, ctx, what, Refused(Kind.NOT_FOUND, "study not found"))
    return int(found)
