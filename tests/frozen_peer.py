"""A DICOM peer that freezes (SIGSTOP to itself) part-way, so nothing it was sent is read: run by
tests/test_dicom_stalled_peers.py as `python tests/frozen_peer.py MODE PORT [STUDY]`.

MODE c-get: a C-GET of STUDY with a small receive buffer, frozen at the first P-DATA-TF it receives, so the objects
the gateway goes on sending fill the sockets' buffers and its sends block;
MODE half-pdu: an association, then the first 100 bytes of a P-DATA-TF that says it has 1,000, then frozen;
MODE store-scp: a storage SCP (AE DEST) listening on PORT with a small receive buffer, frozen at the first P-DATA-TF
it receives (a C-MOVE destination that stops reading).
With FROZEN_PEER_TLS=CA,CERT,KEY in its environment the peer speaks TLS (DICOM over TLS, tests/test_dicom_tls_peers.py).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification, VLPhotographicImageStorage


def freeze(_event: object = None) -> int:
    print("frozen", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    return 0x0000


def small_receive_buffer(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)


def freeze_at_first_pdata(event: evt.Event) -> None:
    if event.data[:1] == b"\x04":
        freeze()


def tls_args() -> tuple[ssl.SSLContext, str] | None:
    if not os.environ.get("FROZEN_PEER_TLS"):
        return None
    ca, cert, key = os.environ["FROZEN_PEER_TLS"].split(",")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context, "127.0.0.1"


def server_tls() -> ssl.SSLContext | None:
    if not os.environ.get("FROZEN_PEER_TLS"):
        return None
    ca, cert, key = os.environ["FROZEN_PEER_TLS"].split(",")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    ae = AE(ae_title="VIEWER")
    if mode == "c-get":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(VLPhotographicImageStorage, "1.2.840.10008.1.2.4.50")
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", tls_args=tls_args(),
                             ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_CONN_OPEN, small_receive_buffer), (evt.EVT_DATA_RECV, freeze_at_first_pdata)])
        assert assoc.is_established, "no association"
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = sys.argv[3]
        for _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            pass
    elif mode == "store-scp":
        scp = AE(ae_title="DEST")
        scp.add_supported_context(VLPhotographicImageStorage, "1.2.840.10008.1.2.4.50")
        scp.start_server(("127.0.0.1", port), block=False, ssl_context=server_tls(),
                         evt_handlers=[(evt.EVT_CONN_OPEN, small_receive_buffer), (evt.EVT_DATA_RECV, freeze_at_first_pdata)])
        print("listening", flush=True)
        signal.pause()
    else:
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO", tls_args=tls_args())
        assert assoc.is_established, "no association"
        pdu = bytes([0x04, 0]) + (1000).to_bytes(4, "big")
        assoc.dul.socket.socket.sendall(pdu + b"\0" * 94)
        freeze()


if __name__ == "__main__":
    main()
