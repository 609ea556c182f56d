"""DICOM over TLS (PS3.15 B.9) with dcmtk's own TLS clients and servers, both backends: the listener with a
certificate speaks TLS only (echo, store and get through it, plain DICOM refused), asks peers for a certificate its
CA signed when told to, and a connection that never begins its handshake does not hold the door shut to others. Out,
C-MOVE and routing reach a `tls` peer over TLS, present our certificate, and refuse one whose certificate their CA
did not sign."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    VLPhotographicImageStorage,
)
from sqlalchemy import select

from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source, governance
from gateway.core.policy.settings import DicomPeer
from gateway.core.routing import Route
from gateway.dicom.listener import DicomListener
from gateway.dicom.router import Router
from gateway.dicom.tls import TlsSetupError
from gateway.settings import Settings
from store.models import Asset, OutboxItem
from tests import dicom_objects as objects
from tests.conftest import require_tool
from tests.ingest_helpers import add_patient
from tests.net import free_port, wait_listening
from tests.test_dicom_association import RunningListener
from tests.tls_pki import Pair, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_options(pki: Pki, pair: Pair | None = None) -> list[str]:
    """dcmtk's options for TLS with `pair` as its key and certificate (the client's by default), trusting our CA."""
    pair = pair or pki.client
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca)]


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(tool, "dcmtk"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tls_gw(gw, pki):
    gw.settings.dicom_tls_cert, gw.settings.dicom_tls_key = pki.server.cert, pki.server.key
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "store", "find", "get", "move"],
                                              sensitivities=["N", "R"])]
    add_patient(gw)
    return gw


def test_the_listener_speaks_tls_to_dcmtk_and_refuses_plain_dicom(tls_gw, pki, fx, tmp_path):
    photo = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    with RunningListener(tls_gw) as port:
        echo = dcmtk("echoscu", *tls_options(pki), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stderr
        plain = dcmtk("echoscu", "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert plain.returncode != 0  # the TLS listener takes no plain DICOM
        # a 12-MP-sized object is not needed: the fixture's photo spans many TLS records both ways
        store = dcmtk("storescu", *tls_options(pki), "-xy", "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port), str(photo))
        assert store.returncode == 0, store.stderr
        sent = pydicom.dcmread(photo)
        found = dcmtk("findscu", *tls_options(pki), "-v", "-S", "-aet", "VIEWER", "-aec", "CLINPHOTO", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"PatientID={objects.NHS_NUMBER}", "-k", "StudyInstanceUID", "127.0.0.1", str(port))
        assert found.returncode == 0 and sent.StudyInstanceUID in found.stderr + found.stdout, found.stderr
        # dcmtk's getscu has no TLS: pynetdicom's requestor gets the study (our DUL writing the object through TLS)
        received = c_get_over_tls(pki, port, sent.StudyInstanceUID)
    with tls_gw.db.read() as s:
        assert s.scalars(select(Asset.sop_instance_uid)).all() == [sent.SOPInstanceUID]
    [back] = received
    assert back.SOPInstanceUID == sent.SOPInstanceUID and back.PixelData == sent.PixelData


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


def c_get_over_tls(pki: Pki, port: int, study: str) -> list[pydicom.Dataset]:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(VLPhotographicImageStorage, [JPEGBaseline8Bit])
    context = client_context(pki)
    received: list[pydicom.Dataset] = []

    def on_store(event) -> int:
        received.append(event.dataset)
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", tls_args=(context, "127.0.0.1"),
                         ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
        statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet) if status]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    return received


def test_with_a_client_ca_only_peers_it_signed_get_in(tls_gw, pki):
    tls_gw.settings.dicom_tls_client_ca = pki.ca
    with RunningListener(tls_gw) as port:
        signed = dcmtk("echoscu", *tls_options(pki), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert signed.returncode == 0, signed.stderr
        rogue = dcmtk("echoscu", *tls_options(pki, pki.rogue), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert rogue.returncode != 0
        anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki.ca), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert anonymous.returncode != 0
        # the door stays open after the refusals
        again = dcmtk("echoscu", *tls_options(pki), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert again.returncode == 0, again.stderr


def test_a_connection_that_never_shakes_hands_does_not_hold_the_door(tls_gw, pki):
    """pynetdicom makes the handshake on the thread accepting every connection, with no timeout: one silent
    connection kept every other peer out for as long as it stayed open."""
    with RunningListener(tls_gw) as port:
        with socket.create_connection(("127.0.0.1", port)) as silent:
            time.sleep(0.2)  # accepted, its handshake waiting
            start = time.monotonic()
            echo = dcmtk("echoscu", *tls_options(pki), "-to", "10", "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port),
                         timeout=30)
            assert echo.returncode == 0, echo.stderr
            assert time.monotonic() - start < 10
            assert silent.fileno() >= 0
        # handshakes under way are bounded as associations are: past the limit a connection is closed at once
        tls_gw.settings.dicom_max_associations = 1
    with RunningListener(tls_gw) as port:
        with socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.3)  # its handshake under way
            with socket.create_connection(("127.0.0.1", port), timeout=10) as one_more:
                assert one_more.recv(1) == b""  # closed by the gateway, not left waiting


@contextmanager
def tls_storescp(pki: Pki, pair: Pair, aet: str, port: int, out: Path) -> Iterator[subprocess.Popen]:
    """dcmtk's storescp over TLS with `pair`, requiring (its default) a client certificate our CA signed."""
    out.mkdir(exist_ok=True)
    receiver = subprocess.Popen([require_tool("storescp", "dcmtk"), "+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca), "+xy",
                                 "-aet", aet, "-od", str(out), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(port, receiver)
        yield receiver
    finally:
        receiver.terminate()
        receiver.wait(10)


def test_c_move_reaches_a_tls_destination_and_not_one_our_ca_did_not_sign(tls_gw, pki, fx, tmp_path):
    photo = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ingest(tls_gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(photo)]))
    sent = pydicom.dcmread(photo)
    dest_port, rogue_port = free_port(), free_port()
    tls_gw.settings.auth.dicom_peers += [
        DicomPeer(ae_title="DEST", hosts=["127.0.0.1"], port=dest_port, allow=["echo"], tls=True, tls_ca=pki.ca),
        DicomPeer(ae_title="ROGUE", hosts=["127.0.0.1"], port=rogue_port, allow=["echo"], tls=True, tls_ca=pki.ca),
    ]

    def move(destination: str) -> list[int]:
        """C-MOVE over TLS by pynetdicom's requestor (dcmtk's movescu has no TLS): the statuses answered."""
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", tls_args=(client_context(pki), "127.0.0.1"))
        assert assoc.is_established
        try:
            query = pydicom.Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", sent.StudyInstanceUID
            return [status.Status for status, _ in assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove)
                    if status]
        finally:
            assoc.release()

    with RunningListener(tls_gw) as port:
        with tls_storescp(pki, pki.client, "DEST", dest_port, tmp_path / "dest"):
            assert move("DEST")[-1] == 0x0000
        with tls_storescp(pki, pki.rogue, "ROGUE", rogue_port, tmp_path / "rogue"):
            refused = move("ROGUE")
    [received] = list((tmp_path / "dest").iterdir())
    assert pydicom.dcmread(received).PixelData == sent.PixelData
    assert refused[-1] != 0x0000  # the association to it failed: the move did too
    assert list((tmp_path / "rogue").iterdir()) == []  # its certificate is not our CA's: nothing sent to it


def test_routing_sends_over_tls_and_records_why_a_rogue_pacs_got_nothing(gw, pki, fx, tmp_path):
    pacs_port, rogue_port = free_port(), free_port()
    gw.settings.dicom_tls_cert, gw.settings.dicom_tls_key = pki.server.cert, pki.server.key  # presented to the PACS
    gw.settings.auth.dicom_peers = [
        DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=pacs_port, allow=["echo"], tls=True, tls_ca=pki.ca),
        DicomPeer(ae_title="PACS2", hosts=["127.0.0.1"], port=rogue_port, allow=["echo"], tls=True, tls_ca=pki.ca),
    ]
    gw.settings.routing.routes = [Route(destination="PACS1"), Route(destination="PACS2")]
    add_patient(gw)
    photo = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(photo)],
                              governance=governance(specialty="330")))
    with tls_storescp(pki, pki.client, "PACS1", pacs_port, tmp_path / "pacs1"), \
            tls_storescp(pki, pki.rogue, "PACS2", rogue_port, tmp_path / "pacs2"):
        assert Router(gw).round()
    with gw.db.read() as s:
        items = {i.destination: (i.status, i.last_error) for i in s.scalars(select(OutboxItem))}
    assert items["PACS1"][0] == "delivered"
    assert items["PACS2"][0] == "pending" and "over TLS" in items["PACS2"][1]
    [received] = list((tmp_path / "pacs1").iterdir())
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(photo).SOPInstanceUID
    assert list((tmp_path / "pacs2").iterdir()) == []


def test_tls_settings_that_would_mislead_are_refused(pki, tmp_path):
    with pytest.raises(ValidationError, match="tls_ca is set but tls is not"):
        DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=104, tls_ca=pki.ca)
    with pytest.raises(ValidationError, match="dicom_tls_client_ca is set but dicom_tls_cert is not"):
        Settings(data_dir=tmp_path, dicom_tls_client_ca=pki.ca)


def test_a_certificate_or_ca_that_cannot_be_loaded_stops_the_start_naming_the_setting(gw, pki, tmp_path):
    gw.settings.dicom_tls_cert = tmp_path / "missing.crt"
    with pytest.raises(TlsSetupError, match="dicom_tls_cert .*missing.crt: No such file"):
        DicomListener(gw, "127.0.0.1", 0)
    gw.settings.dicom_tls_cert, gw.settings.dicom_tls_key = pki.server.cert, pki.server.key
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=104, tls=True, tls_ca=pki.server.key)]
    with pytest.raises(TlsSetupError, match="tls_ca of DICOM peer PACS1"):  # a key where its CA should be
        DicomListener(gw, "127.0.0.1", 0)



def test_an_encrypted_key_is_refused_naming_it_not_asked_a_passphrase_for(pki, tmp_path):
    """OpenSSL's own prompt read a passphrase from the process's terminal or stdin: at start-up, and again for each
    routing or C-MOVE association presenting our certificate. A service with none got 'Invalid argument'."""
    encrypted = tmp_path / "encrypted.key"
    run = subprocess.run([require_tool("openssl", "openssl"), "pkey", "-in", str(pki.server.key), "-aes256", "-passout", "pass:secret",
                          "-out", str(encrypted)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    script = ("import sys, types\nfrom gateway.dicom import tls\n"
              f"settings = types.SimpleNamespace(dicom_tls_cert={str(pki.server.cert)!r}, dicom_tls_key={str(encrypted)!r},"
              " dicom_tls_client_ca=None)\n"
              "try:\n    tls.server_context(settings)\nexcept tls.TlsSetupError as exc:\n    print(exc)\nelse:\n    print('loaded')\n")
    # the passphrase on stdin, as a terminal would give it
    loaded = subprocess.run([sys.executable, "-c", script], input="secret\n", capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).parent.parent)
    assert "dicom_tls_cert" in loaded.stdout and "encrypted" in loaded.stdout, (loaded.stdout, loaded.stderr)
    assert "pass phrase" not in loaded.stderr


def test_a_refused_client_certificate_is_logged_with_why(tls_gw, pki, tmp_path, caplog):
    """A certificate for servers only, which the CA signed: refused, and the log says it is not for this purpose
    (it said CERTIFICATE_VERIFY_FAILED, as for an expired one or an unknown CA's)."""
    tls_gw.settings.dicom_tls_client_ca = pki.ca
    server_only = Pair(tmp_path / "server-only.key", tmp_path / "server-only.crt")
    csr, extensions = tmp_path / "server-only.csr", tmp_path / "server-only.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    openssl = require_tool("openssl", "openssl")
    for args in (["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server-only", "-keyout", server_only.key, "-out", csr],
                 ["x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", pki.ca.with_suffix(".key"), "-CAcreateserial", "-days", "2",
                  "-extfile", extensions, "-out", server_only.cert]):
        run = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    with RunningListener(tls_gw) as port:
        refused = dcmtk("echoscu", *tls_options(pki, server_only), "-aet", "VIEWER", "-aec", "CLINPHOTO", "127.0.0.1", str(port))
        assert refused.returncode != 0
    assert any("handshake with 127.0.0.1 failed: unsuitable certificate purpose" in r.getMessage() for r in caplog.records)


def test_a_key_or_certificate_file_that_is_not_what_it_should_be_is_said_in_words(gw, pki, tmp_path):
    """OpenSSL says '[SSL] PEM lib' for each of these, and a key path that was a folder was blamed on the certificate."""
    cases = [((pki.server.cert, None), "not a PEM certificate and its private key"),  # the key is in no file
             ((pki.server.key, pki.server.key), "not a PEM certificate"),  # a key where the certificate should be
             ((pki.server.cert, tmp_path), f"dicom_tls_key {tmp_path}: is not a file"),
             ((pki.server.cert, tmp_path / "gone.key"), "dicom_tls_key .*gone.key: No such file")]
    for (cert, key), message in cases:
        gw.settings.dicom_tls_cert, gw.settings.dicom_tls_key = cert, key
        with pytest.raises(TlsSetupError, match=message):
            DicomListener(gw, "127.0.0.1", 0)
