"""Query: a text (or image) query in, ranked images out."""
