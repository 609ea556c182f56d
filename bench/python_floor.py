"""The floor under clinphoto's DICOM figures: servers made of the same libraries, doing nothing.

    .venv/bin/python -m bench.python_floor DICOM_PORT HTTP_PORT      # started by bench/dicom_vs_orthanc.py

A pynetdicom SCP as pynetdicom ships it (no policy, no store, no audit, nothing written to disk: objects are kept in
memory) and a FastAPI app under uvicorn, configured as `clinphoto serve` configures it, answering DICOMweb's shapes
from memory. Measured in the same run as clinphoto and Orthanc, it shows how much of a gap to Orthanc is the
Python stack's own cost on this machine (a loopback receive of a 3 MB object, PDU handling, HTTP parsing) and how much
is clinphoto's work. Where clinphoto replaced a library's own path, it can beat the floor: its DICOM door reads
PDUs and spools C-STORE data sets itself (gateway/dicom/pdu_in.py, reactor.py, spooled.py), and its C-STORE rate on
four associations has measured above this pynetdicom SCP's.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
    VLPhotographicImageStorage,
)

SYNTAXES = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

studies: dict[str, list[bytes]] = defaultdict(list)  # study UID -> Part 10 bytes as received
instances: dict[str, bytes] = {}
lock = threading.Lock()


def _study_of(encoded: bytes) -> tuple[str, str]:
    ds = dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _keep(encoded: bytes) -> None:
    study, sop = _study_of(encoded)
    with lock:
        studies[study].append(encoded)
        instances[sop] = encoded


def on_store(event: Any) -> int:
    _keep(event.encoded_dataset(include_meta=True))
    return 0x0000


def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
    answer = Dataset()
    answer.QueryRetrieveLevel = "STUDY"
    answer.PatientID = event.identifier.get("PatientID", "")
    answer.StudyInstanceUID = "1.2.3.4"
    answer.StudyDate = "20240101"
    yield 0xFF00, answer


def on_get(event: Any) -> Iterator[Any]:
    with lock:
        found = list(studies.get(str(event.identifier.get("StudyInstanceUID", "")), []))
    yield len(found)
    for encoded in found:
        yield 0xFF00, dcmread(io.BytesIO(encoded))


def on_open(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as clinphoto and the bench do


def dicom(port: int) -> None:
    ae = AE(ae_title="FLOOR")
    ae.maximum_pdu_size = 0  # as clinphoto's listener
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(VLPhotographicImageStorage, SYNTAXES, scu_role=True, scp_role=True)
    ae.require_called_aet = False
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get), (evt.EVT_ESTABLISHED, on_open)])


app = FastAPI()


@app.get("/dicomweb/studies")
def qido(PatientID: str = "") -> Response:  # noqa: N803 (DICOM's keyword)
    body = [{"00100020": {"vr": "LO", "Value": [PatientID]}, "0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}}]
    return Response(json.dumps(body), media_type="application/dicom+json")


@app.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}")
def wado(study: str, series: str, sop: str) -> Response:
    boundary = "floorboundary"
    part = instances[sop]
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@app.post("/dicomweb/studies")
async def stow(request: Request) -> Response:
    body = await request.body()
    boundary = request.headers["content-type"].split("boundary=")[1].strip('"').encode()
    for part in body.split(b"--" + boundary)[1:-1]:
        _keep(part.split(b"\r\n\r\n", 1)[1][:-2])
    return Response("{}", media_type="application/dicom+json")


def main() -> None:
    dicom_port, http_port = int(sys.argv[1]), int(sys.argv[2])
    dicom(dicom_port)
    uvicorn.run(app, host="127.0.0.1", port=http_port, log_config=None, access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
