"""Channel scores for slimming: CAMERA-P energy and MoE-Slimming's attribution-weighted activation.

CAMERA-P (methods-2026.md section 7), per expert e and channel i, from routed tokens only:

    E_{e,i} = ||W_down^e[:, i]||^2 * ((1 - alpha) * sum_t phi^2 + alpha * max_t phi^2)
    phi_{e,i}(x) = g_e(x) * silu(w_gate,i . x) * (w_up,i . x)        (the gated activation)

with sum phi^2 = `act_gsq_sum` and max phi^2 = `act_gmax` (float64 accumulators, the reference's
bf16 sums being a known pitfall); alpha = 0.9 as in the authors' run.sh (the CLI default is 1.0).

MoE-Slimming (section 4): channel score c_{e,i} = sqrt(sum_t a_{e,i}^2) / (layer mean), the
channel's L2 norm over routed tokens at the down-projection input (`act_sq_sum`); the reference
averages this over three points (down input, up output, gate output), we use the down input only
(the observer does not keep the gate/up outputs). Expert attribution a_e and layer loss L_l in
closed form from `attr_sum` / `layer_loss_sum` (`moeprune.calibration.attribution`).
"""

from __future__ import annotations

import torch

from moeprune.calibration.stats import LayerStats
from moeprune.plan import PlanError

SLIM_ALPHA = 0.9  # the expert-output scale of MoE-Slimming's attribution loss


def _need(stats: LayerStats, *names: str) -> None:
    missing = [n for n in names if n not in stats.tensors]
    if missing:
        raise PlanError(f"statistics lack {missing} (channel slimming); recalibrate with this moeprune version")


def camera_energy(stats: LayerStats, down: torch.Tensor, alpha: float = 0.9) -> torch.Tensor:
    """E [E, I] from one layer's statistics and its down projection in canonical [E, H, I] form."""
    _need(stats, "act_gsq_sum", "act_gmax")
    if not 0.0 <= alpha <= 1.0:
        raise PlanError(f"camera alpha must be in [0, 1], got {alpha}")
    col = down.detach().double().cpu().pow(2).sum(1)  # ||W_down[:, i]||^2 per expert [E, I]
    return col * ((1.0 - alpha) * stats.act_gsq_sum + alpha * stats.act_gmax)


def channel_activation(stats: LayerStats) -> torch.Tensor:
    """MoE-Slimming's `activation` channel score c [E, I], divided by the layer mean."""
    _need(stats, "act_sq_sum")
    c = stats.act_sq_sum.clamp_min(0).sqrt()
    return c / c.mean().clamp_min(1e-300)


def expert_attribution(stats: LayerStats, alpha: float = SLIM_ALPHA) -> torch.Tensor:
    """a_e = -u_e * mean over routed tokens of dL/dz . z = u_e * 2 alpha (1 - alpha) * attr_sum / N_e."""
    _need(stats, "attr_sum")
    n = stats.count
    u = n / stats.tokens.clamp_min(1)
    mean = torch.where(n > 0, stats.attr_sum / n.clamp_min(1), torch.zeros_like(n))
    return u * 2.0 * alpha * (1.0 - alpha) * mean


def layer_loss(stats: LayerStats, alpha: float = SLIM_ALPHA) -> float:
    """L_l = (1 - alpha)^2 * mean_t ||m_t||^2 / ||y_t||^2 (relative-L2 loss of scaling the experts)."""
    _need(stats, "layer_loss_sum")
    return float((1.0 - alpha) ** 2 * stats.layer_loss_sum / stats.tokens.clamp_min(1))
