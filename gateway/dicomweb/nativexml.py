"""The Native DICOM Model (PS3.19 A.1) as XML, for clients of QIDO-RS and /metadata that ask for
`multipart/related; type="application/dicom+xml"` (PS3.18 8.7.3, F.3).

Written from the DICOM JSON this door already builds (PS3.18 F.2; the two models carry the same content, F.3 maps
one onto the other), so the XML can never say something the JSON does not. pydicom writes JSON but has no XML writer,
and the model is small enough that a writer over xml.etree is clearer than a dependency; dcmtk's `dcm2xml -nat`
(the tests compare with it) is a program, not a library the gateway could call per request."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
MEDIA = "application/dicom+xml"
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _attributes(parent: ET.Element, data: dict[str, Any]) -> None:
    for tag in sorted(data, key=lambda t: int(t, 16)):
        element = data[tag]
        vr = element.get("vr", "UN")
        attr = ET.SubElement(parent, "DicomAttribute", {"tag": tag.upper(), "vr": vr})
        number = int(tag, 16)
        group, element_number = number >> 16, number & 0xFFFF
        if group & 1:
            # a private element names its creator (PS3.19 A.1.5), the value of (gggg,00xx) for block xx
            block = element_number >> 8
            creator = (data.get(f"{group:04X}00{block:02X}") or {}).get("Value") or []
            if block and creator:
                attr.set("privateCreator", str(creator[0]))
        else:
            keyword = keyword_for_tag(number)
            if keyword:
                attr.set("keyword", keyword)
        if "BulkDataURI" in element:
            ET.SubElement(attr, "BulkData", {"uri": str(element["BulkDataURI"])})
        elif "InlineBinary" in element:
            ET.SubElement(attr, "InlineBinary").text = str(element["InlineBinary"])
        for n, value in enumerate(element.get("Value") or [], start=1):
            if vr == "SQ":
                item = ET.SubElement(attr, "Item", {"number": str(n)})
                _attributes(item, value or {})
            elif vr == "PN":
                _person_name(attr, n, value or {})
            else:
                node = ET.SubElement(attr, "Value", {"number": str(n)})
                if value is not None:
                    node.text = str(value)


def _person_name(attr: ET.Element, n: int, value: dict[str, str]) -> None:
    name = ET.SubElement(attr, "PersonName", {"number": str(n)})
    for group in _PN_GROUPS:
        text = value.get(group)
        if not text:
            continue
        node = ET.SubElement(name, group)
        for component, part in zip(_PN_COMPONENTS, text.split("^"), strict=False):
            if part:
                ET.SubElement(node, component).text = part


def document(data: dict[str, Any]) -> bytes:
    """One data set (DICOM JSON) as a NativeDicomModel document, UTF-8."""
    root = ET.Element("NativeDicomModel", {"xmlns": NAMESPACE, "xml:space": "preserve"})
    _attributes(root, data)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
