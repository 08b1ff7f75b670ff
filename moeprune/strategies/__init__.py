"""Planning strategies: pure functions of calibration statistics (and weights for merging)."""

from moeprune.strategies.registry import available_strategies, get_strategy, plan, register_strategy

__all__ = ["available_strategies", "get_strategy", "plan", "register_strategy"]
