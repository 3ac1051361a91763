"""The names a user picks from, defined once: the CLI's `choices=` and every module that checks a
value use these tuples, so a new mode is added in one place.

- DTYPES: how the vector index stores vectors (vindex; `index --dtype`, `eval --dtype`).
- VECTOR_MODES: how the vector index is searched (`search --vector-mode`, `eval --vector-mode`).
- RETRIEVAL_MODES: how an image's score is made from its texts (retrieval; `search --mode`).
- TEXT_MODES: which texts of a description are embedded (texts.variant_texts; `index --text-mode`).
- PRECISIONS: the ONNX embedder's precision (embedder; `--precision`).
- EVAL_HALVES: the two fixed halves of an annotation file's images (dataset.Annotations.half;
  `eval --half`): "tune" calibrates retrieval weights, "report" is reported.
"""

from __future__ import annotations

DTYPES = ("f32", "f16", "i8")
VECTOR_MODES = ("hnsw", "rescore", "exact")
DEFAULT_VECTOR_MODE = "rescore"
RETRIEVAL_MODES = ("dense", "lexical", "hybrid")
TEXT_MODES = ("joined", "fields", "sentences")
# One text per summary, feature and caption sentence: on held-out synthetic scenes it doubled R@1
# (0.12 -> 0.26) and raised MRR 0.29 -> 0.42 against the paper's one joined text per variant, at
# ~11x the vectors (bench/results/text_mode.md). --text-mode joined keeps the compact form.
DEFAULT_TEXT_MODE = "sentences"
PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "int8"
EVAL_HALVES = ("tune", "report")
