"""Small file helpers shared by every module that writes files (fingerprints: hashing.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp name beside `path`, fsync, then os.replace: readers see the old file or the
    new one, never half of either, whatever happens mid-write. The temp name is this thread's own,
    so two threads writing the same path (serve's thumbnail cache) never write into one file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
