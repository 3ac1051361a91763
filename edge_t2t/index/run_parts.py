"""What one `index` run shares between its plain images (indexer.py) and its scenes
(scene/scene_index.py): progress bars, Ctrl-C held over a commit, what the store keeps of a record
(its provenance and description hash), and which stored paths a scan covers. A module below both,
so neither imports the other's private parts.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..hashing import sha256_bytes
from ..records import CaptionRecord
from .store import PROVENANCE_COLUMNS


def record_hash(rec: CaptionRecord) -> str:
    """A short hash of a record's descriptions: a captions file is imported again only when it moved."""
    data = json.dumps([v.to_dict() for v in rec.variants], sort_keys=True).encode()
    return sha256_bytes(data)[:16]


def provenance(rec: CaptionRecord) -> dict:
    # The VLM's file paths and sha256, and the backend and device it ran on, ride in the record's
    # extra (describer.py puts them there); imported captions have none, which the store keeps as NULL.
    return {
        "model": rec.model, "mmproj": rec.mmproj, "family": rec.family, "prompt_version": rec.prompt_version,
        "test_model": rec.test_model, "constrained": rec.constrained,
        **{c: rec.extra.get(c) or None for c in PROVENANCE_COLUMNS},
    }


def under(path: str, roots: list[Path]) -> bool:
    """Whether a stored path lies in one of the scanned folders (so its file going means removal)."""
    p = Path(path)
    return p.is_absolute() and any(p == r or p.is_relative_to(r) for r in roots)


class Progress:
    """Rich progress bars on stderr, one per stage; a no-op when disabled. A stage with nothing to do
    (a total of 0, as set or shrunk) shows no bar, and the display starts with the first stage that
    has work: a re-run with nothing new prints nothing (it printed "embed 0/0")."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.started = False
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int] = {}  # each bar's total as set here (shrink lowers it)
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.bar.stop()

    def add(self, name: str, total: int) -> None:
        if self.bar:
            self.tasks[name] = self.bar.add_task(name, total=total, visible=total > 0)
            self.totals[name] = total
            if total > 0 and not self.started:
                self.bar.start()
                self.started = True

    def advance(self, name: str, n: int = 1) -> None:
        if self.bar and name in self.tasks:
            self.bar.advance(self.tasks[name], n)

    def shrink(self, name: str, n: int) -> None:
        """Lower a bar's total by `n` items that turned out to need no work in that stage."""
        if self.bar and name in self.tasks and n:
            self.totals[name] = max(0, self.totals[name] - n)
            self.bar.update(self.tasks[name], total=self.totals[name], visible=self.totals[name] > 0)


@contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is over: a batch's COMMIT and its count in the summary then
    happen together or not at all. The block is a short run of SQLite writes. Signals reach only
    the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)  # e.g. the default handler, which raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt
