"""STOW-RS of DICOM JSON metadata with image bulk data, attacked, both backends: a malformed data set fails on its own
(0xC000), never a 500; a request refused whole (400, 413) has stored nothing, and one answered per instance stored
exactly what it says; the sender's UIDs and value lengths are checked as a Part 10 object's are (one check, in the
core); the instances one request may hold are bounded; a BulkDataURI names exactly one part. Every test looks at what
is stored (assets, orphaned blobs, spool files) as well as the answer."""

from __future__ import annotations

import json

from pydicom import Dataset
from sqlalchemy import select

from store.integrity import check_store
from store.models import Asset
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient
from tests.test_dicomweb import stow, web  # noqa: F401 (the fixture)
from tests.test_dicomweb_stow_metadata import JSON, SERIES, metadata, photo

UID_ERROR = "is missing or not a valid UID"


def post(web, gw, items: list[dict]):  # noqa: F811
    """The data sets with an image each, as their BulkDataURIs name them (where the data set, spoilt, still does)."""
    uris = [item["7FE00010"].get("BulkDataURI") if isinstance(item.get("7FE00010"), dict) else None for item in items]
    images = [("image/jpeg", photo(i), {"Content-Location": uri}) for i, uri in enumerate(uris) if isinstance(uri, str)]
    return stow(web, gw, [(JSON, json.dumps(items).encode(), {}), *images], part_type=JSON)


def stored(gw) -> set[str]:
    with gw.db.read() as s:
        return set(s.scalars(select(Asset.sop_instance_uid)))


def assert_clean(gw) -> None:
    """No blob without its asset, no asset without its blobs, no spool file left."""
    report = check_store(gw.db, gw.blobs)
    assert report.clean, report.summary()
    assert not gw.spool.files()


def failures(r) -> dict[str, tuple[int, str]]:
    answer = Dataset.from_json(r.json())
    return {f.ReferencedSOPInstanceUID: (f.FailureReason, f[0x00000902].value) for f in answer.get("FailedSOPSequence", [])}


def referenced(r) -> list[str]:
    return [i.ReferencedSOPInstanceUID for i in Dataset.from_json(r.json()).get("ReferencedSOPSequence", [])]


def part10(tmp_path, fx, sop: str, **keys: str) -> bytes:
    return objects.img2dcm(fx["baseline_420.jpg"], tmp_path / f"{sop}.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS",
                           StudyInstanceUID="1.2.826.0.8.2", SeriesInstanceUID="1.2.826.0.8.2.1", SOPInstanceUID=sop,
                           **keys).read_bytes()


def test_a_malformed_data_set_fails_on_its_own_never_500(gw, web):  # noqa: F811
    add_patient(gw)
    bad = {
        "element a string": {"00080016": "x"},
        "Value not an array": {"00080016": {"vr": "UI", "Value": 5}},
        "PixelData a string": {"7FE00010": "p"},
        "unknown VR": {"00081030": {"vr": "QQ", "Value": ["x"]}},
        "no VR": {"00081030": {"Value": ["x"]}},
        "not a tag": {"zz": {"vr": "LO", "Value": ["x"]}},
        "object in LO": {"00081030": {"vr": "LO", "Value": [{"a": 1}]}},
        "PN a string": {"00081070": {"vr": "PN", "Value": ["Lens^Ann"]}},
        "US a string": {"00280010": {"vr": "US", "Value": ["x"]}},
        "item not an object": {"00082218": {"vr": "SQ", "Value": ["x"]}},
        "UI a number": {"0020000D": {"vr": "UI", "Value": [5]}},
        "bad base64": {"00091010": {"vr": "OB", "InlineBinary": "!!!"}},
        "URI not a string": {"7FE00010": {"vr": "OB", "BulkDataURI": 5}},
    }
    items = [metadata(f"{SERIES}.6{i}") for i in range(len(bad))]
    for item, extra in zip(items, bad.values()):
        item.update(extra)
    r = post(web, gw, items)
    assert r.status_code == 400, r.text  # every instance failed for what the request said
    failed = failures(r)
    for i, name in enumerate(bad):
        reason, comment = failed[f"{SERIES}.6{i}"]
        assert reason == 0xC000 and comment.startswith("not a DICOM JSON data set"), (name, comment)
    assert len(failed) == len(bad) and not stored(gw)
    # beside a good one: it is stored, the bad one is not (202)
    r = post(web, gw, [metadata(f"{SERIES}.1"), items[0]])
    assert r.status_code == 202 and referenced(r) == [f"{SERIES}.1"] and list(failures(r)) == [f"{SERIES}.60"], r.text
    assert stored(gw) == {f"{SERIES}.1"}
    # JSON that is not a data set or an array of them is the request's fault: 400, saying so
    for body in (b"5", b'["x"]', b"[[]]", b"null"):
        r = stow(web, gw, [(JSON, body, {}), ("image/jpeg", photo(1), {"Content-Location": "p"})], part_type=JSON)
        assert r.status_code == 400 and "DICOM JSON data set or an array of them" in r.text, (body, r.text)
    assert stored(gw) == {f"{SERIES}.1"}
    assert_clean(gw)


def test_a_request_refused_whole_has_stored_nothing(gw, web, fx, tmp_path):  # noqa: F811
    """Every check of the request as a whole comes before the first instance is stored: a Part 10 part before a
    metadata part that is not JSON, is not data sets, or is too large, is not stored behind a 400 or 413."""
    from gateway.dicomweb.stow import MAX_JSON_PART

    add_patient(gw)
    dicom = ("application/dicom", part10(tmp_path, fx, "1.2.826.0.8.2.1.1"), {})
    image = ("image/jpeg", photo(1), {"Content-Location": f"photo-{SERIES}.1"})
    good = metadata(f"{SERIES}.1")
    big = json.dumps([good, metadata(f"{SERIES}.2", **{"00081030": {"vr": "LO", "Value": ["x" * MAX_JSON_PART]}})]).encode()
    for body, status in ((b"{not json", 400), (json.dumps([good, 5]).encode(), 400), (big, 413)):
        r = stow(web, gw, [dicom, (JSON, body, {}), image], part_type=JSON)
        assert r.status_code == status, r.text
        assert not stored(gw), status
    # a data set that fails on its own fails alone, answered so: the rest is stored and said to be (202)
    r = stow(web, gw, [dicom, (JSON, json.dumps([good, {**metadata(f"{SERIES}.3"), "00080016": "x"}]).encode(), {}), image],
             part_type=JSON)
    assert r.status_code == 202, r.text
    assert set(referenced(r)) == {"1.2.826.0.8.2.1.1", f"{SERIES}.1"} and list(failures(r)) == [f"{SERIES}.3"]
    assert stored(gw) == {"1.2.826.0.8.2.1.1", f"{SERIES}.1"}
    assert_clean(gw)


def test_the_senders_uids_and_value_lengths_are_checked_as_a_part10_objects_are(gw, web, fx, tmp_path):  # noqa: F811
    add_patient(gw)
    bad_uids = {"../../x": "00080018", "1.2.3?x=1#y": "00080018", "1.2.3 4": "00080018", "1.02.3": "00080018",
                "1." + "2" * 200: "00080018", "<script>alert(1)</script>": "0020000D", "1." * 3000: "0020000E"}
    items = []
    for i, (uid, tag) in enumerate(bad_uids.items()):
        item = metadata(f"{SERIES}.7{i}")
        item[tag] = {"vr": "UI", "Value": [uid]}
        items.append(item)
    too_long = {  # the element, what the ErrorComment says
        "00081030": ({"vr": "LO", "Value": ["A" * 100_000]}, "StudyDescription: 100000 characters, over LO's 64"),
        "00204000": ({"vr": "LT", "Value": ["B" * 5_000_000]}, "ImageComments: 5000000 characters, over LT's 10240"),
        "00080070": ({"vr": "LO", "Value": ["ok", "C" * 65]}, "Manufacturer: 65 characters, over LO's 64"),
        "00081070": ({"vr": "PN", "Value": [{"Alphabetic": "D" * 65}]}, "OperatorsName: 65 characters, over PN's 64"),
        "00082218": ({"vr": "SQ", "Value": [{"00080104": {"vr": "LO", "Value": ["E" * 65]}}]}, "CodeMeaning: 65 characters, over LO's 64"),
    }
    items += [metadata(f"{SERIES}.8{i}", **{tag: element}) for i, (tag, (element, _)) in enumerate(too_long.items())]
    r = post(web, gw, items)
    assert r.status_code == 400, r.text[:300]  # every instance failed for what the request said
    failed = failures(r)
    assert len(failed) == len(items), failed
    for i, (uid, tag) in enumerate(bad_uids.items()):
        sop = uid if tag == "00080018" else f"{SERIES}.7{i}"
        reason, comment = failed[sop]
        keyword = {"00080018": "SOPInstanceUID", "0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID"}[tag]
        assert reason == 0xA900 and comment.startswith(f"{keyword} is missing or not a valid"), (uid[:20], comment)
    for i, (_, said) in enumerate(too_long.values()):
        assert failed[f"{SERIES}.8{i}"] == (0xC000, said)
    assert not stored(gw)
    # the study a URL gives a data set that leaves its own out: checked by the core as the data set's own would be
    no_study = {k: v for k, v in metadata(f"{SERIES}.9").items() if k != "0020000D"}
    r = stow(web, gw, [(JSON, json.dumps([no_study]).encode(), {}), ("image/jpeg", photo(9), {"Content-Location": f"photo-{SERIES}.9"})],
             part_type=JSON, url="/dicomweb/studies/1.02.3")
    assert r.status_code == 409 and failures(r)[f"{SERIES}.9"] == (0xA900, "StudyInstanceUID is missing or not a valid UID ('1.02.3')")
    # the same check, the same words, as a Part 10 object with the same UID gets
    r = stow(web, gw, [("application/dicom", part10(tmp_path, fx, "1.02.3"), {})])
    assert failures(r)["1.02.3"] == (0xA900, failed["1.02.3"][1]) and UID_ERROR in failed["1.02.3"][1]
    assert not stored(gw)
    assert_clean(gw)


def test_the_instances_one_request_may_hold_are_bounded_before_any_is_read(gw, web, fx, tmp_path):  # noqa: F811
    """MAX_PARTS bounds parts; one metadata part held 10,000 data sets (28.6 s of the gateway's time). Data sets and
    Part 10 parts together are bounded the same, refused 413 before the first is stored."""
    from gateway.dicomweb.stow_json import MAX_INSTANCES

    add_patient(gw)
    items = [metadata(f"{SERIES}.{i}") for i in range(MAX_INSTANCES + 1)]
    r = stow(web, gw, [(JSON, json.dumps(items).encode(), {}), ("image/jpeg", photo(1), {"Content-Location": f"photo-{SERIES}.0"})],
             part_type=JSON)
    assert r.status_code == 413 and f"over {MAX_INSTANCES} instances" in r.text, r.text[:300]
    # with a Part 10 part beside them, MAX_INSTANCES data sets are one too many as well
    dicom = ("application/dicom", part10(tmp_path, fx, "1.2.826.0.8.2.1.1"), {})
    r = stow(web, gw, [dicom, (JSON, json.dumps(items[:MAX_INSTANCES]).encode(), {}),
                       ("image/jpeg", photo(1), {"Content-Location": f"photo-{SERIES}.0"})], part_type=JSON)
    assert r.status_code == 413, r.text[:300]
    assert not stored(gw)
    assert_clean(gw)


def test_a_bulk_data_uri_names_exactly_one_part(gw, web):  # noqa: F811
    add_patient(gw)

    def send(uri: str, *images: dict[str, str], sop: str = f"{SERIES}.1"):
        item = metadata(sop, **{"7FE00010": {"vr": "OB", "BulkDataURI": uri}})
        return stow(web, gw, [(JSON, json.dumps([item]).encode(), {}), *[("image/jpeg", photo(i), h) for i, h in enumerate(images)]],
                    part_type=JSON)

    cases = {
        "empty cid:": ("cid:", {}, "is empty"),
        "empty": ("", {}, "is empty"),
        "absolute URL, part by its last segment": ("http://host/p", {"Content-Location": "p"}, "names no part"),
        "last segment, part by an absolute URL": ("p", {"Content-Location": "http://host/p"}, "names no part"),
        "a location as a cid": ("cid:p", {"Content-Location": "p"}, "names no part"),
    }
    for name, (uri, headers, words) in cases.items():
        r = send(uri, headers)
        assert r.status_code == 400, (name, r.text)
        [(reason, comment)] = failures(r).values()
        assert reason == 0xC000 and words in comment, (name, comment)
    # two parts of one name: which was meant cannot be known, so neither is stored
    for headers in ({"Content-Location": "p"}, {"Content-ID": "<p@x>"}):
        uri = "p" if "Content-Location" in headers else "cid:p@x"
        r = send(uri, headers, headers)
        assert r.status_code == 400 and "two parts of the request are named" in r.text, r.text
    assert not stored(gw)
    # named exactly, it is stored
    assert send("cid:p@x", {"Content-ID": "<p@x>"}, {"Content-Location": "p@x"}).status_code == 200
    assert stored(gw) == {f"{SERIES}.1"}
    assert_clean(gw)
