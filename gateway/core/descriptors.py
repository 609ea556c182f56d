"""How many connections a door may hold open, given the process's open-file limit.

Every connection holds a file descriptor, and all doors draw on the one limit: a door that took every descriptor
would make accept() fail for the others and opening a blob or a database connection fail for everything.
"""

from __future__ import annotations

import logging
import resource

# kept back for the database pool, blob files, logs and the DICOM door's associations
RESERVED_DESCRIPTORS = 64


def fit_connection_limit(wanted: int, setting: str, log: logging.Logger) -> int:
    """`wanted`, lowered (with a warning naming `setting`) to half of what the open-file limit leaves beside the
    reserve: the HTTP and MLLP doors may each take that much, and no more, at once."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(1, (soft - RESERVED_DESCRIPTORS) // 2)
    if wanted > room:
        log.warning("%s %d lowered to %d: the open-file limit is %d (raise it with ulimit -n or LimitNOFILE=)",
                    setting, wanted, room, soft)
        return room
    return wanted
