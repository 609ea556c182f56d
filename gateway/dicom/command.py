"""DIMSE command sets written straight from the primitive, byte for byte as pynetdicom writes them, and a response's
read straight into its primitive.

pynetdicom turns each primitive into a message holding its command set as a pydicom Dataset (every element the
message type may carry, then those the primitive leaves empty deleted), writes it once to learn the group length and
again to send it: ~0.6 ms of Python a message here. That is paid on every C-STORE sub-operation of a C-GET and on
every C-FIND match, while the peer waits. A command set is a handful of short elements of a few value
representations in Implicit VR Little Endian (PS3.7 6.3.1, E.1): written here in ~20 us. A value this does not
write (an Offending Element list, non-ASCII text) returns None, and pynetdicom writes that message as before.

Reading is the same the other way. pynetdicom decodes every command set it receives into a pydicom Dataset and copies
it element by element into the primitive: 0.1 ms in a loop here, 0.3-0.5 ms traced in the gateway, on each C-STORE
response of a C-GET between one photo and the next. A response with no data set whose values are all numbers, UIDs
and AE titles is read here instead (~15 us); anything else is left to pynetdicom.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom.dimse_messages import (  # pynetdicom's own tables
    _COMMAND_SET_KEYWORDS,
    _DATASET_KEYWORDS,
    _MESSAGE_TYPES,
    _MSG_TO_PRIMITVE,
)

from gateway.core.objects.text import words

_ELEMENT = struct.Struct("<HHI")  # group, element, value length (implicit VR)
_COMPUTED = {"CommandGroupLength", "CommandField", "CommandDataSetType"}
HAS_DATA_SET, NO_DATA_SET = 0x0001, 0x0101

# message class name (C_STORE_RQ) -> its Command Field and its elements [(keyword, element number, VR)] in tag order
_LAYOUTS: dict[str, tuple[int, list[tuple[str, int, str]]]] = {}
# Command Field of a response -> the primitive class and {element number: (keyword, VR)} of its command set
_RESPONSES: dict[int, tuple[type, dict[int, tuple[str, str]]]] = {}
for _field, (_name, _cls) in _MESSAGE_TYPES.items():
    _elements = []
    for _keyword in _COMMAND_SET_KEYWORDS[_name]:
        _tag = tag_for_keyword(_keyword)
        assert _tag is not None and _tag >> 16 == 0, _keyword
        _elements.append((_keyword, _tag & 0xFFFF, dictionary_VR(_tag)))
    _LAYOUTS[_cls.__name__] = (_field, sorted(_elements, key=lambda e: e[1]))
    if _field & 0x8000:
        _primitive_class = _MSG_TO_PRIMITVE[_cls.__name__[:_cls.__name__.rfind("_R")]]
        _RESPONSES[_field] = (_primitive_class, {e: (k, vr) for k, e, vr in _elements})


def _value(vr: str, value: Any) -> bytes | None:
    if vr == "US" and type(value) is int and 0 <= value <= 0xFFFF:
        return value.to_bytes(2, "little")
    if vr == "UL" and type(value) is int and 0 <= value <= 0xFFFFFFFF:
        return value.to_bytes(4, "little")
    if vr in ("UI", "AE", "LO", "ST", "SH", "CS") and isinstance(value, str) and value.isascii():
        raw = value.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        return raw
    return None


def command_set(message_class: str, primitive: Any) -> bytes | None:
    """The command set of the message `message_class` (C_STORE_RQ, C_FIND_RSP, ...) for `primitive`, encoded; None when
    some value is not one written here."""
    layout = _LAYOUTS.get(message_class)
    if layout is None:
        return None
    data_keyword = _DATASET_KEYWORDS.get(message_class)
    # as pynetdicom decides it: the message type may carry one, and the primitive has one (a BytesIO, even empty)
    has_data_set = data_keyword is not None and bool(getattr(primitive, data_keyword, None))
    field, elements = layout
    out = bytearray(12)  # the group length element, filled in last
    for keyword, element, vr in elements:
        if keyword == "CommandGroupLength":
            continue
        if keyword == "CommandField":
            value: Any = field
        elif keyword == "CommandDataSetType":
            value = HAS_DATA_SET if has_data_set else NO_DATA_SET
        else:
            if not hasattr(primitive, keyword):
                return None  # pynetdicom would send the element empty: left to it
            value = getattr(primitive, keyword)
            if value is None:
                continue
        raw = _value(vr, value)
        if raw is None:
            return None
        out += _ELEMENT.pack(0, element, len(raw))
        out += raw
    _ELEMENT.pack_into(out, 0, 0, 0, 4)
    struct.pack_into("<I", out, 8, len(out) - 12)
    return bytes(out)


def _read(vr: str, raw: bytes) -> int | str | None:
    if vr == "US" and len(raw) == 2:
        return int.from_bytes(raw, "little")
    if vr == "UL" and len(raw) == 4:
        return int.from_bytes(raw, "little")
    if vr in ("UI", "AE") and raw and raw.isascii() and b"\\" not in raw:
        # as pydicom reads them: a UID's trailing NUL (or space) padding dropped, an AE title's spaces both sides
        text = raw.decode("ascii").rstrip("\0 ") if vr == "UI" else raw.decode("ascii").strip(" ")
        return text or None
    return None


def response_of(command: bytes) -> Any | None:
    """The primitive of a response message (C-STORE-RSP, C-FIND-RSP, ...) from its encoded command set, as
    pynetdicom's message_to_primitive() makes it; None for a request, a response with a data set, or a value not read
    here (pynetdicom decodes those)."""
    values: dict[int, bytes] = {}
    at, end = 0, len(command)
    while at < end:
        if end - at < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(command, at)
        at += 8
        if group != 0 or length > end - at or element in values:
            return None
        values[element] = command[at:at + length]
        at += length
    field, data_set_type = values.get(0x0100, b""), values.get(0x0800, b"")
    if len(field) != 2 or data_set_type != NO_DATA_SET.to_bytes(2, "little"):
        return None
    response = _RESPONSES.get(int.from_bytes(field, "little"))
    if response is None:
        return None
    primitive_class, layout = response
    primitive = primitive_class()
    for element, raw in values.items():
        if element == 0x0000:
            if raw != (end - 12).to_bytes(4, "little"):  # the group length: what follows it
                return None
            continue
        spec = layout.get(element)
        if spec is None:
            return None
        keyword, vr = spec
        if keyword in _COMPUTED:
            continue
        value = _read(vr, raw)
        if value is None:
            return None
        if hasattr(primitive, keyword):
            try:
                setattr(primitive, keyword, value)
            except (TypeError, ValueError):  # a value the primitive refuses: pynetdicom's decode reports it its way
                return None
    return primitive


COMMENT_MAX = 64  # ErrorComment is LO


def error_comment(text: str) -> str:
    """`text` as ErrorComment holds it: cut at a word, not in the middle of one (objects.text.words), and ASCII (a
    command set has no Specific Character Set: the default repertoire, PS3.7 6.3.1); other characters become '?'."""
    return words(text.encode("ascii", "replace").decode("ascii"), COMMENT_MAX)
