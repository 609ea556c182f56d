"""Make user and HL7 text safe for DICOM string VRs (PS3.5 6.2).

One place for the rules: no control characters, no value separator (backslash) in
single-valued strings, no component delimiters (^ =) inside a Person Name
component, and no more than the VR's maximum length. Lengths are counted in bytes
of UTF-8 (the ISO_IR 192 encoding the builder uses for non-ASCII text; for ASCII a
byte is a character), so a value never exceeds the limit in either counting, and
truncation never splits a character.
"""

from __future__ import annotations

import unicodedata

# maximum lengths (PS3.5 Table 6.2-1)
SH, LO, PN_GROUP, ST, LT = 16, 64, 64, 1024, 10240

_SPACE_CONTROLS = "\t\n\r\f\v\x85\u2028\u2029"
# LT/ST may carry CR, LF, FF (PS3.5 6.2; TAB is not allowed: it becomes a space); ESC is left out: no code extensions
_TEXT_CONTROLS = "\n\r\f"


def _drop_controls(text: str, keep: str = "") -> str:
    out = []
    for ch in text:
        if ch in keep:
            out.append(ch)
        elif ch in _SPACE_CONTROLS:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):  # controls, lone surrogates (not encodable)
            continue
        else:
            out.append(ch)
    return "".join(out)


def clip(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8 (hence at most `limit` characters), cut on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def string(text: object, limit: int = LO) -> str:
    """One value of SH, LO (or CS-free text like them): single line, no backslash, within `limit`."""
    if text is None:
        return ""
    value = _drop_controls(str(text)).replace("\\", "/")
    return clip(" ".join(value.split()), limit).strip()


def words(text: object, limit: int = LO) -> str:
    """As string(), but a value too long is cut at a word and ends "...": an ErrorComment read by a person ("...a
    value or UID list, no" said nothing)."""
    value = string(text, 1 << 16)
    if len(value.encode("utf-8")) <= limit:
        return value
    return clip(value, limit - 3).rsplit(" ", 1)[0].rstrip(",;:") + "..."


def long_text(text: object, limit: int = LT) -> str:
    """ST/LT/UT value: backslash is allowed; only CR, LF and FF of the controls remain (TAB becomes a space)."""
    if text is None:
        return ""
    return clip(_drop_controls(str(text), keep=_TEXT_CONTROLS), limit).rstrip()


def pn_component(text: object) -> str:
    """One Person Name component: no ^ = \\ delimiters, no controls, spaces collapsed."""
    if text is None:
        return ""
    value = _drop_controls(str(text)).replace("\\", "/").replace("^", " ").replace("=", " ")
    return " ".join(value.split())


def person_name(family: object = None, given: object = None, middle: object = None, prefix: object = None,
                suffix: object = None) -> str:
    """A single-valued PN with one (alphabetic) component group of at most 64 bytes.

    Over-long names shrink from the longest component first, so a short given name
    survives an over-long family name.
    """
    comps = [clip(pn_component(c), PN_GROUP) for c in (family, given, middle, prefix, suffix)]
    while comps and not comps[-1]:
        comps.pop()
    budget = PN_GROUP - max(len(comps) - 1, 0)  # the ^ delimiters count too
    sizes = [len(c.encode("utf-8")) for c in comps]
    while sum(sizes) > budget:
        longest = max(range(len(comps)), key=lambda i: sizes[i])
        others = sorted(sizes, reverse=True)
        runner_up = others[1] if len(others) > 1 else 0
        excess = sum(sizes) - budget
        target = max(runner_up, sizes[longest] - excess, 0)
        if target >= sizes[longest]:  # tie with the runner-up: shave one byte
            target = sizes[longest] - 1
        comps[longest] = clip(comps[longest], target).rstrip()
        sizes[longest] = len(comps[longest].encode("utf-8"))
    return "^".join(comps).rstrip("^")


def is_ascii_text(value: object) -> bool:
    return str(value).isascii()
