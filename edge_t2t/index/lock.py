"""`index.lock`: the one writer of an index directory at a time (IndexDir.open_writer takes it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import StoreError

LOCK_FILE = "index.lock"


class IndexLock:
    """`index.lock`: an exclusive `fcntl.flock` on a descriptor held for the whole run, with the
    holder's pid written inside for messages. The kernel drops the lock when its holder dies,
    however it dies, so there is no stale lock to take over and no race between two processes
    that both saw the same dead pid. The file is unlinked on release; a process that locked a file
    just unlinked (by the previous holder) notices that the path no longer names its inode and
    locks again."""

    def __init__(self, index_dir: str | os.PathLike, *, wait: bool = False, poll_s: float = 0.5):
        self.path = Path(index_dir) / LOCK_FILE
        self.wait = wait
        self.poll_s = poll_s
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> int:
        """The pid written in the lock file (0 when unknown)."""
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not self.wait:
                    pid = self.holder()
                    raise StoreError(
                        f"{self.path.parent} is being indexed by process {pid or '?'} ({self.path}): wait for it, "
                        f"or pass --wait"
                    ) from None
                time.sleep(self.poll_s)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it between our open and our lock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return

    def is_locked(self) -> bool:
        """Whether some process holds the lock now (probed with a shared lock, released at once)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no one can hold this inode yet
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
