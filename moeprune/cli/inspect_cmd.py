"""`moeprune inspect MODEL`: what moeprune finds in a checkpoint."""

from __future__ import annotations

import json

import click

from moeprune.adapters import moe_summary
from moeprune.cli.errors import user_errors
from moeprune.cli.load_options import load_options
from moeprune.io.loading import BUNDLED, load_model


@click.command()
@click.argument("model", default=BUNDLED)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@load_options()
@user_errors
def inspect_command(model: str, as_json: bool, load_overrides: dict) -> None:
    """Print MoE layers, experts, top-k, router kind, parameters per expert and routed share."""
    loaded, _, path = load_model(model, dtype=load_overrides["dtype"] or "auto")
    summary = moe_summary(loaded)
    summary["path"] = path
    try:
        from moeprune.sparsity_report import measured_sparsity

        summary["expert_sparsity"] = measured_sparsity(loaded)
    except ImportError:
        pass
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    router = summary["router"]
    click.echo(f"model:            {summary['model_type']}  ({path})")
    click.echo(f"decoder layers:   {summary['num_hidden_layers']}")
    click.echo(f"MoE layers:       {summary['moe_layers']}")
    counts = sorted(set(summary["experts_per_layer"].values()))
    click.echo(f"experts / layer:  {counts[0] if len(counts) == 1 else summary['experts_per_layer']}")
    click.echo(f"top-k:            {router['top_k']}")
    groups = f", groups {router['n_group']} (top {router['topk_group']})" if router["n_group"] > 1 else ""
    if router.get("identity_experts"):  # LongCat-Flash: zero-compute experts after the real ones
        groups += f", identity experts={router['identity_experts']}"
    click.echo(
        f"router:           {router['scoring']}, norm_topk_prob={router['norm_topk_prob']}, "
        f"scale={router['routed_scaling_factor']}, bias={router['has_bias']}, "
        f"correction_bias={router['has_correction_bias']}{groups}"
    )
    click.echo(f"expert layout:    {summary['expert_layout']}")
    click.echo(f"params / expert:  {summary['params_per_expert']:,}")
    click.echo(f"shared experts:   {sorted(set(summary['shared_experts_per_layer'].values()))} per layer")
    click.echo(
        f"parameters:       {summary['total_params']:,} total, {summary['routed_expert_params']:,} routed "
        f"({100 * summary['routed_share']:.1f}%), {summary['shared_expert_params']:,} shared"
    )
    sparsity = summary.get("expert_sparsity") or {}
    if sparsity.get("routed_experts"):
        click.echo(f"expert sparsity:  {100 * sparsity['routed_experts']:.1f}% of routed-expert weights are zero")
