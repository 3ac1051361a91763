"""sha256, the project's one fingerprint: of bytes in memory, of a file (streamed), and of a large
file remembered by (path, size, mtime) so a multi-GB GGUF is read once per change, not per run.

The memo is two-level: this process's dict, then an optional persistent one (the caption cache's
`file_hashes` table), so a fully cached `caption` run re-reads no model file."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed in 1 MiB blocks so multi-GB GGUF files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class HashMemo(Protocol):
    """A persistent memo of file hashes (captions.CaptionCache is one)."""

    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def remember(self, path: str, size: int, mtime_ns: int, digest: str) -> None: ...


_MEMO: dict[tuple[str, int, int], str] = {}
_MEMO_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike, memo: HashMemo | None = None) -> str:
    """sha256 of a (large) file, remembered by (resolved path, size, mtime_ns) in this process and,
    when given, in `memo`; a changed size or mtime is a miss."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    with _MEMO_LOCK:
        digest = _MEMO.get(key)
    if digest is None and memo is not None:
        digest = memo.lookup(*key)
    if digest is None:
        digest = sha256_file(resolved)
        if memo is not None:
            memo.remember(*key, digest)
    with _MEMO_LOCK:
        _MEMO[key] = digest
    return digest
