"""Bytes a connection's peer has not taken yet, for the doors' send timeouts (HTTP's, MLLP's)."""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios


def unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes written that the peer has not taken: in the transport's buffer and in the kernel's send queue. The
    kernel's counts too: with ~4 MiB queued there (loopback) an HTTP client reading 1.3 MB/s left the transport's last
    32 KiB unmoved for over a second, as the kernel wakes a writer only once a third of its queue is free. Over TLS the
    ciphertext in the socket transport's own buffer is not seen: a one-off step of about its high-water mark (64 KiB),
    where the TLS layer stops writing to it until the peer takes some."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if size and sock is not None and hasattr(termios, "TIOCOUTQ"):
        try:
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return size
