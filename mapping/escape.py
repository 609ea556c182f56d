"""HL7 v2 escape sequences (v2.5 chapter 2.7).

Hand-written because it sits on the hot path and neither hl7apy nor python-hl7
decode \\Xhh\\ in the message's own character set.
"""

from __future__ import annotations

import re


class EscapeError(ValueError):
    """An \\Xhh\\ escape whose bytes are not valid in the message's character set."""


def unescape(value: str, field: str, comp: str, rep: str, esc: str, sub: str, charset: str = "utf-8") -> str:
    """Decode \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ and \\.br\\; drop formatting-only sequences (\\H\\ \\N\\ \\.sp\\ ...)."""
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != esc:
            j = value.find(esc, i)
            if j < 0:
                out.append(value[i:])
                break
            out.append(value[i:j])
            i = j
            continue
        end = value.find(esc, i + 1)
        if end < 0:  # unterminated: keep literally, losing nothing
            out.append(value[i:])
            break
        seq = value[i + 1 : end]
        i = end + 1
        if seq == "F":
            out.append(field)
        elif seq == "S":
            out.append(comp)
        elif seq == "T":
            out.append(sub)
        elif seq == "R":
            out.append(rep)
        elif seq == "E":
            out.append(esc)
        elif seq == ".br":
            out.append("\n")
        elif seq[:1] == "X" and len(seq) > 1:
            try:
                data = bytes.fromhex(seq[1:])
            except ValueError:
                out.append(esc + seq + esc)
                continue
            try:
                out.append(data.decode(charset))
            except UnicodeDecodeError:
                # strict: a U+FFFD stored under an AA would silently lose what the sender meant
                raise EscapeError(f"a hex escape holds bytes that are not valid {charset}") from None
        elif seq in ("H", "N") or seq[:1] in ("C", "M", "Z") or seq[:1] == ".":
            # highlighting, character-set switches, local and formatting commands carry no text
            continue
        else:
            out.append(esc + seq + esc)
    return "".join(out)


def escape(value: str, field: str = "|", comp: str = "^", rep: str = "~", esc: str = "\\", sub: str = "&") -> str:
    """Escape delimiters in free text (ACK texts, messages we build)."""
    if not value:
        return value
    if (field not in value and comp not in value and rep not in value and esc not in value and sub not in value
            and "\r" not in value and "\n" not in value):
        return value  # the usual case (an application name, a short note): no per-character pass
    out = []
    table = {field: "F", comp: "S", rep: "R", esc: "E", sub: "T"}
    for ch in value:
        code = table.get(ch)
        if code is not None:
            out.append(f"{esc}{code}{esc}")
        elif ch == "\r" or ch == "\n":
            out.append(f"{esc}.br{esc}")
        else:
            out.append(ch)
    return "".join(out)


_CTRL = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: str) -> str:
    """Control characters out of text that goes into a log line or an ACK."""
    return _CTRL.sub("?", value)
