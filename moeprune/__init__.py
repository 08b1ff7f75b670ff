"""moeprune: make Mixture-of-Experts language models smaller.

calibrate -> plan -> apply -> save, on in-memory transformers models, plus a CLI for checkpoints.
"""

__version__ = "0.1.0"
