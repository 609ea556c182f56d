"""Small HL7 v2 tokenizer for the hot path.

Hand-written because building hl7apy's object tree costs ~15 ms per message;
this splits segments on CR, fields on MSH-1, and repetitions / components /
subcomponents on MSH-2, lazily, and decodes escapes only when a value is read.
tests/test_hl7_parse.py checks it against hl7apy with hypothesis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from mapping.escape import EscapeError, unescape

# HL7 table 0211 -> Python codec
CHARSETS = {
    "": None,
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
}

_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_NAMES_SEEN: set[str] = set()  # valid names met so far: a set lookup instead of a regex per segment


def _segment_name(name: str) -> bool:
    if name in _NAMES_SEEN:
        return True
    if not _SEGMENT_NAME.match(name):
        return False
    if len(_NAMES_SEEN) < 2048:  # bounded: random input must not grow it for ever
        _NAMES_SEEN.add(name)
    return True
_LINE_BREAKS = re.compile(r"\r\n|\n|\r")


class Hl7Error(Exception):
    """A message fault with its HL7 table 0357 code and location (e.g. 'PID-3')."""

    def __init__(self, code: str, text: str, location: str | None = None, *, reject: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.location = location
        # True: AR / CR (MSH, version, type); False: AE / CE
        self.reject = reject


@dataclass(frozen=True, slots=True)
class Encoding:
    field: str = "|"
    comp: str = "^"
    rep: str = "~"
    esc: str = "\\"
    sub: str = "&"

    @property
    def chars(self) -> str:
        return self.comp + self.rep + self.esc + self.sub


def _first_segment_fields(raw: bytes) -> tuple[str, list[bytes]]:
    start = raw.find(b"MSH")
    if start != 0:
        raise Hl7Error("100", "message does not start with an MSH segment", "MSH", reject=True)
    if len(raw) < 8:
        raise Hl7Error("101", "MSH segment is too short", "MSH-2", reject=True)
    sep = raw[3:4]
    end = len(raw)
    for term in (b"\r", b"\n"):
        k = raw.find(term)
        if 0 <= k < end:
            end = k
    return sep.decode("latin-1"), raw[:end].split(sep)


def detect_charset(raw: bytes, default: str = "utf-8", parts: list[bytes] | None = None) -> tuple[str, str | None]:
    """(codec, MSH-18 as sent) for raw message bytes (parts: the MSH fields, when already split)."""
    if parts is None:
        _sep, parts = _first_segment_fields(raw)
    declared = None
    if len(parts) > 17:
        first = parts[17]
        for rep_char in (b"~",):
            first = first.split(rep_char, 1)[0]
        declared = first.decode("latin-1").strip()
    if not declared:
        return default, declared
    codec = CHARSETS.get(declared.upper())
    if codec is None:
        raise Hl7Error("103", f"character set {declared!r} in MSH-18 is not supported", "MSH-18", reject=True)
    return codec, declared


class Segment:
    """One segment; fields[n] is field n (for MSH, fields[1] is MSH-1 itself)."""

    # the message's delimiters and charset, not the message: a segment pointing back at the message that holds it
    # made every parsed message a reference cycle, left for the cyclic collector (~30 objects an ADT message; its
    # collections cost ~20 us a message in the HL7 group commit, more than a third of the parse)
    __slots__ = ("name", "fields", "enc", "codec", "_reps")

    def __init__(self, name: str, fields: list[str], enc: Encoding, codec: str) -> None:
        self.name = name
        self.fields = fields
        self.enc = enc
        self.codec = codec
        self._reps: list[list[str] | None] = [None] * len(fields)

    def raw(self, n: int) -> str:
        f = self.fields
        return f[n] if n < len(f) else ""

    def repetitions(self, n: int) -> list[str]:
        cache = self._reps
        if n >= len(cache):
            return []
        reps = cache[n]
        if reps is None:
            v = self.fields[n]
            if not v:
                reps = []
            elif n <= 2 and self.name == "MSH":
                reps = [v]  # MSH-1 and MSH-2 hold the delimiters themselves
            else:
                reps = v.split(self.enc.rep)
            cache[n] = reps
        return reps

    def get(self, n: int, comp: int = 1, sub: int = 1, rep: int = 1, *, decode: bool = True) -> str:
        """Field n, repetition rep, component comp, subcomponent sub (all 1-based), escapes decoded."""
        if self.name == "MSH" and n <= 2:
            return self.raw(n) if comp == 1 and sub == 1 and rep == 1 else ""
        reps = self.repetitions(n)
        if rep > len(reps):
            return ""
        e = self.enc
        value = component(reps[rep - 1], comp, sub, e)
        return unescape(value, e.field, e.comp, e.rep, e.esc, e.sub, self.codec) if decode else value

    def __repr__(self) -> str:  # never prints patient data
        return f"<Segment {self.name} ({len(self.fields) - 1} fields)>"


def component(rep_value: str, comp: int, sub: int, enc: Encoding) -> str:
    comps = rep_value.split(enc.comp)
    if comp > len(comps):
        return ""
    subs = comps[comp - 1].split(enc.sub)
    if sub > len(subs):
        return ""
    return subs[sub - 1]


class Message:
    __slots__ = ("raw", "text", "enc", "codec", "declared_charset", "segments", "fault", "_by_name")

    def __init__(self, raw: bytes, text: str, enc: Encoding, codec: str, declared: str | None,
                 segments: list[Segment], fault: Hl7Error | None) -> None:
        self.raw = raw
        self.text = text
        self.enc = enc
        self.codec = codec
        self.declared_charset = declared
        self.segments = segments
        # a fault found while tokenizing past the MSH (bad charset bytes, a malformed segment): AE
        self.fault = fault
        by_name: dict[str, list[Segment]] = {}
        for s in segments:
            by_name.setdefault(s.name, []).append(s)
        self._by_name = by_name

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def segment(self, name: str, index: int = 0) -> Segment | None:
        found = self._by_name.get(name)
        if not found or index >= len(found):
            return None
        return found[index]

    def all(self, name: str) -> list[Segment]:
        return self._by_name.get(name, [])

    def decode(self, value: str) -> str:
        e = self.enc
        return unescape(value, e.field, e.comp, e.rep, e.esc, e.sub, self.codec)

    def get(self, path: str) -> str:
        """Value at a path such as 'PID-5.1', 'PID-3(2).4', 'MSH-9.2' (first occurrence of the segment)."""
        seg, field, rep, comp, sub = parse_path(path)
        s = self.segment(seg)
        if s is None:
            return ""
        return s.get(field, comp, sub, rep)

    # header fields used by every handler
    @property
    def control_id(self) -> str:
        return self.msh.get(10)

    @property
    def message_type(self) -> str:
        return self.msh.get(9, 1)

    @property
    def trigger_event(self) -> str:
        return self.msh.get(9, 2)

    @property
    def version(self) -> str:
        return self.msh.get(12, 1)

    def __repr__(self) -> str:
        return f"<Message {self.message_type}^{self.trigger_event} id={self.control_id!r} segments={len(self.segments)}>"


_PATH = re.compile(r"([A-Z][A-Z0-9]{2})-(\d+)(?:\((\d+)\))?(?:\.(\d+))?(?:\.(\d+))?\Z")


@lru_cache(maxsize=4096)
def parse_path(path: str) -> tuple[str, int, int, int, int]:
    """'PID-3(2).4.1' -> ('PID', 3, 2, 4, 1)."""
    m = _PATH.match(path)
    if not m:
        raise ValueError(f"not an HL7 field path: {path!r} (expected e.g. PID-5.1 or PID-3(2).4)")
    seg, field, rep, comp, sub = m.groups()
    return seg, int(field), int(rep or 1), int(comp or 1), int(sub or 1)


def parse(raw: bytes, default_charset: str = "utf-8") -> Message:
    """Tokenize one HL7 v2 message (the bytes inside an MLLP frame).

    Raises Hl7Error(reject=True) when the MSH cannot be read.
    """
    # several real senders put a UTF-8 byte-order mark before the MSH: read the message as if it were not there
    raw = raw.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n\t ")
    sep, _parts = _first_segment_fields(raw)
    if sep in ("\r", "\n") or sep.isalnum() or sep.isspace() or ord(sep) > 127:
        raise Hl7Error("102", f"MSH-1 field separator {sep!r} is not usable", "MSH-1", reject=True)
    enc_field = _parts[1].decode("latin-1") if len(_parts) > 1 else ""
    if len(enc_field) not in (4, 5):
        raise Hl7Error("102", "MSH-2 must hold 4 encoding characters (component, repetition, escape, subcomponent)",
                       "MSH-2", reject=True)
    chars = enc_field[:4]
    if len(set(chars + sep)) != 5 or any(c.isalnum() or c.isspace() or ord(c) > 127 for c in chars):
        raise Hl7Error("102", "MSH-2 encoding characters must be 4 distinct punctuation characters differing from MSH-1",
                       "MSH-2", reject=True)
    enc = Encoding(sep, chars[0], chars[1], chars[2], chars[3])
    codec, declared = detect_charset(raw, default_charset, _parts)
    fault = None
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        fault = Hl7Error("102", f"bytes at offset {exc.start} are not valid {declared or codec}", "MSH-18")
        text = raw.decode(codec, errors="replace")
    segments: list[Segment] = []
    # CR is the segment terminator; only a message with newlines needs the regex split
    lines = text.split("\r") if "\n" not in text else _LINE_BREAKS.split(text)
    for line in lines:
        if not line:
            continue
        name = line[:3]
        if not _segment_name(name) or (len(line) > 3 and line[3] != sep):
            if segments and line.strip() == "":
                continue
            where = f"segment {len(segments) + 1}"
            if not segments:
                raise Hl7Error("100", "the MSH segment is malformed", "MSH", reject=True)
            if fault is None:
                fault = Hl7Error("100", f"{where} does not start with a segment name and field separator", where)
            continue
        fields = line.split(sep)
        if name == "MSH":
            fields.insert(1, sep)
        segments.append(Segment(name, fields, enc, codec))
    if fault is None and enc.esc + "X" in text:
        fault = _hex_escape_fault(segments, enc, codec, declared)
    return Message(raw, text, enc, codec, declared, segments, fault)


def limits_fault(msg: Message, max_segments: int, max_repetitions: int) -> Hl7Error | None:
    """AE 102 for a message over the per-message limits, found before anything is mapped.

    A PID-3 with 20,000 repetitions (300 KB) once held the writer for 37 s: each identifier is a row to
    look up and write. Real ADT carries a handful of identifiers and a few dozen segments."""
    if len(msg.segments) > max_segments:
        return Hl7Error("102", f"the message has {len(msg.segments)} segments; at most {max_segments} are accepted "
                               "(setting hl7.max_segments)", f"segment {max_segments + 1}")
    rep = msg.enc.rep
    for seg in msg.segments:
        if seg.name == "MSH":
            continue
        for n, value in enumerate(seg.fields):
            if n and rep in value:  # str.count runs in C: the check stays linear in the message size
                count = value.count(rep) + 1
                if count > max_repetitions:
                    return Hl7Error("102", f"{seg.name}-{n} has {count} repetitions; at most {max_repetitions} are "
                                           "accepted (setting hl7.max_repetitions)", f"{seg.name}-{n}")
    return None


def _hex_escape_fault(segments: list[Segment], enc: Encoding, codec: str, declared: str | None) -> Hl7Error | None:
    """The first field whose \\Xhh\\ escapes are not valid in the charset: found here, where its location is known,
    rather than when a mapper reads the value. In the MSH it is a header fault (AR), elsewhere AE."""
    marker = enc.esc + "X"
    for seg in segments:
        for n, value in enumerate(seg.fields):
            if n == 0 or marker not in value or (seg.name == "MSH" and n <= 2):
                continue
            try:
                unescape(value, enc.field, enc.comp, enc.rep, enc.esc, enc.sub, codec)
            except EscapeError:
                where = f"{seg.name}-{n}"
                text = f"{where}: a hex escape holds bytes that are not valid {declared or codec}"
                if seg.name == "MSH":
                    raise Hl7Error("102", text, where, reject=True) from None
                return Hl7Error("102", text, where)
    return None
