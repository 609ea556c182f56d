"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol): 0x0B message 0x1C 0x0D."""

from __future__ import annotations

START = b"\x0b"
END = b"\x1c\x0d"


def frame(message: bytes) -> bytes:
    return START + message + END


class FrameTooLarge(Exception):
    pass


class MllpDecoder:
    """Incremental decoder: feed whatever a read returned, get whole messages back.

    Handles messages split across reads and several in one read. Bytes outside a
    frame are counted (the caller logs them) and dropped. A start byte inside an
    unfinished frame means the sender gave up on it: the partial frame is dropped.
    """

    def __init__(self, max_frame: int = 10 * 1024 * 1024) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of the open frame already searched for END

    @property
    def pending(self) -> int:
        return len(self._buf) if self._in_frame else 0

    @property
    def in_frame(self) -> bool:
        """A frame has started and not yet ended."""
        return self._in_frame

    def feed(self, data: bytes) -> tuple[list[bytes], int, int]:
        """(messages, bytes dropped outside frames, truncated frames dropped). Raises FrameTooLarge."""
        buf = self._buf
        buf += data
        messages: list[bytes] = []
        dropped = 0
        truncated = 0
        while buf:
            if not self._in_frame:
                start = buf.find(START)
                if start < 0:
                    dropped += len(buf)
                    buf.clear()
                    break
                dropped += start
                del buf[: start + 1]
                self._in_frame = True
                self._scanned = 0
                continue
            scan_from = max(0, self._scanned - 1)  # END is two bytes: it may straddle reads
            end = buf.find(END, scan_from)
            restart = buf.find(START, scan_from)
            if restart >= 0 and (end < 0 or restart < end):
                truncated += 1
                del buf[: restart + 1]
                self._scanned = 0
                continue
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > self.max_frame:
                    raise FrameTooLarge(f"MLLP frame larger than {self.max_frame} bytes")
                break
            if end > self.max_frame:
                raise FrameTooLarge(f"MLLP frame larger than {self.max_frame} bytes")
            messages.append(bytes(buf[:end]))
            del buf[: end + 2]
            self._in_frame = False
            self._scanned = 0
        return messages, dropped, truncated
