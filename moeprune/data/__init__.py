"""Text data shared by calibration and evaluation: source spec strings -> documents -> token ids.

Below both `moeprune.calibration` and `moeprune.evaluation`, so neither imports the other for text.
"""

from moeprune.data.texts import encode_texts, load_texts

__all__ = ["encode_texts", "load_texts"]
