"""Issue 8 (3): spooled uploads (PHI at rest) never outlive the process that received them.

Each process spools into its own folder beside an flock'ed lock file; a folder whose
lock can be taken belongs to a dead process. Start-up and `store gc` remove such
folders, `store check` reports them; a live process's spool is never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.settings import Settings
from store import spool as spool_module
from store.spool import Spool, remove_stale, stale_files
from tests.test_serve import CLI, REPO, gateway_env, wait_healthy

BOUNDARY = "spooltestboundary"


def spool_root(tmp_path) -> Path:
    return tmp_path / "var" / "spool"


def upload_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("upload-*") if p.is_file()) if root.exists() else []


def start_server(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_healthy(f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}", proc)
    return proc


def start_slow_upload(env: dict, tmp_path, first_bytes: int = 2 * 1024 * 1024) -> socket.socket:
    """A 50 MiB multipart upload of which only the first bytes are sent: the server is mid-upload."""
    from gateway.core.identity import mint_dev_token

    settings = Settings(data_dir=tmp_path / "var", database_url=env["CLINPHOTO_DATABASE_URL"])
    token = mint_dev_token(settings, sub="uploader", role="medical-illustration")
    preamble = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
    head = (f"POST /api/v1/photos HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", int(env["CLINPHOTO_HTTP_PORT"])))
    sock.sendall(head + preamble + b"\xff\xd8\xff\xe0" + b"\x11" * first_bytes)
    return sock


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def clinphoto(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def serve_env(tmp_path, database_url: str) -> dict:
    return gateway_env(tmp_path, CLINPHOTO_DATABASE_URL=database_url, CLINPHOTO_LISTENERS='["http"]')


def test_kill_9_mid_upload_leaves_a_spool_file_that_check_reports_and_restart_removes(tmp_path, database_url):
    env = serve_env(tmp_path, database_url)
    root = spool_root(tmp_path)
    server = start_server(env)
    try:
        sock = start_slow_upload(env, tmp_path)
        spooled = wait_for(lambda: [p for p in upload_files(root) if p.stat().st_size > 1024 * 1024], "the upload to spool")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        sock.close()
    finally:
        if server.poll() is None:
            server.kill()
    assert all(p.exists() for p in spooled)  # PHI at rest: exactly what the attacker found

    check = clinphoto(env, "store", "check", "--no-verify")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "stale spool file (process gone): 1" in check.stdout
    assert spooled[0].name in check.stdout

    restarted = start_server(env)
    try:
        assert upload_files(root) == []  # start-up removed the dead process's spool
        assert clinphoto(env, "store", "check", "--no-verify").returncode == 0
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0


KILLED_SPOOLER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from store.spool import Spool
    spool = Spool(Path(sys.argv[1]))
    fd, path = spool.new_file("upload-")
    os.write(fd, b"PHI " * 1000)
    print(path, flush=True)
    time.sleep(120)
""")


def killed_spooler(root: Path) -> Path:
    """A second process (a CLI import, another server) that spooled a file and was killed with SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SPOOLER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert path.is_file()
    return path


def test_gc_removes_a_dead_process_spool_and_never_a_live_one(tmp_path, database_url):
    env = serve_env(tmp_path, database_url)
    root = spool_root(tmp_path)
    server = start_server(env)
    try:
        sock = start_slow_upload(env, tmp_path)
        live = wait_for(lambda: upload_files(root), "the upload to spool")
        dead = killed_spooler(root)

        check = clinphoto(env, "store", "check", "--no-verify")
        assert check.returncode == 1 and "stale spool file (process gone): 1" in check.stdout
        assert dead.name in check.stdout and live[0].name not in check.stdout

        dry = clinphoto(env, "store", "gc", "--dry-run")
        assert dry.returncode == 0 and "would remove 0 orphan blob(s) and 1 stale spool file(s)" in dry.stdout
        assert dead.exists()
        gc = clinphoto(env, "store", "gc")
        assert gc.returncode == 0 and "removed 0 orphan blob(s) and 1 stale spool file(s)" in gc.stdout, gc.stdout
        assert not dead.exists() and not dead.parent.exists()
        assert all(p.exists() for p in live)  # the server is still receiving it
        assert clinphoto(env, "store", "check", "--no-verify").returncode == 0

        sock.close()  # the client gives up: the server removes its own spool file
        wait_for(lambda: not upload_files(root), "the server to remove the abandoned upload")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert not any(root.iterdir())  # a clean stop leaves nothing, not even its lock file


# --- the module on its own ------------------------------------------------------------------


def test_a_live_spool_is_not_stale_and_a_dead_one_is(tmp_path):
    root = tmp_path / "spool"
    mine = Spool(root)
    fd, path = mine.new_file("upload-", ".jpg")
    os.close(fd)
    assert path.parent.parent == root and path.name.startswith("upload-") and path.suffix == ".jpg"
    dead = killed_spooler(root)
    assert stale_files(root) == [dead]
    assert remove_stale(root) == [dead]
    assert path.exists() and not dead.parent.exists()
    assert stale_files(root) == []
    mine.close()
    assert not any(root.iterdir())


def test_files_left_directly_in_the_spool_folder_are_stale(tmp_path):
    root = tmp_path / "spool"
    root.mkdir()
    (root / "upload-abc123").write_bytes(b"from a version that spooled here")  # before per-process folders
    orphan = root / "1234-deadbeef"
    orphan.mkdir()
    (orphan / "upload-x").write_bytes(b"folder without its lock")
    assert sorted(p.name for p in stale_files(root)) == ["upload-abc123", "upload-x"]
    assert len(remove_stale(root)) == 2
    assert not any(root.iterdir())


def test_a_sweeper_racing_a_new_spool_never_takes_it(tmp_path, monkeypatch):
    """The lock file is created, then locked: a sweeper in between must not leave the owner with a deleted lock."""
    root = tmp_path / "spool"
    real_flock = spool_module.fcntl.flock
    swept = []

    def sweep_first(fd, operation):
        if not swept:  # the moment between the owner's create and its lock
            swept.append(None)
            swept[0] = len(remove_stale(root))
        return real_flock(fd, operation)

    monkeypatch.setattr(spool_module.fcntl, "flock", sweep_first)
    spool = Spool(root)
    fd, path = spool.new_file("upload-")
    os.close(fd)
    monkeypatch.setattr(spool_module.fcntl, "flock", real_flock)
    assert swept == [0]
    assert stale_files(root) == [] and path.exists()
    assert (root / f"{path.parent.name}.lock").exists()
    spool.close()


def test_gateway_spools_into_its_own_folder(gw):
    fd, path = gw.spool.new_file("upload-")
    os.close(fd)
    root = gw.settings.data_dir / "spool"
    assert path.parent.parent == root
    assert gw.spool.files() == [path]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
