"""moeprune: make Mixture-of-Experts language models smaller.

calibrate -> plan -> apply -> save, on in-memory transformers models, plus a CLI for checkpoints.
"""

from moeprune._version import __version__

from moeprune.api import PruneResult, apply, calibrate, plan, prune, save  # noqa: E402
from moeprune.calibration.stats import ExpertStats  # noqa: E402
from moeprune.config import PruneRecipe, load_recipe  # noqa: E402
from moeprune.io.checkpoint import load_pruned  # noqa: E402
from moeprune.io.loading import load_model  # noqa: E402
from moeprune.plan import Plan  # noqa: E402

__all__ = [
    "ExpertStats", "Plan", "PruneRecipe", "PruneResult", "apply", "calibrate", "load_pruned",
    "load_model", "load_recipe", "plan", "prune", "save", "__version__",
]
