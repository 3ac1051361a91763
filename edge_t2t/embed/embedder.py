"""The ONNX text embedder: tokenise with `tokenizers`, run the encoder with onnxruntime, return
L2-normalised float32 vectors in input order.

Tokenisation follows sentence-transformers, not the shipped tokenizer.json: that file pads every
input to a fixed 128 and truncates at 128, while sentence-transformers pads each batch to its
longest member and truncates at max_seq_length (256 for all-MiniLM-L6-v2). We turn the fixed
padding off, truncate at the manifest's max_tokens, and pad per batch ourselves.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import config
from ..errors import ModelError


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception classes onnxruntime's C++ core raises (Fail, InvalidArgument, NoSuchFile,
    InvalidProtobuf, ...). They derive from Exception directly, not from RuntimeError, so they are
    collected from the module that defines them."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception))

PRECISIONS = ("fp32", "int8")
_BUILD_HINT = "run `edge-t2t models build-embedder`"


def _load_manifest(model_dir: Path) -> dict:
    path = model_dir / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{path} is missing: no embedder is built in {model_dir}; {_BUILD_HINT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); rebuild with `edge-t2t models build-embedder --force`") from exc
    for key in ("name", "dim", "max_tokens", "pooling", "onnx", "source_weights_sha256"):
        if key not in manifest:
            raise ModelError(f"{path} lacks {key!r}; rebuild with `edge-t2t models build-embedder --force`")
    return manifest


class Embedder:
    """One ONNX session (fp32 or int8) plus its tokenizer. Not thread-safe for concurrent embed()."""

    def __init__(self, model_dir: Path | None = None, precision: str = "int8", threads: int | None = None):
        if precision not in PRECISIONS:
            raise ModelError(f"precision {precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
        self.model_dir = Path(model_dir) if model_dir is not None else config.embedder_dir()
        self.manifest = _load_manifest(self.model_dir)
        self.name: str = self.manifest["name"]
        self.dim: int = int(self.manifest["dim"])
        self.max_tokens: int = int(self.manifest["max_tokens"])
        self.precision = precision
        self.threads = threads or config.default_threads()
        # fp32 and int8 come from the same weights and give (nearly) the same vectors, so an index
        # built with one can be queried with the other: precision is not part of the identity.
        self.identity: dict = {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.manifest["source_weights_sha256"],
            "pooling": self.manifest["pooling"],
        }
        self.truncated = 0
        self._tokenizer = self._load_tokenizer()
        self._session = self._load_session()

    # -- loading ---------------------------------------------------------------------------

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{path} is missing; {_BUILD_HINT}")
        try:
            tok = Tokenizer.from_file(str(path))
        # tokenizers 0.x raises a bare Exception (no subclass) from Tokenizer.from_file for a file that
        # is not JSON, empty, binary or of the wrong shape (each tried): nothing narrower to catch.
        except Exception as exc:
            raise ModelError(f"{path} is not a valid tokenizer file ({exc}); {_BUILD_HINT} --force") from exc
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_tokens)
        return tok

    def _load_session(self):
        import onnxruntime as ort

        filename = self.manifest["onnx"].get(self.precision)
        if not filename:
            raise ModelError(f"{self.model_dir / 'manifest.json'} names no {self.precision} model; {_BUILD_HINT} --force")
        path = self.model_dir / filename
        if not path.is_file() and filename in self.manifest.get("optional_files", {}):
            raise ModelError(f"{path} is not installed: it comes in the bundle's optional archive "
                             "(dist/optional/*-optional.tar.gz); unpack it beside the bundle and install again, "
                             "or use --precision int8")  # fmt: skip
        if not path.is_file():
            raise ModelError(f"{path} is missing; {_BUILD_HINT}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # keep onnxruntime's warnings off the user's terminal
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except _onnxruntime_errors() as exc:  # e.g. InvalidProtobuf (cut or garbage file), InvalidArgument (empty)
            raise ModelError(
                f"{path} could not be loaded by onnxruntime ({type(exc).__name__}: {str(exc)[:200]}); "
                f"the file is corrupt or incomplete: {_BUILD_HINT} --force"
            ) from exc
        outputs = {o.name: o for o in session.get_outputs()}
        if "sentence_embedding" not in outputs:
            raise ModelError(f"{path} has no 'sentence_embedding' output: not built by edge-t2t; {_BUILD_HINT} --force")
        out_dim = outputs["sentence_embedding"].shape[-1]
        if isinstance(out_dim, int) and out_dim != self.dim:
            raise ModelError(
                f"{path} outputs {out_dim}-dim vectors but {self.model_dir / 'manifest.json'} says {self.dim}; "
                f"rebuild with `edge-t2t models build-embedder --force`"
            )
        self._input_names = {i.name for i in session.get_inputs()}
        return session

    # -- embedding -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (with [CLS]/[SEP], truncated at max_tokens); counts truncations."""
        encodings = self._tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=True)
        self.truncated += sum(1 for e in encodings if e.overflowing)
        return [e.ids for e in encodings]

    def _run(self, batch_ids: list[list[int]]) -> np.ndarray:
        longest = max(len(ids) for ids in batch_ids)
        input_ids = np.zeros((len(batch_ids), longest), dtype=np.int64)
        mask = np.zeros((len(batch_ids), longest), dtype=np.int64)
        for row, ids in enumerate(batch_ids):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (vectors,) = self._session.run(["sentence_embedding"], feeds)
        return vectors

    def embed(
        self, texts: Sequence[str], batch_size: int = 32, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(n, dim) float32, L2-normalised, rows in the order of `texts`.

        `progress`, if given, is called with the number of texts finished after each batch.
        """
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        ids = self.tokenize(texts)
        # Sort by length so each batch pads to a similar length; rows go back by index.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        # int8 batches too: its graph quantises activations per token row (onnx_build.quantized_linear),
        # so neither batch-mates nor padding change a text's vector.
        done = reported = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self._run([ids[i] for i in chunk])
            done += len(chunk)
            if progress is not None and (done - reported >= batch_size or done == len(order)):
                progress(done - reported)
                reported = done
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


_CACHE: dict[str, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def embed(texts: Sequence[str], batch_size: int = 32, precision: str = "int8") -> np.ndarray:
    """Embed with the default model dir, keeping one loaded Embedder per precision."""
    with _CACHE_LOCK:
        emb = _CACHE.get(precision)
        if emb is None:
            emb = _CACHE[precision] = Embedder(precision=precision)
    return emb.embed(texts, batch_size=batch_size)
