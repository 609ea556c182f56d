"""DIMSE command sets written straight from the primitive, byte for byte as pynetdicom writes them.

pynetdicom turns each primitive into a message holding its command set as a pydicom Dataset (every element the
message type may carry, then those the primitive leaves empty deleted), writes it once to learn the group length and
again to send it: ~0.6 ms of Python a message here. That is paid on every C-STORE sub-operation of a C-GET and on
every C-FIND match, while the peer waits. A command set is a handful of short elements of a few value
representations in Implicit VR Little Endian (PS3.7 6.3.1, E.1): written here in ~20 us. A value this does not
write (an Offending Element list, non-ASCII text) returns None, and pynetdicom writes that message as before.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS, _DATASET_KEYWORDS, _MESSAGE_TYPES  # pynetdicom's own tables

_ELEMENT = struct.Struct("<HHI")  # group, element, value length (implicit VR)
_COMPUTED = {"CommandGroupLength", "CommandField", "CommandDataSetType"}
HAS_DATA_SET, NO_DATA_SET = 0x0001, 0x0101

# message class name (C_STORE_RQ) -> its Command Field and its elements [(keyword, element number, VR)] in tag order
_LAYOUTS: dict[str, tuple[int, list[tuple[str, int, str]]]] = {}
for _field, (_name, _cls) in _MESSAGE_TYPES.items():
    _elements = []
    for _keyword in _COMMAND_SET_KEYWORDS[_name]:
        _tag = tag_for_keyword(_keyword)
        assert _tag is not None and _tag >> 16 == 0, _keyword
        _elements.append((_keyword, _tag & 0xFFFF, dictionary_VR(_tag)))
    _LAYOUTS[_cls.__name__] = (_field, sorted(_elements, key=lambda e: e[1]))


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
