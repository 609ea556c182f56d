"""A STOW-RS body taken apart as it arrives (gateway/dicomweb/multipart_in.py): each part in a spool file of its own,
its digests those of its bytes, however the body is cut into chunks; a preamble skipped; a body that is not the
multipart it says refused (400 over HTTP) with nothing left in the spool. Real files, a real server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import uuid

import pydicom
import pytest

from gateway.dicomweb.multipart_in import MAX_PARTS, BadMultipart, PartsReceiver
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient
from tests.test_dicomweb import mi, multipart_body, web  # noqa: F401 (the fixture)

BOUNDARY = "b0undary-7f3a"


def body_of(parts: list[tuple[dict[str, str], bytes]], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for headers, data in parts:
        out += f"--{BOUNDARY}\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode() + epilogue


def receiver(tmp_path, part_limit: int | None = None) -> tuple[PartsReceiver, list]:
    made = []

    def new_file():
        path = tmp_path / f"part-{uuid.uuid4().hex}"
        made.append(path)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), path

    return PartsReceiver(BOUNDARY, new_file, part_limit), made


def feed(r: PartsReceiver, body: bytes, chunk: int) -> list:
    for at in range(0, len(body), chunk):
        r.feed(body[at:at + chunk])
    return r.close()


# a part whose bytes hold the delimiter's text, but not at the start of a line, and a CRLF of its own
TRICKY = os.urandom(300_000) + f"x--{BOUNDARY}\r\n".encode() + os.urandom(1000) + b"\r\n"


@pytest.mark.parametrize("chunk", [1, 7, 1000, 65536, 1 << 22])
def test_parts_arrive_whole_with_their_digest_however_the_body_is_cut(tmp_path, chunk):
    sent = [({"Content-Type": "application/dicom", "Content-Location": "a.dcm"}, TRICKY if chunk > 1 else TRICKY[-5000:]),
            ({"Content-Type": "application/dicom+json"}, b'{"00080018": {"vr": "UI"}}'),
            ({"Content-Type": "image/jpeg", "Content-ID": "<img1>"}, b"")]
    r, _ = receiver(tmp_path)
    preamble = f"a preamble naming --{BOUNDARY} mid-line\r\n".encode()
    got = feed(r, body_of(sent, preamble=preamble, epilogue=b"an epilogue"), chunk)
    assert [p.headers for p in got] == [{k.lower(): v for k, v in h.items()} for h, _ in sent]
    for part, (_, data) in zip(got, sent):
        assert part.path.read_bytes() == data and part.size == len(data)
        assert part.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("body", "says"), [
    (b"no delimiter anywhere in this body", "boundary"),
    (body_of([({"Content-Type": "application/dicom"}, b"x" * 1000)])[:-20], "close delimiter"),  # cut short
    (f"--{BOUNDARY}XX\r\n\r\n".encode(), "multipart"),  # a delimiter line that is not one
])
def test_a_body_that_is_not_the_multipart_it_says_is_refused_and_leaves_no_file(tmp_path, body, says):
    r, made = receiver(tmp_path)
    with pytest.raises(BadMultipart, match=says):
        feed(r, body, 10)
    r.discard()
    assert not [p for p in made if p.exists()]


def test_the_boundary_text_mid_line_is_no_delimiter(tmp_path):
    r, _ = receiver(tmp_path)
    # "text--b0undary..." opens no part: what follows is preamble up to the close delimiter
    assert feed(r, b"text" + body_of([({}, b"x")]), 5) == []


def test_a_receiver_discarded_mid_part_leaves_no_file(tmp_path):
    r, made = receiver(tmp_path)
    body = body_of([({"Content-Type": "application/dicom"}, b"first"), ({"Content-Type": "application/dicom"}, os.urandom(500_000))])
    r.feed(body[: len(body) // 2])  # the first part whole, the second under way
    assert len(made) == 2
    r.discard()
    assert not [p for p in made if p.exists()]


def test_stow_takes_a_chunked_body_with_a_preamble_and_refuses_a_cut_one(gw, fx, web, tmp_path):  # noqa: F811
    add_patient(gw)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "vlp.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    body, ctype = multipart_body([("application/dicom", sent.read_bytes(), {})], "application/dicom")
    headers = {**mi(gw), "Content-Type": ctype, "Accept": "application/dicom+json"}

    def chunks(data: bytes, size: int = 997):
        for at in range(0, len(data), size):
            yield data[at:at + size]

    r = web.post("/dicomweb/studies", content=chunks(b"preamble\r\n" + body), headers=headers)  # chunked transfer coding
    assert r.status_code == 200, r.text
    stored = pydicom.dcmread(gw.blobs.path(hashlib.sha256(sent.read_bytes()).hexdigest()))
    assert stored.SOPInstanceUID == pydicom.dcmread(sent).SOPInstanceUID
    r = web.post("/dicomweb/studies", content=body[:-30], headers=headers)
    assert r.status_code == 400 and "close delimiter" in r.text
    assert not gw.spool.files()


def test_a_body_of_too_many_parts_is_refused_with_413_and_leaves_no_file(gw, web):  # noqa: F811
    add_patient(gw)
    body, ctype = multipart_body([("application/dicom", b"", {})] * (MAX_PARTS + 1), "application/dicom")
    r = web.post("/dicomweb/studies", content=body, headers={**mi(gw), "Content-Type": ctype, "Accept": "application/dicom+json"})
    assert r.status_code == 413 and f"more than {MAX_PARTS} parts" in r.text
    assert not gw.spool.files()


def test_a_part_past_the_part_limit_is_counted_not_kept_while_it_arrives(tmp_path):
    """A part longer than the receiver's limit: its file is emptied as the limit is crossed and stays so while the
    rest arrives; the part is then reported with its size and not kept. The parts around it are kept whole."""
    small, big = os.urandom(50_000), os.urandom(300_000)
    r, made = receiver(tmp_path, part_limit=100_000)
    body = body_of([({"Content-Type": "application/dicom"}, small), ({"Content-Type": "application/dicom"}, big),
                    ({"Content-Type": "application/dicom"}, small)])
    on_disk = []
    for at in range(0, len(body), 7000):
        r.feed(body[at:at + 7000])
        if len(made) == 2:
            on_disk.append(os.stat(made[1]).st_size)
    got = r.close()
    assert max(on_disk) <= 100_000 and on_disk[-1] == 0
    assert [(p.kept, p.size) for p in got] == [(True, 50_000), (False, 300_000), (True, 50_000)]
    assert got[1].path.read_bytes() == b"" and got[1].sha256 == ""
    assert got[0].path.read_bytes() == small == got[2].path.read_bytes()
