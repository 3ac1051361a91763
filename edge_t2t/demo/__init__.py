"""Demo: synthetic aerial scenes with exact ground truth, and the demo run."""
