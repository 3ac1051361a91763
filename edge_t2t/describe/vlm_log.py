"""llama.cpp's last warning and error lines, kept for the error messages of the VLM modules.

The adapter (vlm.py) silences llama.cpp's log and routes its warnings and errors here; the adapter
and the parallel path (vlm_parallel.py) add the tail to their errors. It lives in a module of its
own so that both read it without importing each other.
"""

from __future__ import annotations

import collections

TAIL: collections.deque[str] = collections.deque(maxlen=20)


def clear() -> None:
    """Forget earlier lines: called before each llama.cpp call whose errors may quote the log."""
    TAIL.clear()


def hint() -> str:
    """The last lines as a suffix for an error message ("" when llama.cpp said nothing)."""
    lines = [x for x in TAIL if x]
    return f" (llama.cpp said: {' | '.join(lines[-3:])})" if lines else ""
