"""Text sources for evaluation; the resolver lives in `moeprune.data.texts` (shared with calibration)."""

from moeprune.data.texts import load_texts

__all__ = ["load_texts"]
