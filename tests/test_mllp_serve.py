"""`clinphoto serve` opens the MLLP door on CLINPHOTO_MLLP_PORT and shuts it down cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from gateway.hl7.mllp import frame
from store.db import Database
from store.models import Hl7Message
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


def test_serve_listens_for_mllp_and_stops_gracefully(database_url, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update({"CLINPHOTO_DATA_DIR": str(tmp_path), "CLINPHOTO_DATABASE_URL": database_url,
                "CLINPHOTO_MLLP_PORT": str(port), "CLINPHOTO_LISTENERS": '["mllp"]'})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        framed = tmp_path / "a01.mllp"
        framed.write_bytes(frame((ROOT / "fixtures" / "hl7" / "adt_a01_admit.hl7").read_bytes()))
        res = subprocess.run([str(MLLP_SEND), "--port", str(port), "--file", str(framed), "127.0.0.1"],
                             capture_output=True, timeout=60)
        assert b"MSA|AA|A01-0001" in res.stdout, res.stdout + res.stderr
        # and the command README documents, as an operator runs it beside the gateway (the port from its settings)
        res = subprocess.run([sys.executable, "-m", "gateway.cli", "hl7", "send", "fixtures/hl7/adt_a08_update.hl7"],
                             cwd=ROOT, env=env, capture_output=True, timeout=60)
        assert res.returncode == 0 and b"MSA|AA|A08-0001" in res.stdout, res.stdout + res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "MLLP listening on" in out and "SMITH" not in out and "9449305552" not in out
    db = Database(database_url)
    with db.read() as s:
        assert s.execute(select(Hl7Message.status)).scalars().all() == ["applied", "applied"]
    db.dispose()
