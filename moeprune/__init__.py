"""moeprune: make Mixture-of-Experts language models smaller.

calibrate -> plan -> apply -> save, on in-memory transformers models, plus a CLI for checkpoints.
"""

import os

# Large CPU tensors on transparent huge pages (PyTorch's own allocator option, read at its first large
# allocation, so set before anything allocates): filling a layer's fused experts then faults 2 MiB
# pages instead of 4 KiB ones (~5x faster on the bench VM, `io/direct_read.py`). A value the user
# set wins; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from moeprune._version import __version__  # noqa: E402

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
