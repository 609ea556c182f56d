"""One way to name a patient at every door: system|value, with the aliases nhs and mrn."""

from __future__ import annotations

import re

import pytest

from gateway.core import patient_refs
from gateway.core.context import Gateway
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import ImageFile
from gateway.core.patient_refs import NHS_SYSTEM, BadPatientRef
from gateway.settings import SettingsError, load_settings
from store.models import PatientIdentifier
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import capture
from tests.test_photos_api import live_server
from tests.test_policy import add_patient

TRUST_MRN = "https://clinphoto.local/Id/mrn/RX1"
# the other trust of a merger: its MRNs came with its patients
OTHER_MRN = "https://clinphoto.local/Id/mrn/RX2"


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
    with pytest.raises(BadPatientRef, match="ambiguous here.*RX1.*RX2.*set CLINPHOTO_TRUST_MRN_SYSTEM"):
        find(gw, "mrn|M1")


def with_trust_mrn(gw, system: str | None) -> Gateway:
    """The gateway as started with settings.trust_mrn_system."""
    return Gateway(settings=gw.settings.model_copy(update={"trust_mrn_system": system}), db=gw.db, blobs=gw.blobs)


def test_the_trust_mrn_setting_names_its_system_among_a_mergers(gw):
    ours = register(gw, "9449305552", "M1")
    theirs = register(gw, "9990000018", "M1", mrn_system=OTHER_MRN)  # the same number, another trust's patient
    with_trust_mrn(gw, TRUST_MRN)
    assert find(gw, "mrn|M1") == ours and find(gw, f"{OTHER_MRN}|M1") == theirs
    assert find(gw, "mrn|M2") is None  # a number of ours nobody registered: an unknown patient, no error
    with gw.db.read() as session:
        assert patient_refs.resolve(session, "mrn", "M1") == (TRUST_MRN, "M1")
    with_trust_mrn(gw, OTHER_MRN)
    assert find(gw, "mrn|M1") == theirs


def test_a_trust_mrn_system_nobody_has_is_named_with_the_setting(gw):
    register(gw, "9449305552", "M1")
    with_trust_mrn(gw, "https://clinphoto.local/Id/mrn/RX9")
    with pytest.raises(BadPatientRef, match=r"unknown identifier system '.*RX9' \(mrn names it: CLINPHOTO_TRUST_MRN_SYSTEM\)"
                                            r"; systems known here: .*RX1"):
        find(gw, "mrn|M1")


def test_the_doors_and_the_pipeline_read_the_setting(gw, fx):
    ours = register(gw, "9449305552", "M1")
    register(gw, "9990000018", "M1", mrn_system=OTHER_MRN)
    trust = with_trust_mrn(gw, TRUST_MRN)
    # the ingest pipeline looks the patient up on its own session: the capture app's upload lands on ours
    result = ingest(trust, capture([ImageFile(fx["baseline_420.jpg"])], parse_metadata({"patient": "mrn|M1"})))
    assert result.patient_id == ours
    with live_server(trust) as api:
        r = api.get("/api/v1/patients", params={"identifier": "mrn|M1"}, headers=auth_headers(trust))
        assert r.status_code == 200 and r.json()["total"] == 1, r.text
        ours_shown = r.json()["items"][0]
        assert (TRUST_MRN, "M1") in {(i["system"], i["value"]) for i in ours_shown["identifiers"]}
        r = api.get("/api/v1/patients", params={"identifier": f"{OTHER_MRN}|M1"}, headers=auth_headers(trust))
        assert r.status_code == 200 and r.json()["items"][0]["id"] != ours_shown["id"], r.text
    with_trust_mrn(gw, None)  # as started without the setting: refused, saying what to configure
    with live_server(gw) as api:
        r = api.get("/api/v1/patients", params={"identifier": "mrn|M1"}, headers=auth_headers(gw))
        assert r.status_code == 400 and "ambiguous" in r.text and "CLINPHOTO_TRUST_MRN_SYSTEM" in r.text, r.text


@pytest.mark.parametrize("value, says", [
    ("https://clinphoto.local/Id/mrn/{authority}", "'{...}' template"),
    ("mrn", "not a hospital number system"),
    (NHS_SYSTEM, "not a hospital number system"),
    ("urn:a|b", "no spaces, '|'"),
])
def test_a_trust_mrn_system_that_is_not_one_stops_start_up(monkeypatch, value, says):
    monkeypatch.setenv("CLINPHOTO_TRUST_MRN_SYSTEM", value)
    with pytest.raises(SettingsError, match=f"invalid setting CLINPHOTO_TRUST_MRN_SYSTEM: .*{re.escape(says)}"):
        load_settings()


def test_an_empty_trust_mrn_system_is_unset(monkeypatch):
    monkeypatch.setenv("CLINPHOTO_TRUST_MRN_SYSTEM", " ")
    assert load_settings().trust_mrn_system is None
    monkeypatch.setenv("CLINPHOTO_TRUST_MRN_SYSTEM", f" {TRUST_MRN} ")
    assert load_settings().trust_mrn_system == TRUST_MRN
