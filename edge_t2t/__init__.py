"""edge-t2t: offline text-to-text retrieval of remote-sensing images.

A GGUF vision-language model (through llama.cpp) writes structured descriptions of each image,
an ONNX text embedder puts descriptions and queries in one space, and an image scores for a query
by the maximum cosine over its description variants (after the TRSLLaVA paper).
"""

__version__ = "0.1.0"


def embed(texts, batch_size: int = 32, precision: str = "int8"):
    """Embed texts with the default embedder: (n, dim) float32, L2-normalised rows."""
    from .embedder import embed as _embed

    return _embed(texts, batch_size=batch_size, precision=precision)
