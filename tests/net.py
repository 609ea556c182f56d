"""Ports for servers the tests start as real processes."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import ExitStack


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1: all held open while they are picked, so no two are the same
    (picking one at a time let the OS hand HTTP and MLLP the same port)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:`port` (a peer the test started, e.g. dcmtk's storescp):
    a fixed sleep was too short now and then on a loaded machine. Fails at once if `proc` has ended."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process meant to listen on port {port} ended (exit {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port} after {timeout:.0f} s") from None
            time.sleep(0.02)
