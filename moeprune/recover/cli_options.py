"""Click options for router calibration on `moeprune prune`, folded into recipe overrides.

The decorated command receives one `router_kd_overrides` dict of dotted recipe keys
(`router_kd.steps`, ...), ready to merge into `load_recipe` overrides; any given option creates the
recipe's `router_kd:` section.
"""

from __future__ import annotations

import click

from moeprune.click_groups import recipe_option_group

_OPTIONS = {
    "router_kd_steps": "router_kd.steps",
    "router_kd_local": "router_kd.local",
    "router_kd_lr": "router_kd.lr",
    "router_kd_batch_size": "router_kd.batch_size",
    "router_kd_samples": "router_kd.samples",
    "router_kd_average": "router_kd.average",
    "router_kd_top_k": "router_kd.top_k",
    "router_kd_temperature": "router_kd.temperature",
    "router_kd_seed": "router_kd.seed",
    "router_kd_local_steps": "router_kd.local_steps",
    "router_kd_local_lr": "router_kd.local_lr",
}


# Add --router-kd STEPS, --router-kd-local and their --router-kd-* settings to a command.
router_kd_options = recipe_option_group("router_kd_overrides", _OPTIONS, [
    click.option("--router-kd", "router_kd_steps", type=int, metavar="STEPS",
                 help="After compression, train only the routers for STEPS steps: KL to the dense model's next-token distributions."),
    click.option("--router-kd-local/--no-router-kd-local", "router_kd_local", default=None,
                 help="Layer-local router calibration: fit each router to reproduce the dense MoE block's output."),
    click.option("--router-kd-lr", type=float, help="Router KD learning rate (default 5e-5, the paper's)."),
    click.option("--router-kd-batch-size", type=int, help="Router KD sequences per step (default 2)."),
    click.option("--router-kd-samples", metavar="N[,N...]",
                 help="Router-calibration sequences, held apart from planning (default 64). Several counts "
                      "(64,512): KD runs once per count and the lowest KL to the dense model on sequences of "
                      "held-out documents wins."),
    click.option("--router-kd-average/--no-router-kd-average", "router_kd_average", default=None,
                 help="With several --router-kd-samples: also try the mean of their trained routers (kept if its "
                      "validation KL is the lowest)."),
    click.option("--router-kd-top-k", type=int, help="Teacher log-probs cached per token (default 64, plus the tail mass)."),
    click.option("--router-kd-temperature", type=float, help="KD temperature tau (default 1)."),
    click.option("--router-kd-seed", type=int, help="Seed for router-calibration tokens and batch order (default --seed)."),
    click.option("--router-kd-local-steps", type=int, help="Layer-local steps per MoE layer (default 200)."),
    click.option("--router-kd-local-lr", type=float, help="Layer-local learning rate (default 1e-3)."),
])


def describe_report(report: dict) -> str:
    """One or two lines summarising a router-calibration report (what `prune` prints)."""
    lines = []
    if "local" in report:
        r = report["local"]
        lines.append(f"local router KD: {r['steps_per_layer']} steps/layer, mean relative block MSE "
                     f"{r['mean_rel_mse_before']:.4f} -> {r['mean_rel_mse_after']:.4f} ({r['seconds']:.1f}s)")
    if "global" in report:
        r = report["global"]
        kl = ""
        if r.get("train_kl_before") is not None:
            kl = f", KL to dense on its tokens {r['train_kl_before']:.4f} -> {r['train_kl_after']:.4f}"
        lines.append(f"router KD: {r['steps']} steps, lr {r['lr']:g}, {r['trained_parameters']} router parameters{kl} "
                     f"({r['seconds']:.1f}s)")
    if "choice" in report:
        c = report["choice"]
        tried = ", ".join(f"{row['samples']}: {row['kl']:.4f}" for row in c["candidates"])
        lines.append(f"router KD samples chosen by validation KL on {c['sequences']} sequences of {c['documents']} held-out documents "
                     f"(uncalibrated {c['kl_uncalibrated']:.4f}; {tried}) -> {c['selected']['samples']}")
    return "\n".join(lines)
