"""How callers name a patient: `system|value`, with two short aliases, the same at every door.

- `https://fhir.nhs.uk/Id/nhs-number|9449305552` — an identifier: its system and its value;
- `nhs|9449305552` (or `nhs-number|...`) — the NHS number: checked (10 digits, modulus 11) and
  written without spaces, so `nhs|944 930 5552` names the same patient;
- `mrn|D100001` — the trust's hospital number: the system `trust_mrn_system` names (CLINPHOTO_TRUST_MRN_SYSTEM);
  unset, the one system of the MRNs the PAS feed registers (PID-3 typed MR). After a trust merger patients carry
  MRNs of several systems: unset, `mrn` is then ambiguous, and the refusal names the systems and the setting.

A well-formed reference to a patient nobody registered is a question about existence, answered as the
door answers a hidden patient; a reference in a system no patient has is a mistake, refused with the
systems that are known (and the aliases).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core import nhs
from store.db import SHARED
from store.models import Patient, PatientIdentifier
from store.patients import find_patient, survivor

NHS_SYSTEM = nhs.NHS_NUMBER_SYSTEM
STATIC_ALIASES = {"nhs": NHS_SYSTEM, "nhs-number": NHS_SYSTEM}
MRN_ALIAS = "mrn"
ALIASES = (*STATIC_ALIASES, MRN_ALIAS)
# the store's column widths (store/models.py PatientIdentifier): a longer value cannot match anything
MAX_SYSTEM, MAX_VALUE = 200, 100
EXAMPLE = "nhs|9449305552"
# not an identifier system: a door that names a patient by its opaque id (FHIR's Patient/<id>) passes
# (PUBLIC_ID, id) where others pass (system, value)
PUBLIC_ID = "clinphoto:patient-id"
# the setting naming the system `mrn` stands for, as the refusals name it
TRUST_MRN_SETTING = "CLINPHOTO_TRUST_MRN_SYSTEM"
# its Database.shared key: the Gateway puts the setting there, so every session (the ingest pipeline's too) reads it
TRUST_MRN_SYSTEM = "trust_mrn_system"


class BadPatientRef(ValueError):
    """The reference is malformed, names an unknown system, or an invalid NHS number; the text says which."""


def split(text: str) -> tuple[str, str]:
    """`system|value` -> (system, value), syntax only."""
    system, sep, value = text.partition("|")
    if not sep or not system.strip() or not value.strip():
        raise BadPatientRef(f"{text!r} must be system|value, e.g. {EXAMPLE} (aliases: {', '.join(ALIASES)})")
    return system.strip(), value.strip()


def normalise_identifier(system: str, value: str) -> tuple[str, str]:
    """(system, value) as the patient index keys it: the static aliases expanded, an NHS number checked and written
    as 10 digits (a mistyped NHS number is a typo to fix, not an unknown patient). `mrn` is left for `resolve`,
    which knows the store."""
    system, value = system.strip(), value.strip()
    if not system or not value:
        raise BadPatientRef(f"an identifier needs a system and a value, e.g. {EXAMPLE}")
    if "\x00" in system or "\x00" in value:
        raise BadPatientRef("must not contain NUL bytes")
    system = STATIC_ALIASES.get(system.lower(), system)
    if system.lower() == MRN_ALIAS:
        system = MRN_ALIAS
    if system == NHS_SYSTEM:
        reason = nhs.invalid_reason(value)
        if reason:
            raise BadPatientRef(f"{value!r} is not a valid NHS number: {reason}")
        value = nhs.normalise(value)
    if len(system) > MAX_SYSTEM or len(value) > MAX_VALUE:
        raise BadPatientRef(f"the system may have at most {MAX_SYSTEM} characters and the value at most {MAX_VALUE}")
    return system, value


def parse(text: str) -> tuple[str, str]:
    """A reference as text, normalised (the `mrn` alias still to resolve)."""
    return normalise_identifier(*split(text))


def mrn_systems(session: Session, limit: int = 5) -> list[str]:
    """The systems of the hospital numbers (PID-3 typed MR) in the store."""
    query = select(PatientIdentifier.system).where(PatientIdentifier.type_code == "MR").distinct().limit(limit)
    return sorted(session.scalars(query))


def check_system(system: str) -> str:
    """A configured trust MRN system, stripped, or ValueError saying what is wrong with it (checked at start-up:
    the store may hold no MRN yet, so only its form can be)."""
    system = system.strip()
    if not system or any(c.isspace() or c in "|{}\x00" for c in system):
        raise ValueError(f"{system!r} must be one identifier system with no spaces, '|' or '{{...}}' template, "
                         "e.g. https://clinphoto.local/Id/mrn/RX1 (hl7.mrn_system with the trust's ODS code)")
    if len(system) > MAX_SYSTEM:
        raise ValueError(f"an identifier system has at most {MAX_SYSTEM} characters")
    if system.lower() in ALIASES or system == NHS_SYSTEM:
        raise ValueError(f"{system!r} is not a hospital number system: name the trust's MRN system")
    return system


def trust_mrn_system(session: Session) -> str | None:
    """The system `mrn` stands for by configuration (settings.trust_mrn_system), None when unset."""
    shared = session.info.get(SHARED) or {}
    configured: str | None = shared.get(TRUST_MRN_SYSTEM)
    return configured


def resolve(session: Session, system: str, value: str) -> tuple[str, str]:
    """(system, value) with `mrn` replaced by the trust's MRN system: the configured one, else the store's one."""
    if system != MRN_ALIAS:
        return system, value
    configured = trust_mrn_system(session)
    if configured:
        return configured, value
    found = mrn_systems(session)
    if not found:
        raise BadPatientRef("mrn|...: no hospital numbers (MRN) are registered here yet; name the system instead")
    if len(found) > 1:
        raise BadPatientRef(f"mrn|... is ambiguous here: hospital numbers of several systems are registered "
                            f"({', '.join(found)}); name the system instead, or set {TRUST_MRN_SETTING} to the "
                            "trust's own so mrn names it")
    return found[0], value


def find(session: Session, system: str, value: str) -> Patient | None:
    """The live patient (through merges) a normalised reference names; None when nobody registered it. A system
    no patient has (nor the national NHS number) is refused as a mistake, not answered as an unknown patient."""
    if system == PUBLIC_ID:
        named = session.scalar(select(Patient).where(Patient.public_id == value)) if len(value) <= 32 else None
        return survivor(session, named) if named is not None else None
    system, value = resolve(session, system, value)
    found = find_patient(session, system, value)
    if found is None and system != NHS_SYSTEM:
        check_known_system(session, system)
    return found


def check_known_system(session: Session, system: str) -> None:
    """Refuse a system no patient has an identifier of, naming the known ones (called when a look-up found nothing,
    so a registered patient never costs this query)."""
    exists = session.scalar(select(PatientIdentifier.id).where(PatientIdentifier.system == system).limit(1))
    if exists is not None:
        return
    known = sorted(session.scalars(select(PatientIdentifier.system).distinct().limit(20)))
    listed = ", ".join(known) if known else "none yet"
    # a misspelt setting would otherwise look like a request's mistake
    configured = f" (mrn names it: {TRUST_MRN_SETTING})" if system == trust_mrn_system(session) else ""
    raise BadPatientRef(f"unknown identifier system {system!r}{configured}; systems known here: {listed}; "
                        f"aliases: {', '.join(ALIASES)}")
