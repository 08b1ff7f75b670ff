"""Find the MoE layers of any transformers v5 model and read/write their experts and routers."""

from moeprune.adapters.discovery import MoELayer, NotAnMoEModelError, find_moe_layers, moe_summary
from moeprune.adapters.layout import ExpertLayout, RoutingInfo

__all__ = ["MoELayer", "NotAnMoEModelError", "find_moe_layers", "moe_summary", "ExpertLayout", "RoutingInfo"]
