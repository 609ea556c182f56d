"""`clinphoto patients list|show`: the patient index for operators (reconciling quarantined photos, checking
what the PAS feed made of a patient), without SQL. Each use is on the audit trail."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(help="The patient index (for operators).", no_args_is_help=True)


@app.command("list")
def list_command(
    identifier: Annotated[str | None, typer.Option("--identifier", help="Only the patient with this identifier: system|value, "
                                                   "nhs|..., mrn|...")] = None,
    family: Annotated[str | None, typer.Option("--family", help="Only family names starting with this (any case).")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="Only records merged into another.")] = False,
    quarantined: Annotated[bool, typer.Option("--quarantined", help="Only patients with quarantined photos (an identifier "
                                              "no ADT feed had registered), for a records officer to reconcile.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, newest first.")] = 50,
) -> None:
    """List patients, newest first: id, identifiers, name, birth date, sex, merged into, photos."""
    from sqlalchemy import func, select

    from gateway.cli.common import console, open_gateway, operator_name, print_table
    from gateway.core import patient_refs
    from store import audit
    from store.models import Asset, Patient, PatientIdentifier

    longest = Patient.name_key.type.length
    if family and longest and len(family) > longest:
        # longer than any stored name: SQLite refused the LIKE pattern (over 50,000 bytes) with a traceback
        raise typer.BadParameter(f"longer than any stored name ({longest} characters)", param_hint="--family")
    gw = open_gateway()
    try:
        with gw.db.read() as session:
            query = select(Patient).order_by(Patient.id.desc()).limit(limit)
            if identifier:
                try:
                    system, value = patient_refs.resolve(session, *patient_refs.parse(identifier))
                except patient_refs.BadPatientRef as exc:
                    raise typer.BadParameter(str(exc), param_hint="--identifier") from None
                query = query.join(PatientIdentifier).where(PatientIdentifier.system == system, PatientIdentifier.value == value)
            if family:
                query = query.where(Patient.name_key.startswith(family.lower(), autoescape=True))  # folded by Python
            if merged:
                query = query.where(Patient.merged_into_id.is_not(None))
            if quarantined:
                query = query.where(select(Asset.id).where(Asset.patient_id == Patient.id, Asset.status == "quarantined").exists())
            patients = list(session.scalars(query))
            ids = [p.id for p in patients]
            idents: dict[int, list[str]] = {i: [] for i in ids}
            for pid, system, value in session.execute(select(PatientIdentifier.patient_id, PatientIdentifier.system,
                                                             PatientIdentifier.value).where(PatientIdentifier.patient_id.in_(ids))):
                short = "nhs" if system == patient_refs.NHS_SYSTEM else system
                idents[pid].append(f"{short}|{value}")
            photos = dict(session.execute(select(Asset.patient_id, func.count()).where(Asset.patient_id.in_(ids))
                                          .group_by(Asset.patient_id)).tuples().all())
            survivors = {p.id: p.public_id for p in session.scalars(
                select(Patient).where(Patient.id.in_({p.merged_into_id for p in patients if p.merged_into_id})))}
            rows = [(p.public_id, " ".join(idents[p.id]) or "-", " ".join(x for x in (p.family_name, p.given_names) if x) or "-",
                     p.birth_date.isoformat() if p.birth_date else "-", p.sex or "-",
                     survivors.get(p.merged_into_id or 0, "-"), str(photos.get(p.id, 0))) for p in patients]
        with gw.db.write() as session:
            audit.append(session, audit.AuditEntry(
                type_code=audit.APPLICATION_ACTIVITY, action="R", subtype="patients-list", agent_who=operator_name(),
                agent_role="operator", agent_network="local", entities=[{"type": "patient", "id": i} for i in ids[:500]],
                detail={"filters": {"identifier": bool(identifier), "family": bool(family), "merged": merged,
                                    "quarantined": quarantined}, "returned": len(ids)}))
    finally:
        gw.close()
    if not rows:
        console.print("no patients match", markup=False, highlight=False)
        return
    print_table(("ID", "IDENTIFIERS", "NAME", "BORN", "SEX", "MERGED INTO", "PHOTOS"), rows)


@app.command("show")
def show(patient: Annotated[str, typer.Argument(help="The patient's id (from `patients list`) or an identifier system|value.")]) -> None:
    """Print one patient in full, as JSON: demographics, identifiers, merge, encounters, photos and consents counted."""
    from sqlalchemy import func, select

    from gateway.cli.common import console, open_gateway, operator_name
    from gateway.core import patient_refs
    from store import audit
    from store.models import Asset, Consent, Encounter, Patient, PatientIdentifier

    gw = open_gateway()
    try:
        with gw.db.read() as session:
            if "|" in patient:
                try:
                    system, value = patient_refs.resolve(session, *patient_refs.parse(patient))
                except patient_refs.BadPatientRef as exc:
                    raise typer.BadParameter(str(exc), param_hint="PATIENT") from None
                row = session.scalar(select(Patient).join(PatientIdentifier).where(PatientIdentifier.system == system,
                                                                                   PatientIdentifier.value == value))
            else:
                row = session.scalar(select(Patient).where(Patient.public_id == patient.strip()))
            if row is None:
                console.print(f"clinphoto: no patient {patient}", markup=False, highlight=False)
                raise typer.Exit(1)
            survivor = session.get(Patient, row.merged_into_id) if row.merged_into_id else None
            encounters = session.scalars(select(Encounter).where(Encounter.patient_id == row.id).order_by(Encounter.id))
            record = {
                "id": row.public_id,
                "name": {"family": row.family_name, "given": row.given_names, "prefix": row.name_prefix},
                "birthDate": row.birth_date.isoformat() if row.birth_date else None, "sex": row.sex,
                "nhsNumberStatus": row.nhs_number_status,
                "identifiers": [{"system": i.system, "value": i.value, "type": i.type_code, "assigner": i.assigner}
                                for i in session.scalars(select(PatientIdentifier).where(PatientIdentifier.patient_id == row.id))],
                "mergedInto": survivor.public_id if survivor else None,
                "encounters": [{"visitNumber": e.visit_number, "status": e.status, "class": e.class_code, "location": e.location,
                                "specialty": e.specialty, "admittedAt": str(e.admitted_at) if e.admitted_at else None,
                                "dischargedAt": str(e.discharged_at) if e.discharged_at else None} for e in encounters],
                "photos": dict(session.execute(select(Asset.status, func.count()).where(Asset.patient_id == row.id)
                                               .group_by(Asset.status)).tuples().all()),
                "consents": session.scalar(select(func.count()).select_from(Consent).where(Consent.patient_id == row.id)),
            }
            patient_id = row.id
        with gw.db.write() as session:
            audit.append(session, audit.AuditEntry(
                type_code=audit.APPLICATION_ACTIVITY, action="R", subtype="patients-show", agent_who=operator_name(),
                agent_role="operator", agent_network="local", patient_id=patient_id,
                entities=[{"type": "patient", "id": patient_id}]))
    finally:
        gw.close()
    print(json.dumps(record, ensure_ascii=False, indent=2))
