"""Pending C-GET/C-MOVE responses at most once per interval (gateway/dicom/pending.py), through a real association:
a quick C-GET is answered by its final response alone, with the counts; a slow one still reports progress; an
interval of 0 gives pynetdicom's one pending response per photo."""

from __future__ import annotations

import time

import pydicom
import pytest
from pynetdicom.dimse_primitives import C_FIND, C_GET

from gateway.core.policy.settings import DicomPeer
from gateway.dicom.pending import PENDING, PendingThrottle
from tests.test_dicom_association import RunningListener
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)
from tests.test_dicom_retrieve import c_get_study

STUDY = "1.2.826.0.1.1"  # the archive's study of two photos


@pytest.fixture
def retrieving(gw, archive):  # noqa: F811
    gw.settings.auth.dicom_peers[0] = DicomPeer(ae_title="VIEWER", hosts=["127.0.0.1"], allow=["echo", "find", "get"],
                                                sensitivities=["N", "R"])
    return archive


def _get_statuses(port: int, store_delay: float = 0.0) -> list[pydicom.Dataset]:
    def on_store(event):
        time.sleep(store_delay)
        return 0x0000

    return [status for status, _ in c_get_study(port, STUDY, on_store)]


def test_a_quick_c_get_is_answered_by_its_final_response_with_the_counts(gw, retrieving):
    gw.settings.dicom_pending_interval = 30  # "quick" on a loaded machine too: the default second could pass
    with RunningListener(gw) as port:
        statuses = _get_statuses(port)
    assert [s.Status for s in statuses] == [0x0000]
    assert statuses[0].NumberOfCompletedSuboperations == 2 and statuses[0].NumberOfFailedSuboperations == 0


def test_a_slow_c_get_still_reports_progress(gw, retrieving):
    gw.settings.dicom_pending_interval = 0.05
    with RunningListener(gw) as port:
        statuses = _get_statuses(port, store_delay=0.25)  # each photo takes the requestor longer than the interval
    assert [s.Status for s in statuses] == [PENDING, PENDING, 0x0000]
    assert [s.NumberOfRemainingSuboperations for s in statuses[:2]] == [1, 0]
    assert [s.NumberOfCompletedSuboperations for s in statuses] == [1, 2, 2]


def test_an_interval_of_0_sends_a_pending_response_per_photo(gw, retrieving):
    gw.settings.dicom_pending_interval = 0
    with RunningListener(gw) as port:
        statuses = _get_statuses(port)
    assert [s.Status for s in statuses] == [PENDING, PENDING, 0x0000]


def _get_response(message_id: int, status: int) -> C_GET:
    rsp = C_GET()
    rsp.MessageIDBeingRespondedTo, rsp.Status = message_id, status
    return rsp


def test_the_throttle_counts_each_request_apart_and_leaves_other_services_alone():
    throttle = PendingThrottle(60)
    for message_id in (1, 2):
        request = C_GET()
        request.MessageID = message_id
        throttle.started(request)
    assert not throttle.should_send(_get_response(1, PENDING))  # sooner than the interval after its request
    assert not throttle.should_send(_get_response(2, PENDING))
    assert throttle.should_send(_get_response(1, 0x0000))  # a final response always goes
    assert throttle.should_send(_get_response(1, PENDING))  # request 1 ended: a later pending one is not held back
    found = C_FIND()
    found.MessageIDBeingRespondedTo, found.Status = 2, PENDING
    assert throttle.should_send(found)  # C-FIND matches are pending responses too: every one goes
