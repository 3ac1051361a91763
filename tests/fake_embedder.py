"""A tiny deterministic stand-in for the ONNX embedder, for fast unit tests of store/index/search:
hashed bag of words, L2-normalised, with the same attributes the real Embedder exposes."""

from __future__ import annotations

import hashlib
import re

import numpy as np


class FakeEmbedder:
    def __init__(self, dim: int = 64, name: str = "fake-bow", max_tokens: int = 32):
        self.name = name
        self.dim = dim
        self.max_tokens = max_tokens
        self.precision = "fp32"
        self.manifest = {"name": name, "dim": dim}
        self.identity = {"name": name, "dim": dim, "weights_sha256": "0" * 64, "pooling": "mean"}
        self.truncated = 0
        self.calls = 0

    def _vec(self, text: str) -> np.ndarray:
        words = re.findall(r"[a-z0-9]+", text.lower())
        if len(words) > self.max_tokens:
            self.truncated += 1
            words = words[: self.max_tokens]
        v = np.zeros(self.dim, np.float32)
        for w in words:
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
            v[h % self.dim] += 1.0
        if not v.any():
            v[0] = 1.0
        return v / np.linalg.norm(v)

    def embed(self, texts, batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        if isinstance(texts, str):
            texts = [texts]
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
