"""A small MLLP client for people trying a feed (`clinphoto hl7 send`): messages from files, over one connection,
each sent once the previous one is acknowledged, as a PAS interface engine does.

Files hold what `fixtures/hl7/` holds: one or more unframed messages, segments ended by CR, LF or CRLF (an editor
may have changed them), each message starting with its MSH segment; a file already MLLP-framed is read by its frames.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Iterator

from gateway.hl7.mllp import START, MllpDecoder, frame

# what an ACK's MSA-1 says when the message was taken (original or enhanced mode)
ACCEPTED = ("AA", "CA")


class BadMessageFile(ValueError):
    """A file that does not hold HL7 v2 messages; the text says where."""


def split_messages(data: bytes, name: str = "input") -> list[bytes]:
    """The messages of a file, each with its segments ended by CR (the HL7 segment terminator)."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark an editor added
    if START in data:
        decoder = MllpDecoder(max_frame=len(data) + 1)
        framed, _dropped, _truncated = decoder.feed(data)
        if decoder.in_frame or not framed:
            raise BadMessageFile(f"{name}: an MLLP frame is not ended (0x1C 0x0D)")
        return framed
    messages: list[bytes] = []
    segments: list[bytes] = []
    for line in re.split(rb"\r\n|\r|\n", data):
        if not line.strip():
            continue
        if line.startswith(b"MSH"):
            if segments:
                messages.append(b"\r".join(segments) + b"\r")
            segments = []
        elif not segments and not messages:
            raise BadMessageFile(f"{name}: the first segment is {line[:3].decode('ascii', 'replace')!r}; "
                                 "a message starts with MSH")
        segments.append(line)
    if segments:
        messages.append(b"\r".join(segments) + b"\r")
    if not messages:
        raise BadMessageFile(f"{name}: no HL7 message in it")
    return messages


def exchange(host: str, port: int, messages: Iterable[bytes], timeout: float = 30.0) -> Iterator[bytes]:
    """Each message's ACK, in order, over one connection. OSError (refused, timed out, closed) ends it."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        decoder = MllpDecoder()
        for message in messages:
            sock.sendall(frame(message))
            yield _next_frame(sock, decoder)


def _next_frame(sock: socket.socket, decoder: MllpDecoder) -> bytes:
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the listener closed the connection without an ACK")
        frames, _dropped, _truncated = decoder.feed(data)
        if frames:
            return frames[0]  # one message in flight: one ACK back


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK ('AA', 'AE', 'AR', 'CA', 'CE', 'CR'), '' when it has no MSA segment."""
    separator = ack[3:4] or b"|"
    for segment in re.split(rb"\r\n|\r|\n", ack):
        if segment.startswith(b"MSA" + separator):
            fields = segment.split(separator)
            return fields[1].decode("ascii", "replace") if len(fields) > 1 else ""
    return ""
