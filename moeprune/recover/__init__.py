"""Recovery after compression: router calibration (Router KD, global and layer-local)."""
