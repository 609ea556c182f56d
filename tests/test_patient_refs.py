"""One way to name a patient at every door: system|value, with the aliases nhs and mrn."""

from __future__ import annotations

import pytest

from gateway.core import patient_refs
from gateway.core.patient_refs import NHS_SYSTEM, BadPatientRef
from store.models import PatientIdentifier
from tests.test_policy import add_patient

TRUST_MRN = "https://clinphoto.local/Id/mrn/RX1"


def register(gw, nhs: str, mrn: str, mrn_system: str = TRUST_MRN) -> int:
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add_all([PatientIdentifier(patient_id=patient.id, system=NHS_SYSTEM, value=nhs, type_code="NH"),
                         PatientIdentifier(patient_id=patient.id, system=mrn_system, value=mrn, type_code="MR")])
    return patient.id


def find(gw, text: str):
    with gw.db.read() as session:
        found = patient_refs.find(session, *patient_refs.parse(text))
        return found.id if found is not None else None


def test_the_forms_and_aliases_name_the_same_patient(gw):
    pid = register(gw, "9449305552", "M1")
    for text in (f"{NHS_SYSTEM}|9449305552", "nhs|9449305552", "NHS|944 930 5552", "nhs-number|944-930-5552",
                 f"{TRUST_MRN}|M1", "mrn|M1", "MRN|M1"):
        assert find(gw, text) == pid, text
    assert find(gw, "nhs|9990000018") is None and find(gw, "mrn|M2") is None  # unknown patients: no error


@pytest.mark.parametrize("text, says", [
    ("9449305552", "must be system|value"),
    ("nhs|1234567890", "not a valid NHS number"),
    ("urn:nowhere|1", "unknown identifier system 'urn:nowhere'; systems known here: "),
])
def test_mistakes_are_named(gw, text, says):
    register(gw, "9449305552", "M1")
    with pytest.raises(BadPatientRef, match=says) as exc:
        find(gw, text)
    if "unknown" in says:
        assert TRUST_MRN in str(exc.value) and "aliases: nhs, nhs-number, mrn" in str(exc.value)


def test_mrn_needs_one_hospital_number_system(gw):
    with pytest.raises(BadPatientRef, match="no hospital numbers"):
        find(gw, "mrn|M1")
    register(gw, "9449305552", "M1")
    register(gw, "9990000018", "M1", mrn_system="https://clinphoto.local/Id/mrn/RX2")
    with pytest.raises(BadPatientRef, match="ambiguous here.*RX1.*RX2"):
        find(gw, "mrn|M1")
