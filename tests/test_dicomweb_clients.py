"""dicomweb-client (PyPI), a DICOMweb client we did not write, against the DICOMweb door over a real socket, both
backends: searches paged with get_remaining=True, STOW with a chunked request body, WADO-RS of instances (as
stored and decoded), series, metadata, frames and rendered images."""

from __future__ import annotations

import io
import logging

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from tests import dicom_objects as objects
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import add_patient
from tests.test_dicomweb_rendering import served  # noqa: F401 (the fixture)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def client(gw, served):  # noqa: F811 (the imported fixture)
    # dicomweb-client sends a Host header without the port: `served` sets the public URL the answers' URLs come from
    return DICOMwebClient(url=f"{str(served.base_url).rstrip('/')}/dicomweb",
                          headers=auth_headers(gw, role="medical-illustration", sub="mi.jones"))


def photos(fx, tmp_path, n: int) -> list[pydicom.Dataset]:
    """n VL Photographic objects of one patient in two studies, as dcmtk wraps a camera's JPEG."""
    out = []
    for i in range(n):
        study = f"1.2.826.0.5.{1 + i % 2}"
        path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / f"p{i}.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                               StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1", SOPInstanceUID=f"{study}.1.{i + 1}",
                               InstanceNumber=str(i + 1))
        out.append(pydicom.dcmread(path))
    return out


def test_dicomweb_client_stores_searches_and_retrieves(gw, fx, client, tmp_path, caplog):
    add_patient(gw)
    sent = photos(fx, tmp_path, 5)
    # STOW in chunks: the library sends Transfer-Encoding: chunked when the body is over its chunk size
    client.set_chunk_size(64 * 1024)
    with caplog.at_level(logging.INFO, logger="dicomweb_client"):
        answer = client.store_instances(sent)
    assert any("chunked transfer encoding" in r.getMessage() for r in caplog.records)
    assert sorted(i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence) == sorted(d.SOPInstanceUID for d in sent)
    assert "FailedSOPSequence" not in answer

    # QIDO, paged one result at a time until an empty page (get_remaining)
    studies = client.search_for_studies(search_filters={"PatientID": objects.NHS_NUMBER}, limit=1, get_remaining=True)
    assert sorted(s["0020000D"]["Value"][0] for s in studies) == ["1.2.826.0.5.1", "1.2.826.0.5.2"]
    instances = client.search_for_instances(limit=2, get_remaining=True, fields=["PatientName"])
    assert sorted(i["00080018"]["Value"][0] for i in instances) == sorted(d.SOPInstanceUID for d in sent)
    series = client.search_for_series(study_instance_uid="1.2.826.0.5.1", get_remaining=True)
    assert [s["0020000E"]["Value"][0] for s in series] == ["1.2.826.0.5.1.1"]

    first = sent[0]
    uids = dict(study_instance_uid=first.StudyInstanceUID, series_instance_uid=first.SeriesInstanceUID,
                sop_instance_uid=first.SOPInstanceUID)
    # as stored when the client takes any transfer syntax (the library's default); decoded when it takes only uncompressed
    stored = client.retrieve_instance(**uids)
    assert stored.file_meta.TransferSyntaxUID == JPEG_BASELINE and stored.PixelData == first.PixelData
    decoded = client.retrieve_instance(**uids, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert decoded.pixel_array.shape == (first.Rows, first.Columns, 3)
    whole = client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID, media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in whole) == sorted(d.SOPInstanceUID for d in sent if d.StudyInstanceUID == first.StudyInstanceUID)

    meta = client.retrieve_instance_metadata(**uids)
    ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
    assert ds.SOPInstanceUID == first.SOPInstanceUID and ds.PatientName == "Ó Súilleabháin^Siobhán"
    assert len(client.retrieve_study_metadata(first.StudyInstanceUID)) == 3
    # the Pixel Data's BulkDataURI answers with the stored frame
    [bulk] = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"], media_types=(("application/octet-stream", "*"),))
    [frame] = client.retrieve_instance_frames(**uids, frame_numbers=[1], media_types=("image/jpeg",))
    assert frame == bulk and frame == next(pydicom.encaps.generate_frames(first.PixelData))
    rendered = client.retrieve_instance_rendered(**uids, media_types=("image/png",), params={"viewport": "64,64"})
    assert Image.open(io.BytesIO(rendered)).format == "PNG" and max(Image.open(io.BytesIO(rendered)).size) == 64
