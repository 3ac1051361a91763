"""Errors a user can cause. The CLI prints them on one line and exits non-zero;
anything else that escapes is a bug and keeps its traceback."""

import sys


def warn(msg: str) -> None:
    """A warning a user should see: one line on stderr, with the prefix of the CLI's errors."""
    print(f"edge-t2t: {msg}", file=sys.stderr)


class EdgeT2TError(Exception):
    """Base class: the message names the file involved and the fix."""

    exit_code = 2


class ModelError(EdgeT2TError):
    """A model file (GGUF, ONNX, manifest) is missing, corrupt or of the wrong kind."""


class NoVLMError(ModelError):
    """No VLM is configured at all (no --vlm, no $EDGE_T2T_VLM, nothing in models/vlm): fine for a
    command whose images are all described already. Any other ModelError (two GGUFs to choose
    from, a missing file named on purpose) is a mistake to report."""


class ImageError(EdgeT2TError):
    """An image could not be read or decoded."""


class InputError(EdgeT2TError):
    """A user-supplied file (captions, annotations, text list) is malformed."""


class StoreError(EdgeT2TError):
    """An index directory is missing, locked, inconsistent or built with another embedder."""


class ClusterError(EdgeT2TError):
    """A Dask scheduler cannot be reached, a worker refuses the work, or the cluster extra is missing."""


class GPUError(ModelError):
    """The GPU cannot do what was asked: out of its memory, a driver too old, no device. It stops the
    run (every further image would fail the same way); the message names the fix, and what was
    finished is kept."""
