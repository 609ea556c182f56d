"""Synthetic demo data for `make run`: patients, encounters, consents and photos, and the welcome that lists them.

All people are invented and their NHS numbers are from the 999 range that is never issued, so printing
their names and numbers (the welcome does, on the terminal of `make run`) discloses nobody.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from sqlalchemy import select

from gateway.core.consents import record_consent
from gateway.core.context import Gateway
from gateway.core.identity import address_matches, dicom_peers
from gateway.core.nhs import NHS_NUMBER_SYSTEM as NHS_SYSTEM
from gateway.demo_photos import SOURCE, seed_demo_photos
from gateway.settings import Settings
from store import audit
from store.models import Encounter, Patient, PatientIdentifier

# the trust the fixtures' ADT feed (fixtures/hl7, PID-3 CX.4) comes from: demo patients and a fed one share the one MRN
# system, so `mrn|...` stays unambiguous after the README's ADT example
DEMO_ODS = "RX1"

# (nhs number, mrn, family, given, birth date, sex, consent level or None, specialty of current encounter)
DEMO_PATIENTS = [
    ("9990000018", "D100001", "Okafor", "Grace", date(1956, 3, 14), "F", "publication", "330"),
    ("9990000026", "D100002", "Nowak", "Tomasz", date(1983, 11, 2), "M", "teaching", "160"),
    ("9990000034", "D100003", "Ó Súilleabháin", "Siobhán", date(2015, 6, 30), "F", "record", "420"),
    ("9990000042", "D100004", "Patel", "Arjun", date(1971, 1, 9), "M", "record", "100"),
    ("9990000050", "D100005", "Evans", "Rhiannon", date(1990, 8, 21), "F", None, "161"),
]


def seed_demo(gw: Gateway, force: bool = False) -> str:
    now = datetime.now(timezone.utc)
    settings = gw.settings
    if not isinstance(settings, Settings):  # the core's view of the settings has no HL7 part
        raise TypeError("the demo reads the HL7 settings: open the gateway with gateway.settings.Settings")
    # the MRN system an ADT feed under the configured mapping would give these patients
    mrn_system = settings.hl7.mrn_system.replace("{authority}", DEMO_ODS)
    with gw.db.write() as session:
        exists = session.execute(
            select(PatientIdentifier.id).where(PatientIdentifier.system == NHS_SYSTEM, PatientIdentifier.value == DEMO_PATIENTS[0][0])
        ).first()
        if exists and not force:
            return "demo data already present (use --force to add photos again)"
        patients: list[Patient] = []
        for nhs, mrn, family, given, born, sex, consent_level, specialty in DEMO_PATIENTS:
            patient = session.execute(
                select(Patient).join(PatientIdentifier).where(PatientIdentifier.system == NHS_SYSTEM, PatientIdentifier.value == nhs)
            ).scalar_one_or_none()
            if patient is None:
                patient = Patient(family_name=family, given_names=given, birth_date=born, sex=sex, nhs_number_status="01")
                patient.identifiers = [
                    PatientIdentifier(system=NHS_SYSTEM, value=nhs, type_code="NH", assigner="NHS"),
                    PatientIdentifier(system=mrn_system, value=mrn, type_code="MR", assigner=DEMO_ODS),
                ]
                session.add(patient)
                session.flush()
                session.add(
                    Encounter(
                        patient_id=patient.id, visit_system=DEMO_ODS, visit_number=f"V{mrn}", class_code="AMB",
                        status="in-progress", location="Outpatients", specialty=specialty,
                        attending_id="C1234567", attending_name="Dr Demo", admitted_at=now - timedelta(days=1),
                    )
                )
                if consent_level:
                    # through the one consent writer: the same rules and audit record as the consent API
                    record_consent(
                        session, patient_id=patient.id, level=consent_level,
                        given_by="parent" if born.year > 2010 else "patient", captured_by="demo",
                        consent_date=now.date(), scope="patient",
                        purpose_note="Synthetic demo atlas" if consent_level == "publication" else None,
                        actor=SOURCE.who, actor_role=SOURCE.role, actor_network=SOURCE.network,
                    )
                audit.append(
                    session,
                    audit.AuditEntry(
                        type_code=audit.PATIENT_RECORD, action="C", agent_who="clinphoto-demo", agent_role="system",
                        patient_id=patient.id, entities=[{"type": "patient", "id": patient.id}], detail={"source": "demo"},
                    ),
                )
            patients.append(patient)
    photos = seed_demo_photos(gw, patients)
    return f"demo data: {len(patients)} patients, {photos} photos"


def welcome(gw: Gateway, settings: Settings, ports: dict[str, int]) -> str:
    """What `make run` prints once every door listens: the demo patients, a dev token and lines to paste (dev mode
    only: in jwt mode tokens come from the hospital's issuer and there is nothing to mint)."""
    if settings.auth.mode != "dev":
        return ""
    from gateway.core.identity import mint_dev_token

    with gw.db.read() as session:
        found = {i.value: i.patient_id for i in session.scalars(select(PatientIdentifier).where(
            PatientIdentifier.system == NHS_SYSTEM, PatientIdentifier.value.in_([p[0] for p in DEMO_PATIENTS])))}
    if not found:
        return ""
    lines = ["", "Demo patients (synthetic people; NHS numbers from the never-issued 999 range):",
             f"  {'NHS NUMBER':<12} {'MRN':<9} {'NAME':<26} {'BORN':<11} CARED FOR BY (SPECIALTY)"]
    for nhs, mrn, family, given, born, _sex, _consent, specialty in DEMO_PATIENTS:
        if nhs in found:
            lines.append(f"  {nhs:<12} {mrn:<9} {family + ', ' + given:<26} {born.isoformat():<11} {specialty}")
    token = mint_dev_token(settings, sub="dr.demo", role="clinician", name="Dr Demo", specialties=["330"])
    http = ports.get("http")
    lines += ["", "A dermatology clinician's token (dev mode, 12 h) and a first call:", f"  TOKEN={token}"]
    if http:
        # https when the door has a certificate: curl then needs the CA that signed it (--cacert) unless it is a public one
        base = f"{'https' if settings.http_tls_cert else 'http'}://{settings.http_host}:{http}"
        lines.append(f'  curl -s -H "Authorization: Bearer $TOKEN" "{base}/api/v1/photos?patient=nhs|9990000018"')
        lines.append(f"  API docs: {base}/api/docs")
        lines.append(f"  Integration console: {base}/console/ (sign in with the token of "
                     "`.venv/bin/clinphoto token --sub ie.demo --role integration-engineer`)")
        lines.append(f"  Bedside capture app (open on a phone or here; dev sign-in): {base}/capture/")
        lines.append(f'  Viewer: curl -s -X POST -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" '
                     f"-d '{{\"patient\":\"nhs|9990000018\"}}' {base}/api/v1/viewer/launch  "
                     f"(open {base} + the url it answers, once)")
    # the first peer that may echo from this machine (the demo peer when none is configured)
    peer = next((p for p in dicom_peers(settings) if "echo" in p.allow and address_matches("127.0.0.1", p.hosts)), None)
    if ports.get("dicom") and peer is not None:
        bound = settings.dicom_host or settings.http_host
        host = "127.0.0.1" if bound in ("0.0.0.0", "::") else bound
        # over TLS the peer needs its own key and certificate, and the CA that signed ours: named, not invented
        tls = "+tls CLIENT.key CLIENT.crt +cf CA.pem " if settings.dicom_tls_cert else ""
        lines.append(f"  echoscu {tls}-aet {peer.ae_title} -aec {settings.ae_title} {host} {ports['dicom']}"
                     + ("  (your client's key and certificate, and the CA that signed the gateway's)" if tls else ""))
    return "\n".join(lines) + "\n"
