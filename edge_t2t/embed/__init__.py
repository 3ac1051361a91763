"""Embed: the texts of a description, and the ONNX embedder that turns texts into vectors."""
