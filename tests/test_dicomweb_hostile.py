"""The DICOMweb door against hostile requests, over a real socket, both backends: numbers that str.isdigit() took but
int() or the database did not (500s), frame lists that multiplied one frame into gigabytes, multipart boundaries
past python-multipart's limit, bodies read on after an early refusal, and POST to /dicomweb/studies/."""

from __future__ import annotations

import pytest

from gateway.http.numbers import NotANumber, whole_number
from tests.auth_helpers import auth_headers
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)
from tests.test_dicomweb import mi, parts, web  # noqa: F401 (the fixture)
from tests.test_http_body_limits import PUSH_MAX, refused_then_pushed

SUPERSCRIPT_TWO = "\u00b2"  # '²': str.isdigit() says True, int() refuses it
ARABIC_THREE = "\u0663"  # '٣': int() reads it as 3
LONG = "9" * 5000  # past int()'s 4,300-digit guard


def test_whole_number_takes_ascii_digits_in_range_only():
    assert whole_number("0", "n") == 0 and whole_number("007", "n") == 7
    assert whole_number("9223372036854775807", "n") == 2**63 - 1
    for text in (SUPERSCRIPT_TWO, ARABIC_THREE, " 7", "1_000", "+1", "-1", "1e3", "", LONG, "9223372036854775808"):
        with pytest.raises(NotANumber):
            whole_number(text, "n")
    with pytest.raises(NotANumber, match=r"n='9999.*\(5000 characters\): must be a whole number from 1 to 5"):
        whole_number(LONG, "n", low=1, high=5)


def _base(archive) -> str:  # noqa: F811
    return f"/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances/{archive['a1'].SOPInstanceUID}"


def test_numbers_in_the_url_are_ascii_digits_in_range_or_400(gw, archive, web):  # noqa: F811
    h = mi(gw)
    for params in ({"limit": SUPERSCRIPT_TWO}, {"offset": SUPERSCRIPT_TWO}, {"offset": "1e30"}, {"offset": "9223372036854775808"},
                   {"offset": LONG}, {"limit": LONG}, {"offset": ARABIC_THREE}, {"offset": "1000000001"}, {"limit": " 5"}):
        r = web.get("/dicomweb/studies", params=params, headers=h)
        assert r.status_code == 400 and "whole number" in r.json()["detail"], (params, r.status_code, r.text[:200])
        assert len(r.text) < 1000  # the 5,000 digits are not echoed whole
    # a limit past the most one page holds is answered with that many, as PS3.18 lets a server do
    assert web.get("/dicomweb/studies", params={"limit": "9223372036854775807"}, headers=h).status_code == 200
    assert web.get("/dicomweb/studies", params={"offset": "1000000000"}, headers=h).json() == []
    base = _base(archive)
    for url, params in ((f"{base}/rendered", {"viewport": f"{SUPERSCRIPT_TWO},{SUPERSCRIPT_TWO}"}),
                        (f"{base}/rendered", {"quality": SUPERSCRIPT_TWO}), (f"{base}/rendered", {"viewport": f"{LONG},{LONG}"}),
                        (f"{base}/rendered", {"viewport": "65536,100"}), (f"{base}/rendered", {"viewport": "100"}),
                        (f"{base}/thumbnail", {"viewport": f"{SUPERSCRIPT_TWO},1"}), (f"{base}/frames/1/rendered", {"quality": "101"}),
                        (f"{base}/rendered", {"quality": "101"})):
        r = web.get(url, params=params, headers={**h, "Accept": "image/jpeg"})
        words = "width and height in pixels" if "viewport" in params else "quality="
        assert r.status_code == 400 and words in r.json()["detail"] and "whole number" in r.text, (url, params, r.status_code, r.text[:200])
        assert len(r.text) < 1000
    big = web.get(f"{base}/rendered", params={"viewport": "65535,65535"}, headers={**h, "Accept": "image/jpeg"})
    assert big.status_code == 200 and big.headers["content-type"] == "image/jpeg"


def test_a_frame_list_holds_each_of_the_instances_frames_at_most_once(gw, archive, web):  # noqa: F811
    """/frames/1,1,... in a 60 KB URL was answered with the one frame 30,000 times: 3.66 GB from a 122 KB frame."""
    h = {**mi(gw), "Accept": 'multipart/related; type="image/jpeg"'}
    base = _base(archive)
    assert len(parts(web.get(f"{base}/frames/1", headers=h))) == 1
    for frames, status, words in (("1,1", 400, "more than once"), (",".join(["1"] * 20_000), 400, "more than once"),
                                  ("1,2", 404, "does not exist"), (f"1,{SUPERSCRIPT_TWO}", 400, "frame numbers"),
                                  (ARABIC_THREE, 400, "frame numbers"), (LONG, 400, "frame numbers"), ("0", 400, "frame numbers"),
                                  ("1,", 400, "frame numbers"), ("9223372036854775808", 400, "frame numbers")):
        for url in (f"{base}/frames/{frames}", f"{base}/frames/{frames}/rendered"):
            r = web.get(url, headers=h)
            assert r.status_code == status and words in r.json()["detail"], (url[:200], r.status_code, r.text[:200])
            assert len(r.content) < 1000


def test_a_stow_boundary_longer_than_the_parser_takes_is_400_saying_so(gw, web):  # noqa: F811
    """python-multipart raises from its constructor past 256 bytes: a 500 until the door checked it first. (Orthanc's
    73-character boundary, over RFC 2046's 70, is taken: test_dicomweb_orthanc.)"""
    for boundary, words in (("b" * 257, "257 characters"), ('""', "no boundary")):
        body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nx\r\n--{boundary}--\r\n".encode()
        r = web.post("/dicomweb/studies", content=body, headers={
            **mi(gw), "Accept": "application/dicom+json", "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    assert gw.spool.files() == []


def test_stow_refused_before_its_body_is_read_ends_the_connection(gw, web):  # noqa: F811
    """An unauthenticated client declaring 50 GB was answered 401 and then pushed ~35 GB in 8 s, all read on the event
    loop: the edge's rule for other paths did not cover /dicomweb/studies. Each early refusal now says Connection:
    close and the server reads no more than its socket buffers hold (the client's writes fail long before 64 MiB)."""
    stow_type = 'multipart/related; type="application/dicom"; boundary=b'
    ok = {"Accept": "application/dicom+json", "Content-Type": stow_type}
    viewer = auth_headers(gw, role="privacy-officer", sub="po.smith")  # may not upload
    many = 50 * 1024**3
    for url in ("/dicomweb/studies", "/dicomweb/studies/1.2.3"):
        for headers, status in (({**ok}, 401), ({**viewer, **ok}, 403), ({**mi(gw), **ok, "Accept": "text/html"}, 406),
                                ({**mi(gw), **ok, "Content-Type": "application/dicom"}, 415),
                                ({**mi(gw), **ok, "Content-Type": stow_type.replace("=b", "=" + "b" * 300)}, 400),
                                ({**mi(gw), **ok}, 413)):
            got, head, pushed = refused_then_pushed(web, "POST", url, headers, many)
            assert pushed < PUSH_MAX, (url, status, pushed)
            assert got == status and b"connection: close" in head, (url, status, head)


def test_a_trailing_slash_is_answered_as_the_url_without_it_not_redirected(gw, archive, web):  # noqa: F811
    """POST /dicomweb/studies/ was a 307: the client had to send its body again (one that streams it cannot)."""
    h = mi(gw)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--b--\r\n"
    stow_headers = {**h, "Accept": "application/dicom+json", "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    for url in ("/dicomweb/studies/", "/dicomweb/studies/1.2.826.0.1.1/"):
        slash = web.post(url, content=body, headers=stow_headers)
        plain = web.post(url.rstrip("/"), content=body, headers=stow_headers)
        assert slash.status_code == plain.status_code == 400 and slash.json().keys() == plain.json().keys(), (url, slash.text)
    assert web.post("/dicomweb/studies/", content=body, headers={"Content-Type": stow_headers["Content-Type"]}).status_code == 401
    for url in ("/dicomweb/studies/", "/dicomweb/studies/1.2.826.0.1.1/series/"):
        slash = web.get(url, headers=h)
        assert slash.status_code == 200 and slash.json() == web.get(url.rstrip("/"), headers=h).json(), (url, slash.status_code)
