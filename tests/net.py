"""Ports for servers the tests start as real processes."""

from __future__ import annotations

import socket
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
