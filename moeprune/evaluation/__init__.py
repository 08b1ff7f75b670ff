"""Evaluation of (pruned) MoE models: perplexity, agreement with the dense model, routing masks,
routing statistics, text sources, reports and plots. ``lm_eval_bridge`` and ``plots`` import their
optional dependencies lazily."""

from moeprune.evaluation.agreement import compare_models
from moeprune.evaluation.perplexity import encode_texts, perplexity, perplexity_from_ids
from moeprune.evaluation.report import format_table, print_table, write_csv, write_json
from moeprune.evaluation.routing_mask import find_routers, mask_experts
from moeprune.evaluation.routing_stats import (
    experts_by_frequency,
    routing_entropy,
    routing_frequencies,
    total_variation,
)
from moeprune.evaluation.text_sources import load_texts

__all__ = [
    "compare_models",
    "encode_texts",
    "experts_by_frequency",
    "find_routers",
    "format_table",
    "load_texts",
    "mask_experts",
    "perplexity",
    "perplexity_from_ids",
    "print_table",
    "routing_entropy",
    "routing_frequencies",
    "total_variation",
    "write_csv",
    "write_json",
]
