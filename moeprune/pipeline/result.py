"""What a pipeline run returns, in memory or offloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan


@dataclass
class PruneResult:
    model: nn.Module | None  # None when offloaded: the output was written layer by layer
    tokenizer: Any
    stats: ExpertStats | None  # None for calibration-free strategies (aimer)
    plan: Plan
    output: Path | None
    report: dict | None = None  # strategy auto: the candidates' comparison (moeprune_report.json)
