"""A throw-away PostgreSQL cluster for the test run, started from the installed server binaries.

So `make test` runs the PostgreSQL leg on any machine with Debian's postgresql package, exactly as in
CI, without a server to set up or a URL to export. initdb refuses to run as root (CI runs as root):
then the cluster is made and run as the `postgres` system user, in a folder it owns. The cluster
listens on 127.0.0.1 at a free port, trusts local connections (it lives for one run, in a private
temporary folder) and runs with fsync off: tests need crash safety of the gateway process, which
PostgreSQL keeps in its own memory, not of the machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
ROLE, DATABASE = "clinphoto", "clinphoto_test"


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (install Debian's postgresql package), or the cluster would not start."""


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian layout, else whatever pg_ctl is on PATH)."""
    found = sorted(glob.glob(DEBIAN_BINARIES), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if found:
        return Path(found[-1])
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayCluster:
    def __init__(self) -> None:
        self.bin = server_binaries()
        if self.bin is None or not (self.bin / "initdb").exists():
            raise ClusterUnavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="clinphoto-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and result.returncode != 0:
            raise ClusterUnavailable(f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-500:]}")
        return result

    def start(self) -> str:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off " \
                  "-c max_connections=200 -c shared_buffers=64MB"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-d", "postgres",
                        "-c", f"CREATE DATABASE {DATABASE}", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterUnavailable("the throw-away cluster did not accept connections")
            time.sleep(0.2)
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
