"""DICOM UIDs we make: under the configured root, or the 2.25 UUID form (PS3.5 B.2).

With root "2.25" a UID is "2.25." + the UUID as one decimal integer. Under an
organisation's own root the same 128 random (or name-derived) bits are appended as
a decimal, cut to fit the 64-character limit.
"""

from __future__ import annotations

import uuid

MAX_UID = 64
UUID_ROOT = "2.25"
_NAMESPACE = uuid.UUID("6c3b1f5e-2f6a-4f0e-9a59-636c696e7068")  # fixed: name-based UIDs stay stable across installs

IMPLEMENTATION_VERSION_NAME = "CLINPHOTO_01"


def _from_int(root: str, number: int) -> str:
    root = (root or UUID_ROOT).rstrip(".")
    room = MAX_UID - len(root) - 1
    if room < 10:
        raise ValueError(f"UID root {root!r} leaves no room for a unique suffix")
    digits = str(number)[:room]  # the leading digits of a 128-bit number: still ~10^room values
    digits = digits.lstrip("0") or "0"
    return f"{root}.{digits}"


def new_uid(root: str = UUID_ROOT) -> str:
    return _from_int(root, uuid.uuid4().int)


def stable_uid(root: str, *name: object) -> str:
    """The same UID every time for the same name (e.g. the study of one encounter)."""
    key = "|".join(str(part) for part in name)
    return _from_int(root, uuid.uuid5(_NAMESPACE, key).int)


def implementation_class_uid(root: str = UUID_ROOT) -> str:
    return stable_uid(root, "clinphoto", "implementation", IMPLEMENTATION_VERSION_NAME)


def is_valid_uid(uid: str) -> bool:
    if not uid or len(uid) > MAX_UID:
        return False
    return all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in uid.split("."))
