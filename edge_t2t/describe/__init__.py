"""Describe: an image in, a CaptionRecord out (the VLM, its prompts and model files, the caption cache)."""
