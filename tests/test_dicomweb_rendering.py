"""The DICOMweb door's rendering and representation gaps, over a real socket, both backends: rendered studies and
series (multipart of the stored previews, hidden instances absent, audited), the window and annotation parameters
(the VOI LUT functions checked against pydicom's own implementation), frames of objects not stored as JPEG encoded
as JPEG or PNG, and QIDO-RS and /metadata as the Native DICOM Model XML (checked against dcmtk's dcm2xml -nat)."""

from __future__ import annotations

import io
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import Dataset
from pydicom.pixels.processing import apply_windowing
from pydicom.uid import RLELossless
from sqlalchemy import select, update

from gateway.app import create_app
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.dicomweb.media import parse_accept
from gateway.dicomweb.wado import frame_choice
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient, dicom_tools_check
from tests.net import free_port
from tests.test_dicom_find import OTHER_NHS, archive  # noqa: F401 (the fixture)
from tests.test_dicomweb import DICOM_TS_ANY, JPEG_BASELINE, mi, parts, value
from tests.test_photos_api import serving

SERIES_1 = "/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1"
NS = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"


@pytest.fixture
def served(gw):
    """The app on a real socket with its public URL set, for httpx and for dicomweb-client alike."""
    port = free_port()
    gw.settings.dicomweb.public_url = f"http://127.0.0.1:{port}/dicomweb"
    with serving(create_app(gw), port=port) as web:
        yield web


def dicomweb_client(gw, web) -> DICOMwebClient:
    return DICOMwebClient(url=f"{str(web.base_url).rstrip('/')}/dicomweb", headers=mi(gw))


def previews(gw, *sops: str) -> list[bytes]:
    with gw.db.read() as s:
        shas = dict(s.execute(select(Asset.sop_instance_uid, Asset.preview_sha256).where(Asset.sop_instance_uid.in_(sops))).all())
    return [gw.blobs.path(shas[sop]).read_bytes() for sop in sops]


def hide(gw, sop: str) -> None:
    """Very restricted: only its uploader (the camera's AE) and its access list see it, not mi.jones."""
    with gw.db.write() as s:
        s.execute(update(Asset).where(Asset.sop_instance_uid == sop).values(sensitivity="V"))


def retrieves(gw, sub: str = "mi.jones") -> list[dict]:
    with gw.db.read() as s:
        return [e.detail for e in s.scalars(select(AuditEvent).where(AuditEvent.agent_who == sub, AuditEvent.subtype == "retrieve"))]


# -- 1. rendered study and series ------------------------------------------------------------------------------


def test_rendered_series_and_study_as_multipart_of_the_stored_previews(gw, archive, served):  # noqa: F811
    h = mi(gw)
    a1, a2 = archive["a1"].SOPInstanceUID, archive["a2"].SOPInstanceUID
    r = served.get(f"{SERIES_1}/rendered", headers={**h, "Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="image/jpeg"') and "content-encoding" not in r.headers
    got = parts(r)
    assert [head["content-type"] for head, _ in got] == ["image/jpeg", "image/jpeg"]
    assert [body for _, body in got] == previews(gw, a1, a2)  # the stored previews, byte for byte, in instance order
    # a study, any media type accepted: the same, as JPEG
    study = parts(served.get("/dicomweb/studies/1.2.826.0.1.1/rendered", headers={**h, "Accept": "*/*"}))
    assert [body for _, body in study] == previews(gw, a1, a2)
    # PNG parts fitted to a viewport (the thumbnail is the source of a small one)
    png = served.get(f"{SERIES_1}/rendered", params={"viewport": "64,64"}, headers={**h, "Accept": 'multipart/related; type="image/png"'})
    images = [Image.open(io.BytesIO(body)) for _, body in parts(png)]
    assert [(i.format, max(i.size)) for i in images] == [("PNG", 64), ("PNG", 64)]
    # a single part type (image/jpeg alone) is for one instance: a study or series asked only so is 406, even one of a
    # single image (PS3.18 10.4.4); dicomweb-client's retrieve_series_rendered asks so, and is told
    many = served.get(f"{SERIES_1}/rendered", headers={**h, "Accept": "image/jpeg"})
    assert many.status_code == 406 and 'multipart/related; type="image/jpeg"' in many.json()["detail"]
    with pytest.raises(requests.HTTPError) as refused:
        dicomweb_client(gw, served).retrieve_series_rendered("1.2.826.0.1.2", "1.2.826.0.1.2.1", media_types=("image/jpeg",))
    assert refused.value.response.status_code == 406
    # dicomweb-client's instance rendered (single part) and a multipart of one instance
    one = dicomweb_client(gw, served).retrieve_instance_rendered("1.2.826.0.1.2", "1.2.826.0.1.2.1", archive["a3"].SOPInstanceUID,
                                                                  media_types=("image/jpeg",))
    assert one == previews(gw, archive["a3"].SOPInstanceUID)[0]
    [(head, body)] = parts(served.get(f"{SERIES_1}/instances/{a1}/rendered", headers={**h, "Accept": 'multipart/related; type="image/jpeg"'}))
    assert head["content-type"] == "image/jpeg" and body == previews(gw, a1)[0]
    assert served.get(f"{SERIES_1}/rendered", headers={**h, "Accept": 'multipart/related; type="image/gif"'}).status_code == 406
    # hidden instances are absent, not errors; a study whose every instance is hidden is a missing one
    hide(gw, a2)
    assert [body for _, body in parts(served.get(f"{SERIES_1}/rendered", headers={**h, "Accept": "*/*"}))] == previews(gw, a1)
    hide(gw, archive["b1"].SOPInstanceUID)
    hidden = served.get("/dicomweb/studies/1.2.826.0.1.3/rendered", headers={**h, "Accept": "*/*"})
    absent = served.get("/dicomweb/studies/2.25.404/rendered", headers={**h, "Accept": "*/*"})
    assert hidden.status_code == absent.status_code == 404 and hidden.json()["detail"] == absent.json()["detail"]
    assert served.get(f"{SERIES_1}/rendered").status_code == 401
    # audited like the other retrieves: the query, then one retrieve record per image served
    details = retrieves(gw)
    assert sum(d.get("rendition") == "preview" for d in details) == 2 + 2 + 1 + 1 + 1  # series, study, two instances, after hiding
    assert sum(d.get("rendition") == "thumbnail" for d in details) == 2  # the 64-pixel viewport
    with gw.db.read() as s:
        queries = [e["query"] for entities in s.scalars(select(AuditEvent.entities).where(
            AuditEvent.agent_who == "mi.jones", AuditEvent.type_code == "110112")) for e in entities if e.get("type") == "query"]
    assert any(q.startswith("WADO-RS GET /dicomweb/studies/1.2.826.0.1.3/rendered") for q in queries)


def test_rendered_series_of_objects_rendered_on_first_asking_and_one_that_did_not_decode(gw, fx, served, tmp_path):
    """Received objects are answered before their renditions are made (ingest.received_renditions after-answer): a
    rendered series makes them on first asking; one whose pixels do not decode is left out, as it has no image."""
    from gateway.core.ingest.renditions import DUE, FAILED
    from tests.test_ingest_deferred import damaged_inside, good_object

    add_patient(gw)
    study, series = "1.2.826.0.6.1", "1.2.826.0.6.1.1"
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    good, bad = good_object(tmp_path, fx), damaged_inside(tmp_path, fx)
    for path, n in ((good, 1), (bad, 2)):
        ds = pydicom.dcmread(path)
        for k, v in {**uids, "SOPInstanceUID": f"{series}.{n}", "InstanceNumber": n}.items():
            setattr(ds, k, v)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path)
        ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
    with gw.db.read() as s:
        assert set(s.scalars(select(Asset.rendition_state).where(Asset.series_uid == series))) == {DUE}
    r = served.get(f"/dicomweb/studies/{study}/series/{series}/rendered", headers={**mi(gw), "Accept": "*/*"})
    assert r.status_code == 200, r.text
    with gw.db.read() as s:
        states = dict(s.execute(select(Asset.sop_instance_uid, Asset.rendition_state).where(Asset.series_uid == series)).all())
    assert states == {f"{series}.1": None, f"{series}.2": FAILED}
    assert [body for _, body in parts(r)] == previews(gw, f"{series}.1")


# -- 2. window and annotation -----------------------------------------------------------------------------------


def pydicom_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's own VOI LUT implementation (PS3.3 C.11.2.1.2), on each channel as on a grey image of 8-bit values."""
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 8, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function.upper().replace("-", "_")
    return np.rint(apply_windowing(values.astype(np.float64), ds))


@pytest.mark.parametrize("window", [(128, 256, "linear"), (100, 40, "linear"), (90.5, 1, "linear"), (128, 64, "linear-exact"),
                                    (60, 30, "sigmoid")])
def test_window_applies_the_voi_lut_function_to_each_channel(gw, archive, served, window):  # noqa: F811
    a1 = archive["a1"]
    url = f"{SERIES_1}/instances/{a1.SOPInstanceUID}/rendered"
    h = {**mi(gw), "Accept": "image/png"}  # lossless, so the values compare exactly
    plain = np.asarray(Image.open(io.BytesIO(served.get(url, headers=h).content)).convert("RGB"))
    center, width, function = window
    r = served.get(url, params={"window": f"{center},{width},{function}"}, headers=h)
    assert r.status_code == 200, r.text
    windowed = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = pydicom_window(plain, center, width, function)
    assert windowed.shape == plain.shape and windowed.dtype == np.uint8
    assert np.abs(windowed.astype(int) - expected).max() <= 1  # half-way values may round the other way
    assert not np.array_equal(windowed, plain) or window == (128, 256, "linear")


def test_window_and_annotation_refusals_are_specific(gw, archive, served):  # noqa: F811
    url = f"{SERIES_1}/instances/{archive['a1'].SOPInstanceUID}/rendered"
    for params, words in (({"window": "128,256"}, "center,width,function"), ({"window": "a,256,linear"}, "decimal"),
                          ({"window": "128,256,gamma"}, "'gamma' is not one of linear, linear-exact, sigmoid"),
                          ({"window": "128,0.5,linear"}, "at least 1"), ({"window": "128,0,sigmoid"}, "greater than 0"),
                          ({"window": "nan,10,linear"}, "finite"), ({"annotation": "patient,weather"}, "patient, technique"),
                          ({"annotation": ""}, "patient, technique")):
        r = served.get(url, params=params, headers=mi(gw))
        assert r.status_code == 400 and words in r.json()["detail"], (params, r.text)
    assert served.get(f"{SERIES_1}/rendered", params={"window": "1,2"}, headers=mi(gw)).status_code == 400


def test_annotation_burns_in_the_patient_and_technique_for_those_who_see_the_photo(gw, archive, served):  # noqa: F811
    from gateway.core.access import RenderedSource, StoredImage
    from gateway.core.objects.vlphoto import PatientInfo
    from gateway.dicomweb.wado import _annotation_lines

    a1 = archive["a1"]
    url = f"{SERIES_1}/instances/{a1.SOPInstanceUID}/rendered"
    h = {**mi(gw), "Accept": "image/png"}
    plain = np.asarray(Image.open(io.BytesIO(served.get(url, headers=h).content)).convert("RGB"))
    r = served.get(url, params={"annotation": "patient,technique"}, headers=h)
    assert r.status_code == 200 and r.headers["cache-control"] == "private, no-store"  # no shared cache keeps it
    annotated = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert annotated.shape == plain.shape
    changed_rows = np.nonzero((annotated != plain).any(axis=(1, 2)))[0]
    # a band along the top holds the text (white on dark); below it the photo is untouched
    assert changed_rows.min() == 0 and changed_rows.max() < plain.shape[0] // 3
    band = annotated[: changed_rows.max() + 1]
    assert (band.min(axis=2) > 230).sum() > 200 and np.median(band) < np.median(plain[: changed_rows.max() + 1])
    patient_only = np.asarray(Image.open(io.BytesIO(served.get(url, params={"annotation": "patient"}, headers=h).content)).convert("RGB"))
    assert np.nonzero((patient_only != plain).any(axis=(1, 2)))[0].max() < changed_rows.max()  # two lines, not three
    # what the lines say: the patient as the patient index names them now, the technique from the photo's record
    with gw.db.read() as s:
        asset = s.scalars(select(Asset).where(Asset.sop_instance_uid == a1.SOPInstanceUID)).one()
        s.expunge(asset)
    source = RenderedSource(StoredImage(path=gw.blobs.path(asset.preview_sha256), media_type="image/jpeg", rendition="preview", asset=asset),
                            PatientInfo(patient_id=objects.NHS_NUMBER, issuer="NHS", family="Ó Súilleabháin", given="Siobhán"))
    lines = _annotation_lines(source, ("patient", "technique"))
    assert lines[0] == "Ó SÚILLEABHÁIN, Siobhán" and lines[1] == f"NHS {objects.NHS_NUMBER}"
    assert lines[2].startswith("XC  ") and "05 Jan 2024" in lines[2]
    # a study rendered with annotations: each part annotated; every retrieve's audit record says so
    study = parts(served.get("/dicomweb/studies/1.2.826.0.1.1/rendered", params={"annotation": "patient"},
                             headers={**mi(gw), "Accept": 'multipart/related; type="image/jpeg"'}))
    assert len(study) == 2 and all(body not in previews(gw, archive["a1"].SOPInstanceUID, archive["a2"].SOPInstanceUID) for _, body in study)
    assert sum(d.get("annotation") == ["patient"] for d in retrieves(gw)) == 3
    # a caller who may not see the photo gets no annotated image either: the same 404 as for a missing one
    hide(gw, a1.SOPInstanceUID)
    assert served.get(url, params={"annotation": "patient"}, headers=h).status_code == 404


def test_annotation_draws_accented_names_with_their_letters(monkeypatch):
    """Ó and Ú drawn as themselves (a font without them draws the same empty box for both); with no such font the
    name is folded to ASCII letters (Ó -> O), never boxes."""
    from gateway.dicomweb import pixels

    def drawn(text: str) -> np.ndarray:
        return np.asarray(pixels.annotate(Image.new("RGB", (400, 300), (40, 90, 40)), [text]))

    assert not np.array_equal(drawn("Ó"), drawn("Ú")) and not np.array_equal(drawn("Ó"), drawn("O"))
    monkeypatch.setattr(pixels, "FONT_FILES", ())
    assert np.array_equal(drawn("Ó Súilleabháin"), drawn("O Suilleabhain"))


# -- 3. frames as JPEG or PNG when stored otherwise -------------------------------------------------------------


def test_frames_of_native_and_rle_objects_as_jpeg_or_png(gw, served, tmp_path):
    add_patient(gw)
    pixels = objects.gradient(120, 160)
    stored = {
        "native": objects.native(tmp_path / "sc.dcm", pixels, sop_class=objects.SECONDARY_CAPTURE),
        "rle": objects.compressed(tmp_path / "rle.dcm", pixels, RLELossless),
    }
    client = dicomweb_client(gw, served)
    h = mi(gw)
    for name, path in stored.items():
        ds = pydicom.dcmread(path)
        ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
        url = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
        r = served.get(url, headers={**h, "Accept": 'multipart/related; type="image/jpeg"'})
        assert r.status_code == 200, (name, r.text)
        [(head, body)] = parts(r)
        assert head["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
        jpeg = Image.open(io.BytesIO(body))
        assert jpeg.format == "JPEG" and not jpeg.info.get("progressive") and b"\xff\xc0" in body  # baseline (SOF0)
        assert jpeg.size == (160, 120) and np.abs(np.asarray(jpeg.convert("RGB")).astype(int) - pixels).mean() < 3
        # dicomweb-client asks multipart/related; type="image/jpeg" itself
        [frame] = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1],
                                                  media_types=("image/jpeg",))
        assert Image.open(io.BytesIO(frame)).size == (160, 120)
        # image/png alone: one PNG, the stored values exactly
        png = served.get(url, headers={**h, "Accept": "image/png"})
        assert png.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), pixels)
        # a single part type is for one frame only (the rule itself: an instance here has one frame, and a frame
        # named twice is refused before any type is chosen)
        assert frame_choice(parse_accept("image/png"), ds.file_meta.TransferSyntaxUID, single=False) is None
        assert served.get(url.replace("/frames/1", "/frames/1,1"), headers={**h, "Accept": "image/png"}).status_code == 400
        # nothing that fits: 406 naming what is offered
        r = served.get(url, headers={**h, "Accept": 'multipart/related; type="image/jp2"'})
        assert r.status_code == 406
        assert all(w in r.json()["detail"] for w in ('type="image/jpeg"', 'type="image/png"', "transfer-syntax=*", "application/octet-stream"))
    # a frame stored as JPEG is still the stored JPEG itself, never re-encoded
    camera = tmp_path / "camera.jpg"
    Image.fromarray(objects.gradient(96, 128)).save(camera, "JPEG", quality=90)
    jpeg_obj = objects.img2dcm(camera, tmp_path / "j.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ds = pydicom.dcmread(jpeg_obj)
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(jpeg_obj)]))
    url = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
    single = served.get(url, headers={**h, "Accept": "image/jpeg"})
    assert single.headers["content-type"] == "image/jpeg" and single.content == next(pydicom.encaps.generate_frames(ds.PixelData))


# -- 5. the Native DICOM Model (XML) ---------------------------------------------------------------------------------


def native_model(xml: bytes) -> dict[str, dict]:
    """A NativeDicomModel document as {tag: {vr, keyword, values}} (values: Value texts, PN Alphabetic as a^b, BulkData uri)."""
    root = ET.fromstring(xml)
    assert root.tag in ("NativeDicomModel", f"{NS}NativeDicomModel")
    out = {}
    for attr in root:
        local = lambda e: e.tag.split("}")[-1]  # noqa: E731
        values = []
        for child in attr:
            if local(child) == "Value":
                values.append(child.text or "")
            elif local(child) == "PersonName":
                alpha = next((c for c in child if local(c) == "Alphabetic"), None)
                values.append({local(c): c.text for c in alpha} if alpha is not None else {})
            elif local(child) == "BulkData":
                values.append(("bulk", child.get("uri")))
            elif local(child) == "Item":
                values.append(len(list(child)))
        out[attr.get("tag")] = {"vr": attr.get("vr"), "keyword": attr.get("keyword"), "values": values}
    return out


def test_qido_and_metadata_as_native_dicom_model_xml(gw, archive, served, tmp_path):  # noqa: F811
    require_tool("dcm2xml", "dcmtk")
    h = mi(gw)
    xml_accept = 'multipart/related; type="application/dicom+xml"'
    r = served.get("/dicomweb/studies", params={"PatientID": objects.NHS_NUMBER}, headers={**h, "Accept": xml_accept})
    assert r.status_code == 200 and r.headers["content-type"].startswith('multipart/related; type="application/dicom+xml"')
    studies = [native_model(body) for head, body in parts(r) if head["content-type"] == "application/dicom+xml"]
    as_json = served.get("/dicomweb/studies", params={"PatientID": objects.NHS_NUMBER}, headers=h).json()
    assert len(studies) == len(as_json) == 2
    # the XML says what the JSON says, attribute for attribute
    for x, j in zip(studies, as_json, strict=True):
        assert set(x) == set(j)
        assert x["0020000D"]["values"] == j["0020000D"]["Value"] and x["0020000D"]["keyword"] == "StudyInstanceUID"
        assert x["00201208"]["values"] == [str(j["00201208"]["Value"][0])]
        assert x["00100010"]["values"] == [{"FamilyName": "Ó Súilleabháin", "GivenName": "Siobhán"}]
    # paging's Warning is kept in the XML form too
    assert "warning" in served.get("/dicomweb/instances", params={"limit": 1}, headers={**h, "Accept": xml_accept}).headers
    # /metadata: each instance one document; compared with dcmtk's own Native DICOM Model of the object served
    a1 = archive["a1"]
    base = f"{SERIES_1}/instances/{a1.SOPInstanceUID}"
    [(head, body)] = parts(served.get(f"{base}/metadata", headers={**h, "Accept": xml_accept}))
    ours = native_model(body)
    [(_, dicom)] = parts(served.get(base, headers={**h, "Accept": DICOM_TS_ANY}))
    (tmp_path / "a1.dcm").write_bytes(dicom)
    dcmtk = subprocess.run(["dcm2xml", "-nat", str(tmp_path / "a1.dcm")], capture_output=True, timeout=60, check=True).stdout
    theirs = native_model(dcmtk)
    for tag in ("00080016", "00080018", "0020000D", "0020000E", "00100020", "00100021", "00280010", "00280011", "00280004",
                "00080060", "00080008"):
        assert ours[tag]["vr"] == theirs[tag]["vr"] and ours[tag]["keyword"] == theirs[tag]["keyword"], tag
        assert ours[tag]["values"] == theirs[tag]["values"], (tag, ours[tag], theirs[tag])
    assert ours["00100010"]["values"] == theirs["00100010"]["values"]
    assert ours["7FE00010"]["values"] == [("bulk", f"http://127.0.0.1:{served.base_url.port}{base}/frames/1")]
    assert value(served.get(f"{base}/metadata", headers=h).json()[0], "00080018") == a1.SOPInstanceUID
    # anything else: 406 naming both forms
    r = served.get(f"{base}/metadata", headers={**h, "Accept": "application/dicom+xml"})
    assert r.status_code == 406 and 'type="application/dicom+xml"' in r.json()["detail"]


def test_native_model_private_elements_name_their_creator_and_sequences_nest():
    """PS3.19 A.1: a private element carries privateCreator (the value of its block's creator element), no keyword."""
    from gateway.dicomweb import nativexml

    doc = ET.fromstring(nativexml.document({
        "00090010": {"vr": "LO", "Value": ["ACME CAMERA 1"]}, "00091001": {"vr": "LO", "Value": ["lens 3"]},
        "00082218": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["85562004"]}}]},
        "00081030": {"vr": "LO"}, "00280030": {"vr": "DS", "Value": [0.5, 0.5]}}))
    attrs = {a.get("tag"): a for a in doc}
    assert list(attrs) == ["00081030", "00082218", "00090010", "00091001", "00280030"]  # in tag order
    assert attrs["00091001"].get("privateCreator") == "ACME CAMERA 1" and attrs["00091001"].get("keyword") is None
    [item] = attrs["00082218"]
    assert item.get("number") == "1" and item[0].get("keyword") == "CodeValue" and item[0][0].text == "85562004"
    assert len(attrs["00081030"]) == 0 and [v.text for v in attrs["00280030"]] == ["0.5", "0.5"]


def test_the_served_objects_still_pass_dciodvfy(gw, archive, served, tmp_path):  # noqa: F811
    """Nothing here changes what an object is: the instance served after the new routes are used still validates."""
    require_tool("dciodvfy", "dicom3tools")
    a1 = archive["a1"]
    base = f"{SERIES_1}/instances/{a1.SOPInstanceUID}"
    served.get(f"{base}/rendered", params={"annotation": "patient", "window": "128,256,linear"}, headers=mi(gw))
    [(_, body)] = parts(served.get(base, headers={**mi(gw), "Accept": DICOM_TS_ANY}))
    (tmp_path / "after.dcm").write_bytes(body)
    dicom_tools_check(tmp_path / "after.dcm")


def test_each_image_of_a_set_is_annotated_with_its_own_patient(gw, archive, served):  # noqa: F811
    """The served image is exactly the stored preview with these lines burned in: Ann Jones's, not the other patient's."""
    from gateway.dicomweb import pixels

    r = served.get("/dicomweb/studies/1.2.826.0.1.3/rendered", params={"annotation": "patient"},
                   headers={**mi(gw), "Accept": 'multipart/related; type="image/png"'})
    [(_, body)] = parts(r)
    [b1] = previews(gw, archive["b1"].SOPInstanceUID)  # made by that first asking
    expected = pixels.rendered(b1, "image/png", None, None, None, ["JONES, Ann  born 03 Feb 1980", f"NHS {OTHER_NHS}"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(Image.open(io.BytesIO(expected))))


def test_metadata_of_an_object_with_a_value_its_vr_cannot_hold_leaves_that_attribute_out(gw, fx, tmp_path, caplog):
    """A camera's DS written wrongly ("abcdef", a decimal comma), kept by ingest as received: DICOM JSON carries DS
    as numbers, and pydicom's error made the study's /metadata a 500, so no viewer could open it. Now that
    attribute alone is left out (logged by its tag, never its value), in JSON and XML."""
    add_patient(gw)
    path = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "odd.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                           SliceThickness="7.7777", PixelSpacing="0.5\\0.5", SpacingBetweenSlices="3.25")
    raw = path.read_bytes()
    assert raw.count(b"7.7777") == 1 and raw.count(b"3.25") == 1
    path.write_bytes(raw.replace(b"7.7777", b"abcdef").replace(b"3.25", b"3,25"))
    stored = ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(path)]))
    [photo] = stored.photos
    base = f"/dicomweb/studies/{photo.study_uid}/series/{photo.series_uid}/instances/{photo.sop_instance_uid}"
    with serving(create_app(gw)) as web:
        meta = web.get(f"{base}/metadata", headers=mi(gw))
        assert meta.status_code == 200, meta.text
        [instance] = meta.json()
        assert "00180050" not in instance and "00180088" not in instance  # SliceThickness, SpacingBetweenSlices
        assert instance["00280030"]["Value"] == [0.5, 0.5] and instance["00100020"]["Value"] == [objects.NHS_NUMBER]
        study = web.get(f"/dicomweb/studies/{photo.study_uid}/metadata",
                        headers={**mi(gw), "Accept": 'multipart/related; type="application/dicom+xml"'})
        assert study.status_code == 200 and b"00180050" not in study.content and b"00280030" in study.content
    assert "(0018,0050) left out" in caplog.text and "abcdef" not in caplog.text
