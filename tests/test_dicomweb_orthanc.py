"""Orthanc (Debian's package with its DICOMweb plugin) as a DICOMweb client of clinphoto, both backends: through
its /dicom-web/servers/clinphoto/{get,stow,retrieve} it searches (QIDO-RS), sends an instance it holds (STOW-RS) and
pulls a study into its own store (WADO-RS), with a bearer token as a hospital would configure it."""

from __future__ import annotations

import io

import httpx
import pydicom
from sqlalchemy import select

from gateway.app import create_app
from store.models import Asset
from tests import dicom_objects as objects
from tests.auth_helpers import auth_headers
from tests.net import free_port
from tests.orthanc import Orthanc
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)
from tests.test_photos_api import serving


def test_orthanc_gets_stows_and_retrieves_through_its_dicomweb_client(gw, archive, fx, tmp_path):  # noqa: F811
    port = free_port()
    token = auth_headers(gw, role="medical-illustration", sub="orthanc.bridge")["Authorization"]
    servers = {"clinphoto": {"Url": f"http://127.0.0.1:{port}/dicomweb/", "HttpHeaders": {"Authorization": token}}}
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb_servers=servers).start()
    try:
        with serving(create_app(gw), port=port):
            relay = f"{orthanc.url}/dicom-web/servers/clinphoto"
            # QIDO-RS through Orthanc: the answer is clinphoto's, relayed
            r = httpx.post(f"{relay}/get", json={"Uri": "/studies", "Arguments": {"PatientID": objects.NHS_NUMBER}}, timeout=60)
            assert r.status_code == 200, r.text
            assert sorted(s["0020000D"]["Value"][0] for s in r.json()) == ["1.2.826.0.1.1", "1.2.826.0.1.2"]

            # WADO-RS: Orthanc pulls a study into its own store
            r = httpx.post(f"{relay}/retrieve", json={"Resources": [{"Study": "1.2.826.0.1.1"}]}, timeout=120)
            assert r.status_code == 200, r.text
            got = {i["SOPInstanceUID"]: i for i in orthanc.instances()}
            assert set(got) == {archive["a1"].SOPInstanceUID, archive["a2"].SOPInstanceUID}
            pulled = pydicom.dcmread(io.BytesIO(orthanc.file(got[archive["a1"].SOPInstanceUID]["_id"])))
            # Orthanc's plugin accepts any transfer syntax: the JPEG as stored, byte for byte
            assert pulled.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and pulled.PixelData == archive["a1"].PixelData
            assert str(pulled.PatientName) == "Ó Súilleabháin^Siobhán"

            # STOW-RS: an instance Orthanc holds, sent to clinphoto
            path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "from-orthanc.dcm", PatientID=objects.NHS_NUMBER,
                                   IssuerOfPatientID="NHS", StudyInstanceUID="1.2.826.0.8.1", SeriesInstanceUID="1.2.826.0.8.1.1",
                                   SOPInstanceUID="1.2.826.0.8.1.1.1")
            uploaded = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), timeout=60).json()
            r = httpx.post(f"{relay}/stow", json={"Resources": [uploaded["ID"]]}, timeout=120)
            assert r.status_code == 200, r.text
            with gw.db.read() as s:
                stored = s.execute(select(Asset.source, Asset.uploaded_by).where(Asset.sop_instance_uid == "1.2.826.0.8.1.1.1")).one()
            assert tuple(stored) == ("stow", "orthanc.bridge")
    finally:
        orthanc.stop()

