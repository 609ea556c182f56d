"""Who may see which photo, for what purpose: one set of rules, read two ways.

Each rule is a small predicate tree (the Pred classes below). `sql()` compiles
a tree into a WHERE expression over Asset, using correlated EXISTS for
consents, encounters and the access list so rows are never multiplied and
paging and counts stay right. `test()` evaluates the same tree on one photo's
facts loaded from the store, which gives the per-photo decision and its
reasons. The subject, purpose and settings are folded into constants when the
tree is built, so the SQL only carries what depends on the row.

Every exit (REST, FHIR, C-FIND/C-GET/C-MOVE, QIDO/WADO, viewer, exports) calls
`visible_assets_filter(...)` inside its query, or `decide(...)` for one photo.

The predicates never use NOT, so SQL NULL (an unknown column) behaves exactly
like False in both readings. Do not negate the filter.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy import ColumnElement, DateTime, Exists, Select, and_, bindparam, false, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import SQLCoreOperations

from gateway.core.policy.settings import PURPOSES, PolicySettings
from gateway.core.refusals import Kind, Refused
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient

if TYPE_CHECKING:  # identity reads the policy settings: a run-time import would make the two a cycle
    from gateway.core.identity import Subject

# consent levels (IMI 1-3) that each purpose needs
CARE_PURPOSES = frozenset({"TREAT", "ETREAT"})
LEVELS_FOR_PURPOSE = {
    "TREAT": frozenset({"record", "teaching", "publication"}),
    "ETREAT": frozenset({"record", "teaching", "publication"}),
    "TRAIN": frozenset({"teaching", "publication"}),
    "HRESCH": frozenset({"teaching", "publication"}),
    "PUBLISH": frozenset({"publication"}),
}
BEST_INTERESTS = "best-interests"
CURRENT_ENCOUNTER_STATUS = "in-progress"
AE_PREFIX = "ae:"  # DICOM peers are named on access lists as ae:AETITLE, so an AE title never matches a user's sub
MAX_REASON = 1000  # a break-glass reason is a sentence, not a document (it is copied into audit records)
# The FHIR resource type whose scopes cover photos on this exit (Media, or the wildcard *). Scopes on
# DocumentReference, Binary or ImagingStudy are for the exits that serve those types, not for this one.
PHOTO_RESOURCE = "Media"


@overload
def utc(moment: datetime) -> datetime: ...
@overload
def utc(moment: None) -> None: ...
def utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


# ---------------------------------------------------------------------------
# Facts about one photo, as the per-photo reading needs them


@dataclass
class AssetFacts:
    asset: Any  # an Asset row, or anything with the same attributes
    consents: list[Any] = field(default_factory=list)  # consents of its patient, plus the ones linked to it
    encounters: list[Any] = field(default_factory=list)  # encounters of its patient
    access: set[str] = field(default_factory=set)  # subjects on its access list
    linked: set[str] = field(default_factory=set)  # ids of consents linked to it (consent_assets)
    patient_public_id: str | None = None  # its patient's opaque id (patient/ scopes name the patient by it)


def linked_consents(session: Session, asset_ids: Iterable[str]) -> dict[str, set[str]]:
    """asset id -> ids of the consents linked to it in consent_assets."""
    ids = sorted(set(asset_ids))
    found: dict[str, set[str]] = {a: set() for a in ids}
    if ids:
        for consent_id, asset_id in session.execute(
            select(ConsentAsset.consent_id, ConsentAsset.asset_id).where(ConsentAsset.asset_id.in_(ids))
        ):
            found[asset_id].add(consent_id)
    return found


def load_facts(session: Session, asset: Asset) -> AssetFacts:
    linked = linked_consents(session, [asset.id])[asset.id]
    cond = Consent.patient_id == asset.patient_id
    if linked:
        cond = or_(cond, Consent.id.in_(sorted(linked)))
    consents = session.execute(select(Consent).where(cond)).scalars().all()
    encounters = session.execute(select(Encounter).where(Encounter.patient_id == asset.patient_id)).scalars().all()
    access = set(session.execute(select(AssetAccess.subject).where(AssetAccess.asset_id == asset.id)).scalars())
    public_id = session.scalar(select(Patient.public_id).where(Patient.id == asset.patient_id))
    return AssetFacts(asset=asset, consents=list(consents), encounters=list(encounters), access=access, linked=linked,
                      patient_public_id=public_id)


# ---------------------------------------------------------------------------
# Predicates: each class holds its SQL and its Python reading side by side


class Pred:
    def sql(self, a: Any) -> ColumnElement[bool]:  # a: Asset or an alias of it
        raise NotImplementedError

    def test(self, facts: AssetFacts) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Const(Pred):
    value: bool

    def sql(self, a: Any) -> ColumnElement[bool]:
        return true() if self.value else false()

    def test(self, facts: AssetFacts) -> bool:
        return self.value


TRUE, FALSE = Const(True), Const(False)


@dataclass(frozen=True)
class AssetIn(Pred):
    """The photo's column is one of the values (NULL is never in)."""

    column: str
    values: frozenset[Any]

    def sql(self, a: Any) -> ColumnElement[bool]:
        col: ColumnElement[Any] = getattr(a, self.column)
        values = sorted(self.values)
        return col == values[0] if len(values) == 1 else col.in_(values)

    def test(self, facts: AssetFacts) -> bool:
        value = getattr(facts.asset, self.column)
        return value is not None and value in self.values


@dataclass(frozen=True)
class AllOf(Pred):
    parts: tuple[Pred, ...]

    def sql(self, a: Any) -> ColumnElement[bool]:
        return and_(*(p.sql(a) for p in self.parts))

    def test(self, facts: AssetFacts) -> bool:
        return all(p.test(facts) for p in self.parts)


@dataclass(frozen=True)
class AnyOf(Pred):
    parts: tuple[Pred, ...]

    def sql(self, a: Any) -> ColumnElement[bool]:
        return or_(*(p.sql(a) for p in self.parts))

    def test(self, facts: AssetFacts) -> bool:
        return any(p.test(facts) for p in self.parts)


def asset_in(column: str, values: Iterable[Any]) -> Pred:
    values = frozenset(v for v in values if v is not None)
    return AssetIn(column, values) if values else FALSE


def all_of(*parts: Pred) -> Pred:
    if any(p == FALSE for p in parts):
        return FALSE
    kept = tuple(p for p in parts if p != TRUE)
    return TRUE if not kept else kept[0] if len(kept) == 1 else AllOf(kept)


def any_of(*parts: Pred) -> Pred:
    if any(p == TRUE for p in parts):
        return TRUE
    kept = tuple(p for p in parts if p != FALSE)
    return FALSE if not kept else kept[0] if len(kept) == 1 else AnyOf(kept)


@dataclass(frozen=True)
class ConsentCovers(Pred):
    """A consent of a fitting level applies to the photo.

    A consent applies when it is linked to the photo in consent_assets (a
    photo-scoped consent, or the one captured with the photo at upload), or it
    is of the photo's patient with scope 'patient', or with scope 'encounter'
    naming the photo's encounter. A photo may carry several linked consents;
    each covers it on its own. For care (TREAT/ETREAT) a withdrawn consent
    still covers photos stored before the withdrawal: withdrawal ends
    secondary use, not the record. For secondary use it must be active and not a best-interests
    decision (that covers the record only).
    """

    levels: frozenset[str]
    care: bool

    def sql(self, a: Any) -> ColumnElement[bool]:
        # Two EXISTS, one per way a consent applies, so each walks its own index
        # (consent_assets by asset, consents by patient); one EXISTS with an OR inside
        # made the planners scan every consent for every photo.
        c = Consent
        fits: list[ColumnElement[bool]] = [c.level.in_(sorted(self.levels))]
        if self.care:
            fits.append(or_(c.status == "active", and_(c.status == "withdrawn", c.withdrawn_at > a.created_at)))
        else:
            fits.append(and_(c.status == "active", c.given_by != BEST_INTERESTS))
        linked = (
            select(ConsentAsset.consent_id)
            .join(c, c.id == ConsentAsset.consent_id)
            .where(ConsentAsset.asset_id == a.id, *fits)
            .exists()
        )
        of_patient = (
            select(c.id)
            .where(
                c.patient_id == a.patient_id,
                or_(c.scope == "patient", and_(c.scope == "encounter", c.encounter_id == a.encounter_id)),
                *fits,
            )
            .exists()
        )
        return or_(linked, of_patient)

    @staticmethod
    def applies(consent: Consent, asset: Asset, linked: set[str] | frozenset[str]) -> bool:
        if consent.id in linked:
            return True
        if consent.patient_id != asset.patient_id:
            return False
        if consent.scope == "patient":
            return True
        return consent.scope == "encounter" and consent.encounter_id is not None and consent.encounter_id == asset.encounter_id

    def stands(self, consent: Consent, asset: Asset) -> bool:
        if self.care:
            if consent.status == "active":
                return True
            withdrawn_at, created_at = utc(consent.withdrawn_at), utc(asset.created_at)
            return consent.status == "withdrawn" and withdrawn_at is not None and created_at is not None and withdrawn_at > created_at
        return consent.status == "active" and consent.given_by is not None and consent.given_by != BEST_INTERESTS

    def covering(self, facts: AssetFacts) -> list[Consent]:
        return [
            c for c in facts.consents
            if self.applies(c, facts.asset, facts.linked) and c.level in self.levels and self.stands(c, facts.asset)
        ]

    def test(self, facts: AssetFacts) -> bool:
        return bool(self.covering(facts))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _probe(query: Select[Any]) -> Exists:
    """EXISTS that PostgreSQL runs as an index probe per candidate photo, under any plan.

    PostgreSQL may turn a correlated EXISTS into a hashed subplan that first reads the whole table
    (a sequential scan of asset_access, or of every current encounter). psycopg prepares a statement
    after five runs and the server then settles on a generic plan; on bench/policy_query.py's store of
    200k photos that plan hashed all 3,840 rows of asset_access for every patient list (1.9 ms, against
    0.66 ms with the probe on 1M photos), and the cost grows with the table. An OFFSET in the subquery
    is the one thing that stops the planner from considering the hashed form (it then only probes the
    primary key or the patient index), whatever the parameters or the plan cache decide. Chosen over
    an index (a hash over one subject's grants still grows with the store) and over custom plans
    (planning this query costs more than running it). The whole-store count, where hashing would pay,
    is no reader's path."""
    return query.offset(0).exists()


@dataclass(frozen=True)
class CurrentEncounterIn(Pred):
    """The photo's patient has a current encounter (in progress, not discharged) in one of the specialties."""

    specialties: frozenset[str]
    # None: the moment the statement runs (a bound parameter evaluated at execution), so a cached
    # filter never freezes the time at which it was built
    now: datetime | None

    def sql(self, a: Any) -> ColumnElement[bool]:
        # an alias of its own: a query over encounters (the worklist) must not see this probe correlate with its
        # own rows (it then asked whether any current encounter of the specialty existed at all)
        e = aliased(Encounter)
        moment: Any = self.now if self.now is not None else bindparam(
            "policy_now", type_=DateTime(timezone=True), callable_=_utcnow, unique=True)
        return _probe(select(e.id).where(
            e.patient_id == a.patient_id,
            e.specialty.in_(sorted(self.specialties)),
            e.status == CURRENT_ENCOUNTER_STATUS,
            or_(e.discharged_at.is_(None), e.discharged_at > moment),
        ))

    def test(self, facts: AssetFacts) -> bool:
        now = utc(self.now) if self.now is not None else _utcnow()
        return any(
            e.patient_id == facts.asset.patient_id
            and e.specialty is not None
            and e.specialty in self.specialties
            and e.status == CURRENT_ENCOUNTER_STATUS
            and (e.discharged_at is None or utc(e.discharged_at) > now)
            for e in facts.encounters
        )


@dataclass(frozen=True)
class OnAccessList(Pred):
    subject: str

    def sql(self, a: Any) -> ColumnElement[bool]:
        return _probe(select(AssetAccess.asset_id).where(AssetAccess.asset_id == a.id, AssetAccess.subject == self.subject))

    def test(self, facts: AssetFacts) -> bool:
        return self.subject in facts.access


# ---------------------------------------------------------------------------
# The request: subject + purpose + break-glass, resolved once


@dataclass(frozen=True)
class AccessContext:
    subject: Subject
    purpose: str
    break_glass_reason: str | None
    breaking_glass: bool  # a valid break-glass: ETREAT, a reason, a role allowed to
    refusal: str | None  # why the request as a whole cannot see anything
    refusal_kind: Kind | None  # BAD_REQUEST or FORBIDDEN
    # True: the request itself is refused (malformed, or a break-glass not allowed): the door answers it at once;
    # False with a refusal: the role may not act for this purpose and sees nothing
    refuse_request: bool
    now: datetime
    interaction: str | None = None  # "read" or "search": which SMART permission the scopes must grant; None: either
    # the resource type the photo is asked for as (a FHIR door serves one photo as Media, DocumentReference and
    # Binary): which type the scopes must grant it on
    resource: str = "Media"


def resolve(subject: Subject, settings: PolicySettings, purpose: str | None = None, break_glass: str | None = None,
            now: datetime | None = None, interaction: str | None = None, resource: str = "Media") -> AccessContext:
    purpose = (purpose or getattr(subject, "purpose_of_use", None) or "TREAT").strip().upper()
    reason = (break_glass if break_glass is not None else getattr(subject, "break_glass_reason", None)) or ""
    reason = reason.strip() or None
    now = utc(now) if now is not None else datetime.now(timezone.utc)
    # refuse_request: the request is malformed or a break-glass is not allowed (refused at the door, audited);
    # otherwise the role may not act for this purpose (nothing is visible).
    refusal, kind, whole_request = None, None, False
    allowed = settings.role_purposes.get(subject.role, [])
    if purpose not in PURPOSES:
        refusal, kind, whole_request = f"unknown purpose of use {purpose!r}; use one of {', '.join(PURPOSES)}", Kind.BAD_REQUEST, True
    elif reason is not None and len(reason) > MAX_REASON:
        refusal, kind, whole_request = f"the break-glass reason is longer than {MAX_REASON} characters", Kind.BAD_REQUEST, True
    elif purpose == "ETREAT" and reason is None:
        refusal, kind, whole_request = ("purpose ETREAT is break-glass and needs a reason (X-Break-Glass header)",
                                        Kind.FORBIDDEN, True)
    elif reason is not None and purpose != "ETREAT":
        refusal, kind, whole_request = f"break-glass is only allowed with purpose ETREAT, not {purpose}", Kind.BAD_REQUEST, True
    elif reason is not None and subject.role not in settings.break_glass_roles:
        refusal, kind, whole_request = f"role {subject.role} may not break the glass", Kind.FORBIDDEN, True
    elif purpose not in allowed:
        refusal, kind = f"role {subject.role} may not act for purpose {purpose}" + (
            f" (allowed: {', '.join(allowed)})" if allowed else " (this role sees no clinical photos)"
        ), Kind.FORBIDDEN
    return AccessContext(
        subject=subject,
        purpose=purpose,
        break_glass_reason=reason,
        breaking_glass=refusal is None and reason is not None,
        refusal=refusal,
        refusal_kind=kind,
        refuse_request=whole_request,
        now=now,
        interaction=interaction,
        resource=resource,
    )


def check_request(ctx: AccessContext) -> None:
    """Raise Refused when the request as a whole is refused, or the role may not act for the purpose at all."""
    if ctx.refusal:
        raise Refused(ctx.refusal_kind or Kind.FORBIDDEN, ctx.refusal)


# ---------------------------------------------------------------------------
# SMART v2 scopes: they only narrow what the policy allows

_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([cruds]+|read|write|\*)(\?.*)?$")
_V1_PERMS = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Scope:
    context: str  # patient, user or system
    resource: str  # a FHIR resource type or *
    perms: frozenset[str]  # SMART v2 letters c r u d s


def parse_scope(text: str) -> Scope | None:
    """One SMART scope, or None when it grants nothing here.

    A scope with a query part (`user/Media.rs?security-label=N`) is skipped: we do not enforce
    those finer-grained limits, and SMART v2 lets a server ignore such a scope only by granting
    less, never by treating it as the wider scope without the query."""
    match = _SCOPE.match(text.strip())
    if not match:
        return None
    context, resource, perms, query = match.groups()
    if query is not None:
        return None
    return Scope(context, resource, frozenset(_V1_PERMS.get(perms, perms)))


def scope_context(scopes: Sequence[str], resource: str, perm: str) -> str | None:
    """'any' when a user/ or system/ scope grants `perm` (one of c r u d s) on `resource`,
    'patient' when only patient/ scopes do (the token's patient bounds it), None when none does."""
    found = None
    for text in scopes:
        scope = parse_scope(text)
        if scope is None or scope.resource not in (resource, "*") or perm not in scope.perms:
            continue
        if scope.context != "patient":
            return "any"
        found = "patient"
    return found


@dataclass(frozen=True)
class ScopeGrant:
    any_patient: bool  # a user/ or system/ scope grants reading photos
    patient_only: bool  # only patient/ scopes do (then the token's patient bounds everything)


def read_grant(scopes: Sequence[str], interaction: str | None = None, resource: str = PHOTO_RESOURCE) -> ScopeGrant:
    """Which patients the scopes let the caller read photos of, as `resource` (Media by default). interaction
    'read' needs r, 'search' needs s (SMART v2); None accepts either. v1 `read` and `*` grant both."""
    letters = {"read": "r", "search": "s"}.get(interaction or "", "rs")
    contexts = {scope_context(scopes, resource, letter) for letter in letters}
    any_patient = "any" in contexts
    return ScopeGrant(any_patient=any_patient, patient_only="patient" in contexts and not any_patient)


def scope_allows(scopes: Sequence[str], resource: str, perm: str) -> bool:
    """Does any scope grant `perm` (one of c r u d s) on `resource`? (e.g. uploads check ('Media', 'c'))."""
    return scope_context(scopes, resource, perm) is not None


# ---------------------------------------------------------------------------
# The rules


@dataclass(frozen=True)
class Rule:
    name: str
    pred: Pred
    ok: str
    denied: str


def access_list_name(subject: Subject) -> str:
    """How the subject is named on access lists and as a photo's uploader: a DICOM peer as ae:AETITLE, anyone
    else (a user, a backend service with a token) by their token sub."""
    return f"{AE_PREFIX}{subject.peer.ae_title}" if subject.peer is not None else subject.sub


@dataclass(frozen=True)
class OfPatient(Pred):
    """The photo is of the patient a token names: by opaque public id (what a SMART launch puts in the token,
    the FHIR Patient id), or by row id (tokens minted before patients had public ids)."""

    named: str

    def sql(self, a: Any) -> ColumnElement[bool]:
        # never correlated with a patients table in the outer query (a page selects the photos' public ids too)
        by_public = a.patient_id == select(Patient.id).where(Patient.public_id == self.named).correlate(None).scalar_subquery()
        return or_(by_public, a.patient_id == int(self.named)) if self.named.isdigit() else by_public

    def test(self, facts: AssetFacts) -> bool:
        return self.named in (facts.patient_public_id, str(facts.asset.patient_id))


def _named_patient(patient: str | None) -> str | None:
    text = str(patient).strip().removeprefix("Patient/") if patient is not None else ""
    return text or None


def build_rules(ctx: AccessContext, settings: PolicySettings, *, now_at_run: bool = False) -> list[Rule]:
    """The rules for a resolved request. now_at_run: the current-encounter rule compares with the moment its SQL
    runs, not ctx.now (a filter built once and cached, see filter_for)."""
    s = ctx.subject
    rules: list[Rule] = []

    # 1. the request itself (purpose allowed for the role, break-glass well-formed)
    rules.append(Rule("purpose", FALSE if ctx.refusal else TRUE, f"role {s.role} may act for {ctx.purpose}", ctx.refusal or ""))

    # 2. only photos in a visible status
    rules.append(
        Rule(
            "status",
            asset_in("status", settings.visible_statuses),
            "the photo is in a visible status",
            f"the photo's status is not one of {', '.join(settings.visible_statuses)}",
        )
    )

    # 3. SMART scopes narrow
    grant = read_grant(s.scopes or (), ctx.interaction, ctx.resource)
    patient = _named_patient(s.patient)
    if grant.any_patient:
        rules.append(Rule("scope", TRUE, "a user/ or system/ scope grants reading photos", ""))
    elif grant.patient_only and patient is not None:
        rules.append(Rule("scope", OfPatient(patient), f"patient/ scope, photo of the patient in context ({patient})",
                          f"patient/ scope allows only patient {patient}"))
    elif grant.patient_only:
        rules.append(Rule("scope", FALSE, "", "patient/ scope without a patient in the token"))
    else:
        what = {"read": "reading", "search": "searching"}.get(ctx.interaction or "", "reading")
        rules.append(Rule("scope", FALSE, "", f"no SMART scope grants {what} photos (Media)"))

    # 4. consent fitting the purpose
    levels = LEVELS_FOR_PURPOSE.get(ctx.purpose, frozenset())
    care = ctx.purpose in CARE_PURPOSES
    if care and settings.treat_without_consent:
        rules.append(Rule("consent", TRUE, "clinical exemption: care needs no recorded consent (treat_without_consent)", ""))
    else:
        need = "/".join(sorted(levels)) or "none"
        rules.append(
            Rule(
                "consent",
                ConsentCovers(levels, care) if levels else FALSE,
                f"a consent ({need}) covers the photo for {ctx.purpose}",
                (
                    "no consent covers the photo for care (a withdrawn consent covers only photos stored before its withdrawal)"
                    if care
                    else f"no active {need} consent (not a best-interests decision) covers the photo for {ctx.purpose}"
                ),
            )
        )

    # 5. sensitivity by role; V only the uploader and the access list
    own = getattr(s, "sensitivities", None)
    visible = set(own if own is not None else settings.role_sensitivities.get(s.role, []))
    if ctx.breaking_glass:
        visible |= {"N", "R"}
    sensitivity_parts = [asset_in("sensitivity", visible & {"N", "R"})]
    listed_as = access_list_name(s)
    if ctx.breaking_glass and settings.break_glass_allows_very_restricted:
        sensitivity_parts.append(asset_in("sensitivity", ["V"]))
        v_text = "V opened by break-glass"
    else:
        sensitivity_parts.append(
            all_of(asset_in("sensitivity", ["V"]), any_of(asset_in("uploaded_by", [listed_as]), OnAccessList(listed_as)))
        )
        v_text = "V only for its uploader and the people on its access list"
    rules.append(
        Rule(
            "sensitivity",
            any_of(*sensitivity_parts),
            f"sensitivity allowed (role {s.role} sees {'/'.join(sorted(visible)) or 'no N/R'}; {v_text})",
            f"sensitivity not allowed (role {s.role} sees {'/'.join(sorted(visible)) or 'no N/R'}; {v_text})",
        )
    )

    # 6. need to know: the specialty rule
    bound = s.role in settings.specialty_rule_roles or (s.role == "system" and bool(s.specialties))
    if not bound:
        rules.append(Rule("specialty", TRUE, f"role {s.role} is not bound by the specialty rule", ""))
    elif ctx.breaking_glass:
        rules.append(Rule("specialty", TRUE, f"break-glass lifts the specialty rule (reason: {ctx.break_glass_reason})", ""))
    else:
        specs = frozenset(s.specialties)
        branches = [asset_in("sensitivity", ["V"]), asset_in("specialty", specs)]
        by_encounter = settings.specialty_match == "photo-or-encounter"
        if by_encounter and specs:
            branches.append(all_of(asset_in("sensitivity", ["N"]), CurrentEncounterIn(specs, None if now_at_run else ctx.now)))
        mine = ", ".join(sorted(specs)) or "none"
        rules.append(
            Rule(
                "specialty",
                any_of(*branches),
                f"specialty matches (yours: {mine})",
                "no specialty match: the photo's specialty"
                + (" (or, for N photos, a current encounter's specialty)" if by_encounter else "")
                + f" is not one of yours ({mine})",
            )
        )
    return rules


# ---------------------------------------------------------------------------
# The two readings


def visible_assets_filter(
    subject: Subject,
    *,
    settings: PolicySettings,
    purpose: str | None = None,
    break_glass: str | None = None,
    now: datetime | None = None,
    interaction: str | None = None,
    asset: Any = Asset,
) -> ColumnElement[bool]:
    """WHERE clause for `select(Asset)` (or an alias passed as `asset`) keeping only photos the subject may see.

    interaction: "search" (lists, C-FIND, QIDO) or "read" (one photo, retrieve) picks the SMART permission
    the scopes must grant; None accepts either."""
    ctx = resolve(subject, settings, purpose, break_glass, now, interaction)
    return filter_for(ctx, settings, asset)


def filter_for(ctx: AccessContext, settings: PolicySettings, asset: Any = Asset, *, skip: Iterable[str] = ()) -> ColumnElement[bool]:
    """The rules as one WHERE clause; `skip` leaves out rules by name (see filter_except_consent).

    Built once per subject, purpose and settings and then reused (FILTERS): building it cost ~470 us a call
    and a fresh expression also made SQLAlchemy walk it for a new cache key (~700 us more over a list's
    two statements), about 30 % of a patient's photo list. A request resolved for the current time gets
    the cached filter, whose current-encounter rule takes the time at which each statement runs (a bound
    parameter evaluated at execution), so caching never freezes it; a request for another time (ctx.now
    more than NOW_SLACK away, as tests ask), or over an alias of Asset, is built afresh."""
    skip = frozenset(skip)
    if asset is not Asset or abs(_utcnow() - ctx.now) > NOW_SLACK:
        return _build_filter(ctx, settings, asset, skip, now_at_run=False)
    key = _filter_key(ctx, settings, skip)
    found = FILTERS.get(key)
    if found is None:
        found = FILTERS.put(key, _build_filter(ctx, settings, Asset, skip, now_at_run=True))
    return found


def _build_filter(ctx: AccessContext, settings: PolicySettings, asset: Any, skip: frozenset[str], *,
                  now_at_run: bool) -> ColumnElement[bool]:
    return all_of(*(r.pred for r in build_rules(ctx, settings, now_at_run=now_at_run) if r.name not in skip)).sql(asset)


NOW_SLACK = timedelta(seconds=2)  # a request resolved this close to now is a request for the current time


def _filter_key(ctx: AccessContext, settings: PolicySettings, skip: frozenset[str]) -> Hashable:
    """Everything build_rules reads, and nothing else (the time is bound at execution, see filter_for)."""
    s = ctx.subject
    return (
        skip, ctx.purpose, ctx.breaking_glass, bool(ctx.refusal), ctx.interaction, ctx.resource,
        s.role, s.sub, tuple(s.scopes or ()), s.patient, tuple(s.specialties), getattr(s, "sensitivities", None),
        # how the subject is named on access lists: a DICOM peer as ae:TITLE, a token's subject by its sub (the same
        # sub and role on both shared one filter, and the peer's access list was read under the bare name)
        access_list_name(s),
        # the settings' values, not the object: a setting changed in place must not serve an old filter
        tuple(settings.visible_statuses), settings.treat_without_consent, tuple(settings.role_sensitivities.get(s.role, [])),
        settings.break_glass_allows_very_restricted, tuple(settings.specialty_rule_roles), settings.specialty_match,
    )


class FilterCache:
    """A bounded least-recently-used map of built filters, shared by the threads of the process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, ColumnElement[bool]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> ColumnElement[bool] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Hashable, where: ColumnElement[bool]) -> ColumnElement[bool]:
        with self._lock:
            self._entries[key] = where
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return where

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


# one entry per (subject, purpose, ...) in use: a few KB each; 1,024 covers a busy hospital's active users
FILTERS = FilterCache(1024)


def filter_except_consent(ctx: AccessContext, settings: PolicySettings, asset: Any = Asset) -> ColumnElement[bool]:
    """Every rule but the consent rule: which photos the caller could see once a consent covers them.
    Recording a photo-scoped consent needs this, since a photo without consent is hidden by the consent rule."""
    return filter_for(ctx, settings, asset, skip=("consent",))


def governance_filter(ctx: AccessContext, settings: PolicySettings, asset: Any = Asset) -> ColumnElement[bool]:
    """The photos a governance role may manage (sensitivity, access list): every rule but consent and
    sensitivity, since staff reclassify and open up very restricted photos they cannot see themselves."""
    return filter_for(ctx, settings, asset, skip=("consent", "sensitivity"))


def knows_patient(ctx: AccessContext, settings: PolicySettings, patient_id: SQLCoreOperations[int] | int) -> ColumnElement[bool]:
    """Need to know a patient's records beyond photos (consents): the specialty rule read per patient.

    True when the caller is not bound by the specialty rule (or breaks the glass), when the patient has a
    current encounter in one of the caller's specialties, or when the caller could see a photo of the patient
    by every rule but consent and scopes (consent is what such records govern; the door checks the scopes of
    the resource it serves). `patient_id` is the patient id column or value the query is about."""
    if ctx.refusal:
        return false()
    s = ctx.subject
    bound = s.role in settings.specialty_rule_roles or (s.role == "system" and bool(s.specialties))
    if not bound or ctx.breaking_glass:
        return true()
    # an alias of its own, for the same reason as CurrentEncounterIn's, when the outer query is over photos
    other = aliased(Asset)
    photo = select(other.id).where(other.patient_id == patient_id, filter_for(ctx, settings, other, skip=("consent", "scope")))
    specs = frozenset(s.specialties)
    if not specs:
        return photo.exists()
    caring = CurrentEncounterIn(specs, ctx.now).sql(_PatientOf(patient_id))
    return or_(photo.exists(), caring)


@dataclass(frozen=True)
class _PatientOf:
    """Stands in for an Asset row where a predicate only reads the patient (CurrentEncounterIn)."""

    patient_id: Any


@dataclass
class Decision:
    permit: bool
    reasons: list[str]
    denied_by: list[str]
    purpose: str
    break_glass: bool

    def __bool__(self) -> bool:
        return self.permit


def decide_facts(ctx: AccessContext, settings: PolicySettings, facts: AssetFacts) -> Decision:
    reasons, denied_by = [], []
    for rule in build_rules(ctx, settings):
        if rule.pred.test(facts):
            text = rule.ok
            if isinstance(rule.pred, ConsentCovers):
                ids = ", ".join(f"{c.id} ({c.level}, {c.status})" for c in rule.pred.covering(facts))
                text += f": {ids}"
            reasons.append(f"{rule.name}: {text}")
        else:
            denied_by.append(rule.name)
            reasons.append(f"{rule.name}: DENIED - {rule.denied}")
    return Decision(permit=not denied_by, reasons=reasons, denied_by=denied_by, purpose=ctx.purpose, break_glass=ctx.breaking_glass)


def decide(
    session: Session,
    subject: Subject,
    asset: Asset | str,
    *,
    settings: PolicySettings,
    purpose: str | None = None,
    break_glass: str | None = None,
    now: datetime | None = None,
    interaction: str | None = None,
) -> Decision:
    """The decision on one photo with the reason of every rule. An unknown id is denied like a hidden photo."""
    return decide_in(session, resolve(subject, settings, purpose, break_glass, now, interaction), settings, asset)


def decide_in(session: Session, ctx: AccessContext, settings: PolicySettings, asset: Asset | str) -> Decision:
    """decide() for an already resolved request."""
    if isinstance(asset, str):
        row = session.get(Asset, asset)
        if row is None:
            return Decision(False, [f"photo {asset}: no such photo"], ["exists"], ctx.purpose, ctx.breaking_glass)
        asset = row
    return decide_facts(ctx, settings, load_facts(session, asset))


def uncovered_for_care(session: Session, settings: PolicySettings, asset_ids: Iterable[str]) -> set[str]:
    """Photos that no consent covers for care (the same consent rule as every query): nobody sees
    them for TREAT until a consent is recorded, unless the clinical exemption is on."""
    asset_ids = list(asset_ids)
    if settings.treat_without_consent or not asset_ids:
        return set()
    covered = ConsentCovers(LEVELS_FOR_PURPOSE["TREAT"], care=True).sql(Asset)
    found = session.execute(select(Asset.id).where(Asset.id.in_(asset_ids), covered)).scalars()
    return set(asset_ids) - set(found)


def may_see_original(subject: Subject, settings: PolicySettings) -> bool:
    return subject.role in settings.original_roles


_LEVEL_RANK = {"record": 1, "teaching": 2, "publication": 3}


@dataclass(frozen=True)
class ConsentSummary:
    """The consent shown beside a photo."""

    id: str
    level: str
    status: str
    given_by: str | None


def consent_summary(asset: Asset, consents: Iterable[Consent], linked: frozenset[str] | set[str] = frozenset()) -> ConsentSummary | None:
    """The strongest consent applying to a photo, for display; active ones first.
    linked: ids of the consents linked to the photo (linked_consents())."""
    applying = [c for c in consents if ConsentCovers.applies(c, asset, linked)]
    if not applying:
        return None
    best = max(applying, key=lambda c: (c.status == "active", _LEVEL_RANK.get(c.level, 0)))
    return ConsentSummary(id=best.id, level=best.level, status=best.status, given_by=best.given_by)


def care_only(asset: Asset, consents: Iterable[Consent], linked: frozenset[str] | set[str] = frozenset()) -> bool:
    """The photo was consented for teaching (or more) and that consent was withdrawn, with no other active consent
    for teaching left: it stays in the record for care, and viewers mark it care-only."""
    applying = [c for c in consents if ConsentCovers.applies(c, asset, linked)]
    withdrawn = any(c.status == "withdrawn" and _LEVEL_RANK.get(c.level, 0) >= _LEVEL_RANK["teaching"] for c in applying)
    still = any(c.status == "active" and _LEVEL_RANK.get(c.level, 0) >= _LEVEL_RANK["teaching"] for c in applying)
    return withdrawn and not still
