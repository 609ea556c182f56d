"""The served header made once per stored file and patient module (gateway/core/objects/coerce.py HEADERS): the same
inputs give the kept header, any change of the patient module, the laterality or the stored file a new one, and the
cache keeps to its byte limit."""

from __future__ import annotations

import io
import os
from pathlib import Path

from pydicom import dcmread

from gateway.core.objects.coerce import HEADERS, HeaderCache, Served, coerce
from gateway.core.objects.vlphoto import PatientInfo
from tests import dicom_objects as objects


def test_a_header_is_made_once_per_file_and_patient_module(tmp_path):
    path = objects.native(tmp_path / "a.dcm", objects.gradient(8, 8))
    HEADERS.clear()
    patient = PatientInfo(patient_id="9449305552", issuer="NHS", family="Smith", given="Ann")
    first = coerce(path, patient, laterality="left")
    assert coerce(path, PatientInfo(**vars(patient)), laterality="left") is first  # equal inputs: the kept header
    renamed = coerce(path, PatientInfo(**{**vars(patient), "family": "Jones"}), laterality="left")
    assert renamed is not first and dcmread(io.BytesIO(renamed.read())).PatientName == "Jones^Ann"
    merged = coerce(path, PatientInfo(**{**vars(patient), "other_ids": [("D100001", "RX1")]}), laterality="left")
    assert dcmread(io.BytesIO(merged.read())).OtherPatientIDsSequence[0].PatientID == "D100001"
    assert coerce(path, patient, laterality="right") is not first
    # the stored file replaced (another length, another time): read again, its own bytes served
    data = path.read_bytes()
    path.write_bytes(data + b"\0\0")
    os.utime(path, ns=(1, 1))
    again = coerce(path, patient, laterality="left")
    assert again is not first and again.source_size == len(data) + 2 and again.read().endswith(b"\0\0")


def test_the_cache_keeps_to_its_byte_limit():
    cache = HeaderCache(16 * 100)
    served = [Served(bytes(100), source=Path("x"), offset=0, transfer_syntax="", sop_class_uid="",
                     sop_instance_uid="", source_size=0, tail=()) for _ in range(20)]
    for i, s in enumerate(served):
        cache.put(i, s)
    assert cache.get(0) is None and cache.get(19) is served[19]  # the oldest dropped, 16 headers of 100 bytes kept
    assert sum(cache.get(i) is not None for i in range(20)) == 16
    big = Served(bytes(101), source=Path("x"), offset=0, transfer_syntax="", sop_class_uid="", sop_instance_uid="",
                 source_size=0, tail=())
    assert cache.put("big", big) is big and cache.get("big") is None  # over a sixteenth of the limit: not kept
