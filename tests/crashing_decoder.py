"""A renderer worker (deferred.Renderer's `worker`) that dies as a crashing native decoder would, on one photo only:
importable by name, as a worker process must find it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gateway.core.ingest import received

POISON_ROWS = 97  # the photo this worker dies on: its height


def crash_on_poison(obj: received.Received, settings: Any, tmp_dir: Path) -> received.Renditions:
    if obj.rows == POISON_ROWS:
        os._exit(70)  # no exception, no cleanup: the process is gone, as after a segfault
    return received.renditions(obj, settings, tmp_dir)
