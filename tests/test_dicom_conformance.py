"""`clinphoto dicom conformance` describes what the DICOM door negotiates: every SOP class and transfer syntax the
listener registers, every matching key the C-FIND door reads."""

from __future__ import annotations

import subprocess
import sys

from gateway.dicom import find
from gateway.dicom.listener import DicomListener


def test_the_statement_names_what_the_listener_supports(gw, tmp_path):
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "dicom", "conformance"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={"CLINPHOTO_AE_TITLE": "PHOTOS", "PATH": "/usr/bin:/bin",
                                                          "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)})
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "Application Entity PHOTOS" in text
    listener = DicomListener(gw, "127.0.0.1", 0)
    for context in listener.ae.supported_contexts:
        assert context.abstract_syntax in text, context.abstract_syntax
        for syntax in context.transfer_syntax:
            assert syntax in text, (context.abstract_syntax, syntax)
    for key in find.MATCHING:
        assert key in text


def test_the_statement_says_whether_this_ae_speaks_tls(tmp_path):
    def conformance(**env: str) -> str:
        run = subprocess.run([sys.executable, "-m", "gateway.cli", "dicom", "conformance"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env={**env, "PATH": "/usr/bin:/bin",
                                                            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)})
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert "BCP 195" in conformance() and "This AE, as configured: no TLS." in conformance()
    secured = conformance(CLINPHOTO_DICOM_TLS_CERT="/etc/clinphoto/node.pem", CLINPHOTO_DICOM_TLS_CLIENT_CA="/etc/clinphoto/ca.pem")
    assert "This AE, as configured: TLS, peer certificates required." in secured
