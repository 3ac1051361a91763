"""How the vector index stores a vector of each dtype, defined once for the index (vindex), the
evaluation (`eval --dtype`) and the quantization report (quantcost).

An index of dtype D keeps each vector once in its HNSW graph (vindex.py):
- the graph holds `graph_codes(v, D)`: float32 for f32, float32 cast by usearch to float16 for
  f16 (the same values as numpy's cast, checked), and for i8 int8 codes scaled per vector so the
  largest component is +-127 and rounded. usearch stores int8 input as given (checked:
  Index(dtype="i8").get() returns the codes), and queries are encoded the same way, so `hnsw`
  mode scores are cosines between codes;
- `rescore` and `exact` modes score the float32 query against `as_exact(v, D)`: the float16 copy
  an i8 index keeps beside its graph (unless built without one: then the codes, as unit
  vectors), and the graph's own float16 / float32 values for f16 / f32.
"""

from __future__ import annotations

import numpy as np

from ..modes import DTYPES


def _check(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def graph_codes(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """What is handed to usearch. For i8 we pass int8 codes scaled per vector so the largest
    component is +-127: usearch's own cast multiplies unit vectors by 127, and a 384-d unit
    vector's components are mostly < 0.2, which wastes ~2.5 of the 8 bits. Cosine is
    scale-invariant, so only the rounding error changes (recall@10 0.95 -> 0.99 without
    re-scoring in bench/index_scale.py)."""
    _check(dtype)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if dtype != "i8":
        return vectors
    peak = np.abs(vectors).max(axis=1, keepdims=True)
    return np.round(vectors / np.maximum(peak, 1e-12) * 127).astype(np.int8)


def exact_dtype(dtype: str):
    """The numpy dtype of the exact values of a graph of `dtype`: its float16 copy (i8), its own
    values (f16, f32)."""
    _check(dtype)
    return np.float32 if dtype == "f32" else np.float16


def graph_dtype(dtype: str):
    """The numpy dtype a graph of `dtype` holds its vectors in (what usearch's get() returns)."""
    _check(dtype)
    return {"f32": np.float32, "f16": np.float16, "i8": np.int8}[dtype]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (a graph's i8 codes as the directions they stand for)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def as_exact(vectors: np.ndarray, dtype: str, exact_copy: bool = True) -> np.ndarray:
    """The vectors as `rescore`/`exact` search of an index of `dtype` scores them (float64):
    `exact_copy=False` is an i8 index built without its float16 copy (its codes, as unit vectors)."""
    if dtype == "i8" and not exact_copy:
        return unit_rows(graph_codes(vectors, dtype)).astype(np.float64)
    return np.asarray(vectors, dtype=np.float32).astype(exact_dtype(dtype)).astype(np.float64)


def as_graph(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """The vectors as the HNSW graph of an index of `dtype` holds them (float64; i8: the codes)."""
    codes = graph_codes(vectors, dtype)
    if dtype == "f16":
        codes = codes.astype(np.float16)
    return codes.astype(np.float64)
