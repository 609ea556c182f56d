"""The DICOM Conformance Statement (PS3.2 layout), generated from what the code supports: the SOP classes the
listener registers and their roles, the transfer syntaxes, the query keys per level the C-FIND door reads and
returns, the association policies and character sets. Nothing here is typed by hand that the code also says."""

from __future__ import annotations

from pydicom.uid import UID

from gateway.core.ingest.received import SOP_CLASSES, TRANSFER_SYNTAXES
from gateway.dicom import commitment, find, retrieve
from gateway.dicom import tls as tls_module
from gateway.dicom.pdata import MAX_COMMAND_BYTES, MAX_IN_MEMORY_DATA_SET
from gateway.dicom.pdu_in import MAX_PDU_LENGTH
from gateway.dicom.reactor import MAX_REPORTS_AT_ONCE

VERIFICATION = "1.2.840.10008.1.1"
QUERY_MODELS = {
    find.MODALITY_WORKLIST_FIND: "Modality Worklist Information Model - FIND",
    find.PATIENT_ROOT_FIND: "Patient Root Query/Retrieve Information Model - FIND",
    find.STUDY_ROOT_FIND: "Study Root Query/Retrieve Information Model - FIND",
    retrieve.PATIENT_ROOT_GET: "Patient Root Query/Retrieve Information Model - GET",
    retrieve.STUDY_ROOT_GET: "Study Root Query/Retrieve Information Model - GET",
    retrieve.PATIENT_ROOT_MOVE: "Patient Root Query/Retrieve Information Model - MOVE",
    retrieve.STUDY_ROOT_MOVE: "Study Root Query/Retrieve Information Model - MOVE",
}
def _name(uid: str) -> str:
    return UID(uid).name if UID(uid).is_valid else uid


def statement(ae_title: str, port: int, *, idle_timeout: float, max_associations: int, tls: bool = False,
              tls_client_ca: bool = False) -> str:
    lines = [
        "DICOM Conformance Statement: clinphoto clinical photo gateway",
        "=" * 64,
        "",
        "1 Overview",
        f"  Application Entity {ae_title}, port {port}: an archive for clinical photographs. It stores photographic",
        "  objects, answers queries and retrieves under the gateway's access policy (consent, sensitivity, need to",
        "  know) for the identity each calling AE is configured as, and audits every query and retrieve.",
        "",
        "2 Networking: SOP classes",
        f"  {'SOP class':<58} {'UID':<32} SCU  SCP",
        f"  {_name(VERIFICATION):<58} {VERIFICATION:<32} no   yes",
    ]
    for uid in SOP_CLASSES:
        lines.append(f"  {_name(uid) + ' Storage' if 'Storage' not in _name(uid) else _name(uid):<58} {uid:<32} yes* yes")
    for uid, name in QUERY_MODELS.items():
        lines.append(f"  {name:<58} {uid:<32} no   yes")
    lines.append(f"  {_name(commitment.STORAGE_COMMITMENT):<58} {commitment.STORAGE_COMMITMENT:<32} yes  no")
    lines += [
        "  * as SCU only within C-GET (on the requestor's association) and C-MOVE (to the destination), and when",
        "    routing new photos to a configured destination.",
        "",
        "3 Transfer syntaxes (storage, for every storage SOP class; objects are kept and sent as received)",
    ]
    lines += [f"  {name:<40} {uid}" for uid, name in TRANSFER_SYNTAXES.items()]
    lines += [
        "  Query/retrieve and verification: " + ", ".join(f"{_name(uid)} ({uid})" for uid in find.QUERY_SYNTAXES) + ".",
        "  Retrieve and routing send each object in its stored transfer syntax whenever the peer accepted it; a",
        "  peer that accepted only Explicit or Implicit VR Little Endian gets the pixels decoded (colour as RGB, the",
        "  SOP Instance UID kept, Lossy Image Compression as stored); one that accepted neither gets that",
        "  sub-operation counted as failed.",
        "",
        "4 Association policies",
        "  Only configured peers (auth.dicom_peers): calling AE title and source address are both checked; an",
        "  unknown AE title or a known one from another address is rejected (A-ASSOCIATE-RJ, permanent, reason 3),",
        "  a wrong called AE title with reason 7. Each peer is allowed services (echo, store, find, get, move);",
        "  the C-MOVE presentation contexts are accepted only from a peer allowed move (rejected, abstract syntax",
        "  not supported, for the others). A query, retrieve or store a peer is not allowed is refused with 0x0124",
        "  and audited.",
        f"  TCP_NODELAY on every association. Maximum PDU length received: {MAX_PDU_LENGTH} bytes (a longer",
        f"  P-DATA-TF is aborted). A command set over {MAX_COMMAND_BYTES} bytes, or an identifier or other",
        f"  non-image data set over {MAX_IN_MEMORY_DATA_SET} bytes, aborts the association, as do more than",
        f"  {MAX_REPORTS_AT_ONCE} N-EVENT-REPORTs pipelined (sent before the earlier are answered).",
        f"  At most {max_associations} associations at once (CLINPHOTO_DICOM_MAX_ASSOCIATIONS); one more is rejected",
        "  as transient, local limit exceeded (A-ASSOCIATE-RJ, result 2, source 3, reason 2). An association with",
        f"  nothing received for {idle_timeout:g} s after the last answer (CLINPHOTO_DICOM_IDLE_TIMEOUT) is aborted;",
        "  a request being served, however long (a C-MOVE to a slow destination), does not count as idle.",
        f"  A PDU must arrive whole within {idle_timeout:g} s of its first byte, and a peer must take some of what is",
        f"  sent to it every {idle_timeout:g} s (a C-GET or C-MOVE destination too); else the connection is closed.",
        "",
        "5 C-STORE SCP",
        "  Objects are filed under the patient PatientID + IssuerOfPatientID name in the patient index (an unknown",
        "  patient: 0xC000, or quarantine if configured). Success only after the object is committed. Statuses:",
        "  0x0000 success; 0x0122 SOP class not supported; 0x0124 not authorized; 0xA700 out of resources (too",
        "  large, or try again); 0xA900 data set does not match SOP class; 0xC000 cannot understand. Failures carry",
        "  an ErrorComment. A data set is written to disk as it arrives, up to ingest.max_bytes: one that grows",
        "  past it is not kept (what came is dropped as the rest arrives) and is refused with 0xA700.",
        "  Checked before the answer: SOP class, transfer syntax, the pixel description, size limits, and the frame's",
        "  own header (JPEG, JPEG-LS, RLE) against Rows/Columns/SamplesPerPixel, a JPEG frame also for its end. The",
        "  pixels are decoded for the preview and thumbnail after the answer (ingest.received_renditions); a frame",
        "  damaged inside is then kept as sent, marked and audited (with 'before-answer', refused with 0xC000).",
        "",
        "6 C-FIND SCP: levels PATIENT (Patient Root), STUDY, SERIES, IMAGE. Matching keys:",
    ]
    lines += [f"  {key:<22} {how}" for key, how in {**find.MATCHING, **find.MATCHING_UNHELD}.items()]
    lines.append("  StudyDate is the study's at every level (when its first visible photo was taken), and at STUDY level")
    lines.append("  ModalitiesInStudy and the counts are the whole study's, whatever the keys matched.")
    lines.append("  Return keys, by level (any other key asked for is returned empty):")
    lines += [f"  {level:<8} {', '.join(keys)}" for level, keys in find.RETURN_KEYS.items()]
    lines += [
        "  Statuses: 0xFF00 pending, 0xFE00 cancelled, 0x0000 success, 0xA900 identifier does not match SOP class,",
        "  0x0124 not authorized.",
        "",
        "  Modality Worklist: the patient index's current encounters as photography steps (Modality XC; a Modality",
        "  key, a value or a wildcard, naming another modality finds none), matched",
        "  by PatientID (+ IssuerOfPatientID), PatientName (as C-FIND), ScheduledProcedureStepLocation or",
        "  CurrentPatientLocation (wildcards), ScheduledProcedureStepStartDate (range; the admission date) with",
        "  ScheduledProcedureStepStartTime (combined with the date as one date-time range; not without a date:",
        "  0xA900) and ScheduledPerformingPhysicianName (the attending clinician, wildcards, case as sent), under",
        "  the need-to-know rule. Steps are for any station: ScheduledStationAETitle is answered as the one asked",
        "  for, or the calling AE's. StudyInstanceUID is the study the encounter's photos are filed in (the same",
        "  for an upload), so a camera's photos join it.",
        "",
        "7 C-GET and C-MOVE SCP: any level of either root; C-MOVE only to configured peers with a port (0xA801",
        "  otherwise), and only the instances the destination's own identity may see as well. The identifier",
        "  names what is retrieved by its level's unique key, one value or a UID list",
        "  (" + ", ".join(f"{level} {key}" for level, key in retrieve.UNIQUE_KEY.items()) + "):",
        "  without it, empty or with a wildcard, the retrieve is refused with 0xA900.",
        "  Sub-operation counts as PS3.4 C.4.2/C.4.3. Pending responses (optional) go at most once per",
        "  CLINPHOTO_DICOM_PENDING_INTERVAL seconds (1 by default) during the retrieve; the final response carries",
        "  the counts.",
        "",
        "7a Routing and Storage Commitment (push model, SCU): new photos the routing rules match are sent by C-STORE",
        "  to the destination, from a durable outbox (retries with doubling waits, dead after the configured tries).",
        "  For a destination routed with storage_commitment, the photos one association delivered are named in one",
        "  N-ACTION (Action Type 1, the well-known instance 1.2.840.10008.1.20.1.1) under a new Transaction UID. The",
        "  N-EVENT-REPORT (Event Type 1 or 2) is accepted on that association or on one the destination opens to this",
        "  AE (SCP/SCU role selection accepted); only items sent to that peer under that Transaction UID are settled.",
        "  A Failed SOP Sequence item, or no report within commitment_timeout_seconds, sends the photo again.",
        "",
        "8 Character sets: responses are ISO_IR 192 (UTF-8); received objects are kept in whatever they declare.",
        "",
        "9 Security: every query and retrieve is filtered by the policy for the peer's configured purpose of use,",
        "  sensitivities and specialties, and audited (DCM 110112 Query, 110104 DICOM Instances Transferred, 110107",
        "  Import, 110113 Security Alert for rejected associations).",
        "  Secure transport: the BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9: TLS 1.2 or later)",
        "  when the listener has a certificate (CLINPHOTO_DICOM_TLS_CERT): TLS only on its port then, and with",
        "  CLINPHOTO_DICOM_TLS_CLIENT_CA a peer must present a certificate that CA signed. Peers configured with tls",
        "  are reached over TLS (C-MOVE, routing), their certificate checked against their tls_ca and host name,",
        "  and shown this AE's certificate. A TLS handshake must be done within "
        f"{tls_module.HANDSHAKE_TIMEOUT:g} s of connecting.",
        f"  This AE, as configured: {'TLS' if tls else 'no TLS'}"
        + (", peer certificates required." if tls and tls_client_ca else "."),
    ]
    return "\n".join(lines) + "\n"
