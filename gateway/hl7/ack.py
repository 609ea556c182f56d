"""ACK messages per HL7 v2 chapter 2 (original and enhanced mode)."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

from mapping.escape import escape, printable
from mapping.message import Encoding, Message, parse_path

# HL7 table 0357 texts
ERROR_TEXTS = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

_counter = itertools.count(1)
_prefix = f"{os.getpid() % 10000:04d}"


@dataclass
class AckError:
    code: str  # table 0357
    text: str
    location: str | None = None  # e.g. PID-3(2).1, MSH-12
    severity: str = "E"  # table 0516: E, F, I, W


_stamp: list = [-1, ""]  # [second, MSH-7 text]


def _timestamp() -> str:
    """MSH-7 of our ACKs, formatted once per second (strftime per message was a measurable share of an ACK)."""
    now = int(time.time())
    if now != _stamp[0]:
        _stamp[1] = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(now))
        _stamp[0] = now
    return str(_stamp[1])


def new_control_id() -> str:
    # unique per process and time; <= 20 characters (ST length of MSH-10 before v2.5)
    return f"C{int(time.time() * 1000) % 10**11:011d}{_prefix}{next(_counter) % 10000:04d}"


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (2, 5)


def _erl(location: str | None, enc: Encoding) -> str:
    """Table 0357 location as ERL: segment^sequence^field^repetition^component^subcomponent."""
    if not location:
        return ""
    try:
        seg, fld, rep, comp, sub = parse_path(location.split(" ")[0])
    except ValueError:
        try:
            seg, fld, rep, comp, sub = parse_path(location.split(" ")[0] + "-0")
        except ValueError:
            return ""
    c = enc.comp
    parts = [seg, "1", str(fld) if fld else "", str(rep) if fld else "", str(comp) if "." in location else "",
             str(sub) if location.count(".") > 1 else ""]
    return c.join(parts).rstrip(c)


# Longest echo of each MSH field into an ACK: a 5 MB MSH-10 once came back whole in the ACK and was stored twice
# (raw and ACK). Control ids past ST 199 are refused (AR 102) but still echoed whole up to 1,000 characters, so
# the sender's engine can match the refusal; beyond that nothing could match it, and the raw keeps what was sent.
ECHO_LIMITS = {3: 227, 4: 227, 5: 227, 6: 227, 10: 1000, 11: 3, 12: 60}


def header_fields(msg: Message | None, raw: bytes | None) -> dict[str, str]:
    """MSH fields to echo, from a parsed message or best effort from raw bytes whose MSH did not parse."""
    if msg is not None:
        h = msg.msh
        # printable: a control character (a NUL in MSH-10) must never go back to the sender
        return ({f"MSH-{n}": printable(h.raw(n)[:limit]) for n, limit in ECHO_LIMITS.items()}
                | {"event": printable(h.get(9, 2, decode=False)[:3])})
    out = {f"MSH-{n}": "" for n in (3, 4, 5, 6, 10, 11, 12)} | {"event": ""}
    if raw and raw.startswith(b"MSH|"):
        first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
        fields = first.split("|")
        for n, limit in ECHO_LIMITS.items():
            if len(fields) > n - 1:
                # only plain text goes back: the encoding characters themselves are unknown
                out[f"MSH-{n}"] = printable("".join(ch for ch in fields[n - 1][:limit] if ch not in "^~\\&"))
    return out


def build_ack(
    msg: Message | None,
    code: str,
    errors: list[AckError] | None = None,
    *,
    raw: bytes | None = None,
    application: str = "CLINPHOTO",
    facility: str = "",
    text: str | None = None,
) -> bytes:
    """The ACK for msg (or for raw bytes whose MSH could not be read): MSH, MSA and one ERR per error."""
    enc = msg.enc if msg is not None else Encoding()
    f, c = enc.field, enc.comp
    h = header_fields(msg, raw)
    version = h["MSH-12"].split(c)[0] if h["MSH-12"] else "2.5"
    vt = _version_tuple(version)
    event = h["event"]
    msg_type = f"ACK{c}{event}{c}ACK" if event and vt >= (2, 3, 1) else (f"ACK{c}{event}" if event else "ACK")
    now = _timestamp()
    msh = [
        "MSH", enc.comp + enc.rep + enc.esc + enc.sub,
        escape(application, *_delims(enc)), facility and escape(facility, *_delims(enc)) or h["MSH-6"],
        h["MSH-3"], h["MSH-4"], now, "", msg_type, new_control_id(), h["MSH-11"] or "P", h["MSH-12"] or "2.5",
    ]
    if msg is not None and msg.declared_charset:
        msh += ["", "", "", "", "", msg.msh.raw(18)]
    errors = errors or []
    if text is None and errors:
        text = errors[0].text
    msa = ["MSA", code, h["MSH-10"], escape(cut_words(printable(text), MSA3_LENGTH), *_delims(enc)) if text else ""]
    segments = [f.join(msh), f.join(msa).rstrip(f)]
    for e in errors:
        code_text = ERROR_TEXTS.get(e.code, "")
        s = enc.sub
        erl = _erl(e.location, enc)
        err1 = ""
        if vt < (2, 7):
            # ERR-1 (ELD) for v2.1-2.6 receivers: segment^sequence^field^code&text&HL70357
            loc = erl.split(c)
            err1 = c.join([loc[0] if loc else "", loc[1] if len(loc) > 1 else "", loc[2] if len(loc) > 2 else "",
                           s.join([e.code, code_text, "HL70357"])])
        err = ["ERR", err1, erl, c.join([e.code, code_text, "HL70357"]), e.severity, "", "", "",
               escape(printable(e.text), *_delims(enc))]
        segments.append(f.join(err))
    codec = msg.codec if msg is not None else "utf-8"
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


MSA3_LENGTH = 80  # ST 80; the whole text is in ERR-8 (and the stored error)


def cut_words(text: str, limit: int) -> str:
    """Text of at most `limit` characters, cut at a word boundary with "..." when it is longer."""
    if len(text) <= limit:
        return text
    head = text[: limit - 3]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip(" ,;:") + "..."


def _delims(enc: Encoding) -> tuple[str, str, str, str, str]:
    return enc.field, enc.comp, enc.rep, enc.esc, enc.sub
