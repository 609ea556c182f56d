"""Photo search with criteria and keyset paging: what the FHIR door's Media and DocumentReference searches (and
later QIDO-RS and C-FIND) ask of the core.

Every criterion and the policy filter are inside one query, so the total is what this caller may see and a
page is never short because rows were dropped after paging. Pages are cut by keyset (the last row's sort key
and id), not by offset: a photo stored while a client walks the pages never shifts a photo onto two pages
or off all of them, and a deep page costs what the first does.

Protocol-free: criteria are plain values; each door turns its own parameters into them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, func, not_, or_, select
from sqlalchemy.orm import Session

from gateway.core import access_audit, patient_views
from gateway.core.access import SEARCH_SCOPE, PhotoView, require_scope, views_of
from gateway.core.context import Gateway
from gateway.core.criteria import one_of
from gateway.core.patient_views import PatientView
from gateway.core.policy.rules import AccessContext, filter_for, may_see_original
from gateway.core.refusals import Kind, Refused
from store.models import Asset, Patient
from store.patients import survivor

Order = Literal["newest", "oldest"]


@dataclass(frozen=True)
class TimeRange:
    """lower <= taken < upper (either end open when None); `outside` inverts it (FHIR `ne`)."""

    lower: datetime | None = None
    upper: datetime | None = None
    outside: bool = False


@dataclass(frozen=True)
class PhotoCriteria:
    """What to look for; every field narrows (None: not asked). Lists are alternatives (OR), fields combine (AND)."""

    patients: Sequence[int] | None = None  # patient row ids (the door resolves references; merged ones follow)
    ids: Sequence[str] | None = None
    sop_instance_uids: Sequence[str] | None = None
    taken: Sequence[TimeRange] = ()
    body_sites: Sequence[str] | None = None  # SNOMED CT codes
    sop_classes: Sequence[str] | None = None
    views: Sequence[str] | None = None
    encounters: Sequence[int] | None = None
    statuses: Sequence[str] | None = None
    studies: Sequence[str] | None = None  # Study Instance UIDs (a viewer opened for one study)


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: after (or, going back, before) the row with this sort key and id."""

    moment: datetime
    photo_id: str
    backwards: bool = False

    def token(self) -> str:
        raw = json.dumps([self.moment.isoformat(), self.photo_id, int(self.backwards)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Cursor:
        try:
            moment, photo_id, back = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            when = datetime.fromisoformat(moment)
            if not isinstance(photo_id, str) or back not in (0, 1):
                raise ValueError
        except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
            raise Refused(Kind.BAD_REQUEST, "the paging cursor is not one this server gave out") from None
        return cls(when if when.tzinfo else when.replace(tzinfo=timezone.utc), photo_id, bool(back))


@dataclass(frozen=True)
class PhotoPage:
    total: int | None  # None when not asked (count=False)
    photos: list[PhotoView]
    next: Cursor | None  # None on the last page
    previous: Cursor | None  # None on the first page
    patients: dict[int, str] = field(default_factory=dict)  # row id -> public id of the photos' patients
    included: list[PatientView] = field(default_factory=list)  # the photos' patients, when asked (include_patients)


def sort_key() -> ColumnElement[Any]:
    """When the photo was taken, else when stored: FHIR's Media.createdDateTime and DocumentReference.date."""
    return func.coalesce(Asset.taken_at, Asset.created_at)


def _criteria(c: PhotoCriteria) -> list[ColumnElement[bool]]:
    where = one_of([(Asset.patient_id, c.patients), (Asset.id, c.ids), (Asset.sop_instance_uid, c.sop_instance_uids),
                    (Asset.body_site_code, c.body_sites), (Asset.sop_class_uid, c.sop_classes), (Asset.view, c.views),
                    (Asset.encounter_id, c.encounters), (Asset.status, c.statuses), (Asset.study_uid, c.studies)])
    key = sort_key()
    for r in c.taken:
        parts = ([key >= utc(r.lower)] if r.lower is not None else []) + ([key < utc(r.upper)] if r.upper is not None else [])
        if parts:
            inside = and_(*parts)
            where.append(not_(inside) if r.outside else inside)
    return where


def search_photos(
    gw: Gateway,
    ctx: AccessContext,
    criteria: PhotoCriteria,
    *,
    query: str,
    count: int,
    order: Order = "newest",
    cursor: Cursor | None = None,
    with_total: bool = True,
    include_patients: bool = False,
    channel: str = "rest",
) -> PhotoPage:
    """One page of the photos matching the criteria that the caller may see, with the total of them all.

    An empty criteria list is a search over every photo the caller may see (a user/ scope's "all my patients'
    photos" is a search, not a read). Audited as a search with the photos returned, by patient."""
    require_scope(gw, ctx, ctx.resource, SEARCH_SCOPE, query)
    where = [filter_for(ctx, gw.settings.policy), *_criteria(criteria)]
    key = sort_key()
    newest = order == "newest"
    # going back a page reads the rows before the cursor in the opposite order, then turns them round
    forward = cursor is None or not cursor.backwards
    descending = newest == forward
    page_where = list(where)
    if cursor is not None:
        at = utc(cursor.moment)
        after = or_(key < at, and_(key == at, Asset.id < cursor.photo_id)) if descending else \
            or_(key > at, and_(key == at, Asset.id > cursor.photo_id))
        page_where.append(after)
    ordering = (key.desc(), Asset.id.desc()) if descending else (key.asc(), Asset.id.asc())
    # the page with its patients' public ids; on a first page the total rides along as a window count (one
    # statement less: each costs ~0.5 ms of SQLAlchemy beside its SQL); further pages count on their own
    counted = with_total and cursor is None and count > 0
    columns: list[Any] = [Asset, Patient.public_id] + ([func.count().over()] if counted else [])
    page = select(*columns).join(Patient, Patient.id == Asset.patient_id).where(*page_where).order_by(*ordering).limit(count + 1)
    with gw.db.read() as session:
        found = list(session.execute(page).all())
        total: int | None = None
        if counted:
            total = int(found[0][2]) if found else 0
        elif with_total:
            total = session.scalar(select(func.count()).select_from(Asset).where(*where)) or 0
        more = len(found) > count
        found = found[:count]
        if not forward:
            found.reverse()
        rows = [r[0] for r in found]
        public = {r[0].patient_id: r[1] for r in found}
        views = views_of(session, rows, may_see_original(ctx.subject, gw.settings.policy), public)
        patients = {v.asset.patient_id: v.patient for v in views}
        included, include_audit = patient_views.included(session, ctx, list(patients)) if include_patients else ([], [])
        session.expunge_all()
    first, last = (views[0].asset, views[-1].asset) if views else (None, None)
    if forward:
        nxt = _cursor_at(last) if more and last is not None else None
        prev = _cursor_at(first, backwards=True) if cursor is not None and first is not None else None
    else:
        nxt = _cursor_at(last) if last is not None else None
        prev = _cursor_at(first, backwards=True) if more and first is not None else None
    results: dict[int, list[str]] = {}
    for v in views:
        results.setdefault(v.asset.patient_id, []).append(v.asset.id)
    # the search and the patients it includes: one audit transaction (one commit, not two, before the answer)
    access_audit.write(gw, access_audit.search_entries(ctx, query=query, results=results, channel=channel) + include_audit)
    return PhotoPage(total=total, photos=views, next=nxt, previous=prev, patients=patients, included=included)


def utc(moment: datetime) -> datetime:
    # stored times are UTC; SQLite compares them as text, so a bound must be UTC too
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _cursor_at(asset: Asset, backwards: bool = False) -> Cursor:
    moment = asset.taken_at or asset.created_at
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return Cursor(moment, asset.id, backwards)


def live_patients(session: Session, ids: Sequence[int]) -> list[int]:
    """The surviving record of each patient (a merged record's photos moved to its survivor)."""
    out = []
    for patient in session.scalars(select(Patient).where(Patient.id.in_(sorted(set(ids))))):
        live = survivor(session, patient)
        if live is not None:
            out.append(live.id)
    return out
