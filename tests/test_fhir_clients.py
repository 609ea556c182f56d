"""The FHIR door as independent software sees it, over a live socket on both backends.

Two FHIR clients we did not write (fhirpy, and SMART's fhirclient with its own R4 models) page through a patient's
photos following the `next` links the server gives; each photo comes once, in order. The bodies the door answers are
checked by a second R4 validator, unrelated to the fhir.resources models tests/test_fhir.py uses: medplum's, under
node (tests/fhir_validate.mjs; package.json pins it and `make test` installs it)."""

from __future__ import annotations

import json
import subprocess
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.consent import Consent as FhirConsent
from fhirclient.auth import FHIROAuth2Auth
from fhirclient.client import FHIRClient
from fhirclient.models.bundle import Bundle as ClientBundle
from fhirclient.models.media import Media as ClientMedia
from fhirpy import SyncFHIRClient
from sqlalchemy import select

from store.models import Asset, Encounter, Patient, PatientIdentifier
from tests.auth_helpers import auth_headers, token_for
from tests.conftest import IN_CI, require_tool
from tests.test_fhir import MODELS, NHS, _photos_world, valid
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)

# valid() checks with these models too (as tests/test_fhir_governance.py adds them)
MODELS.setdefault("Consent", FhirConsent)
MODELS.setdefault("AuditEvent", FhirAuditEvent)

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "tests" / "fhir_validate.mjs"

# more photos than fit on one page, and a page size that leaves a short last page: 23 = 4 x 5 + 3
PHOTOS, PAGE = 23, 5


def _token(gw) -> str:
    return token_for(gw, role="clinician", sub="dr.derm", specialties=["330"])


def _fhirpy(gw, api) -> tuple[SyncFHIRClient, list[dict]]:  # noqa: F811
    """A fhirpy client on the door; every body it receives is kept (as plain JSON) to be validated."""
    client = SyncFHIRClient(f"{api.base_url}/fhir", authorization=f"Bearer {_token(gw)}")
    received: list[dict] = []
    fetch = client._fetch_resource  # every read and search goes through here, first page and next links alike

    def keeping(path, params=None):
        body = fetch(path, params)
        received.append(json.loads(json.dumps(body)))
        return body

    client._fetch_resource = keeping
    return client, received


def test_fhirpy_pages_through_a_patients_photos(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, PHOTOS)
    client, received = _fhirpy(gw, api)
    newest_first = list(reversed(ids))
    # iterating a search set fetches page after page, following each Bundle's next link
    media = client.resources("Media").search(patient=patient.public_id).limit(PAGE).fetch_all()
    assert [m.id for m in media] == newest_first
    assert len(received) == 5 and all(b["total"] == PHOTOS for b in received)
    # the oldest first, the patient named by identifier and included: the included Patient is not a match
    docs = (client.resources("DocumentReference").search(**{"patient.identifier": f"{NHS}|9990000018"}).sort("date")
            .include("DocumentReference", "patient").limit(PAGE))
    assert [d.id for d in docs] == ids
    assert [len(b["entry"]) for b in received[5:]] == [PAGE + 1] * 4 + [PHOTOS % PAGE + 1]
    for body in received:
        valid(body)
    assert_valid_r4(received)


def test_fhirclient_pages_through_a_patients_photos(gw, api):  # noqa: F811
    patient, ids = _photos_world(gw, PHOTOS)
    smart = FHIRClient(settings={"app_id": "clinphoto-tests", "api_base": f"{api.base_url}/fhir"})
    # reads /metadata into fhirclient's own R4 CapabilityStatement model; the door names no OAuth endpoints (the
    # hospital's authorization server issues the tokens), so the bearer token is given to the server's auth as is
    smart.prepare()
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"
    smart.server.auth = FHIROAuth2Auth()
    smart.server.auth.access_token = _token(gw)
    search = ClientMedia.where(struct={"patient": patient.public_id, "_count": str(PAGE)}).include("subject")
    pages: list[ClientBundle] = list(search.perform_iter(smart.server))  # first page, then each `next` link
    assert len(pages) == 5 and {p.total for p in pages} == {PHOTOS}
    # fhirclient parses every entry into its R4 models, refusing an element they do not know
    matches = [e.resource for p in pages for e in p.entry if e.search.mode == "match"]
    assert all(isinstance(m, ClientMedia) for m in matches)
    assert [m.id for m in matches] == list(reversed(ids))
    # the patient comes with every page that has a photo of theirs
    assert [[e.resource.id for e in p.entry if e.search.mode == "include"] for p in pages] == [[patient.public_id]] * 5
    # fhirclient's models took every page; the raw bodies, as fetched again by following the links by hand
    raw = [smart.server.request_json(p.link[0].url) for p in pages]
    assert [link.relation for link in pages[0].link] == ["self", "next"] and [link.relation for link in pages[-1].link] == ["self", "previous"]
    assert_valid_r4([valid(b) for b in raw])


# -- a second R4 validator ----------------------------------------------------------------------------------


def medplum_reports(resources: list[dict]) -> list[dict]:
    """Each resource's issues by medplum's validator: [{"resource": "Type/id", "issues": [OperationOutcome.issue]}]."""
    node = require_tool("node", "nodejs")
    if not (ROOT / "node_modules" / "@medplum" / "core").is_dir():
        message = "medplum's validator not installed: make node_modules/.installed (npm ci from package-lock.json)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run([node, str(VALIDATOR), "--json"], input=json.dumps(resources), capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode in (0, 1), run.stderr
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(reports) == len(resources), run.stdout
    return reports


def _errors(report: dict) -> list[str]:
    return [f"{report['resource']}: {i['code']} at {', '.join(i.get('expression', []))}: {i.get('details', {}).get('text', '')}"
            for i in report["issues"] if i["severity"] in ("error", "fatal")]


def assert_valid_r4(resources: list[dict]) -> None:
    errors = [e for report in medplum_reports(resources) for e in _errors(report)]
    assert not errors, "\n".join(errors)


def test_the_validator_finds_what_is_wrong():
    """The validator is no rubber stamp: a wrong type, an unknown element, a code outside its required value set, a
    broken invariant (and the same inside a Bundle entry) are each reported, and a valid resource passes."""
    good = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1956-03-14"}
    bad = [
        {"resourceType": "Patient", "id": "p2", "birthDate": "14/03/1956"},
        {"resourceType": "Patient", "id": "p3", "colour": "red"},
        {"resourceType": "Patient", "id": "p4", "gender": "f"},
        {"resourceType": "OperationOutcome", "id": "o1", "issue": [{"severity": "error", "code": "refused"}]},
        {"resourceType": "Bundle", "id": "b1", "type": "searchset",
         "entry": [{"fullUrl": "urn:x:1", "resource": {**good, "gender": "f"}, "search": {"mode": "match"}}]},
        {"resourceType": "Bundle", "id": "b2", "type": "searchset",
         "entry": [{"fullUrl": "urn:x:1", "resource": good}, {"fullUrl": "urn:x:1", "resource": good}]},  # bdl-7
    ]
    reports = medplum_reports([good, *bad])
    assert _errors(reports[0]) == []
    assert all(_errors(r) for r in reports[1:]), reports
    assert "birthDate" in _errors(reports[1])[0] and "colour" in _errors(reports[2])[0] and "gender" in _errors(reports[3])[0]
    assert "bdl-7" in _errors(reports[6])[0]


def _bodies(gw, api) -> dict[str, dict]:  # noqa: F811
    """One body of each kind the door answers, for a clinician who may see the photos; one photo and the patient
    with every optional element the renderer can fill, so that each of them is validated."""
    patient, ids = _photos_world(gw, 3)
    preview = gw.blobs.put_bytes(b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9")
    with gw.db.write() as s:
        p = s.get(Patient, patient.id)
        p.sex, p.birth_date, p.name_prefix = "F", date(1956, 3, 14), "Mrs"
        p.deceased_at = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
        s.add(PatientIdentifier(patient_id=p.id, system="urn:oid:1.2.3.4", value="MRN-1", type_code="MR", assigner="St Elsewhere"))
        a = s.get(Asset, ids[1])
        a.encounter_id = s.scalars(select(Encounter.id).where(Encounter.patient_id == p.id)).one()
        a.sop_class_uid = "1.2.840.10008.5.1.4.1.1.77.1.7"  # dermoscopy
        a.view, a.photographer, a.device, a.description = "close-up", "M. Illustrator", "Dermlite DL5", "Naevus, left forearm"
        a.width, a.height, a.original_filename, a.body_site_display = 4000, 3000, "IMG_0001.JPG", "Skin of forearm"
        a.preview_sha256 = preview.sha256
    derm = {"Authorization": f"Bearer {_token(gw)}"}
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")  # consents are theirs to keep
    privacy = auth_headers(gw, role="privacy-officer", sub="po.smith")  # the audit trail is theirs to read

    def get(path: str, status: int = 200, headers: dict = derm, **params) -> dict:
        r = api.get(f"/fhir/{path}", params=params, headers={**headers, "Accept": "application/fhir+json"})
        assert r.status_code == status, r.text
        return valid(r.json())

    consents = get("Consent", headers=mi, patient=patient.public_id)

    bodies = {
        "CapabilityStatement": get("metadata"),
        "Patient": get(f"Patient/{patient.public_id}"),
        "Media": get(f"Media/{ids[1]}"),
        "DocumentReference": get(f"DocumentReference/{ids[1]}"),
        "Binary": get(f"Binary/{ids[1]}", _rendition="preview"),
        "Bundle Media _include": get("Media", patient=patient.public_id, _include="Media:patient", _count=2),
        "Bundle DocumentReference _include": get("DocumentReference", patient=patient.public_id, _include="DocumentReference:patient"),
        "Bundle Patient": get("Patient", identifier=f"{NHS}|9990000018"),
        "Bundle _summary=count": get("Media", patient=patient.public_id, _summary="count"),
        "Bundle with an outcome entry": get("Media", patient=patient.public_id, colour="red"),
        "OperationOutcome": get("Media/nope", 404),
        "Consent": get(f"Consent/{consents['entry'][0]['resource']['id']}", headers=mi),
        "Bundle Consent": consents,
        # last: the reads and searches above are on the trail, the searches with their query
        "Bundle AuditEvent": get("AuditEvent", headers=privacy, patient=f"Patient/{patient.public_id}"),
    }
    assert {"encounter", "operator", "note", "deviceName", "height", "view"} <= set(bodies["Media"])  # the optional ones are there
    assert {e["resource"]["action"] for e in bodies["Bundle AuditEvent"]["entry"]} >= {"R", "E"}
    return bodies


KINDS = ["CapabilityStatement", "Patient", "Media", "DocumentReference", "Binary", "Bundle Media _include",
         "Bundle DocumentReference _include", "Bundle Patient", "Bundle _summary=count", "Bundle with an outcome entry",
         "OperationOutcome", "Consent", "Bundle Consent", "Bundle AuditEvent"]
# (body, medplum's report) by backend and kind: built and validated in one node run by the first test of a backend
# (node and the definitions take a second or two to load), then looked up by the others; a test run alone builds its own
_checked: dict[str, dict[str, tuple[dict, dict]]] = {}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_body_is_valid_r4_for_medplum(request, backend, kind):
    if backend not in _checked:
        bodies = _bodies(request.getfixturevalue("gw"), request.getfixturevalue("api"))
        _checked[backend] = dict(zip(bodies, zip(bodies.values(), medplum_reports(list(bodies.values())))))
    body, report = _checked[backend][kind]
    assert body["resourceType"] == kind.split()[0]
    assert not _errors(report), "\n".join(_errors(report))
