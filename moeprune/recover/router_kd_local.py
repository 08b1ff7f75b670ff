"""Layer-local router calibration: fit each compressed MoE block's router to the dense block's output.

For every MoE layer l, with X_l the hidden states entering the dense model's MoE block and
Y_l = dense_block_l(X_l) its output, only the compressed block's router parameters are trained to
minimise mean_t ||block_l'(x_t) - y_t||^2 (AdamW, seeded token mini-batches). An MoE block acts
token by token, so a layer needs nothing but its own cached (X_l, Y_l): no full model, no teacher
logits, no backpropagation through other layers. This is why it fits the layer-wise/streamed path:
`fit_router_local(block, inputs, targets | dense_fn)` is the whole per-layer step.

The inputs are the dense model's (teacher-forced), so layers are independent; errors of earlier
compressed layers are not compensated (the global `router_kd` does that).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.adapters import find_moe_layers
from moeprune.adapters.carried_state import refuse_block_fits
from moeprune.engine.runner import as_batches
from moeprune.recover.router_params import layer_router_parameters, only_trainable

__all__ = ["capture_block_io", "fit_router_local", "router_kd_local", "block_mse"]


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)


@torch.no_grad()
def capture_block_io(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{MoE layer: (inputs [N, H], outputs [N, H])} of every MoE block over the real tokens of `input_ids`."""
    refuse_block_fits(model, "--router-kd-local")
    layers = find_moe_layers(model)
    io: dict[int, tuple[list, list]] = {layer.layer: ([], []) for layer in layers}
    current: dict[str, torch.Tensor | None] = {"keep": None}

    def hook(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            keep = current["keep"]
            x, y = hidden.reshape(-1, hidden.shape[-1]), out.reshape(-1, out.shape[-1])
            if keep is not None:
                x, y = x[keep], y[keep]
            io[index][0].append(x.detach().float().cpu())
            io[index][1].append(y.detach().float().cpu())

        return record

    handles = [layer.block.register_forward_hook(hook(layer.layer), with_kwargs=True) for layer in layers]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(as_batches(input_ids, batch_size, attention_mask), desc="dense block outputs", unit="batch",
                          disable=not progress):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            current["keep"] = None if mask is None else mask.reshape(-1).bool().to(device)
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {index: (torch.cat(xs), torch.cat(ys)) for index, (xs, ys) in io.items()}


@torch.no_grad()
def block_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over tokens of ||block(x) - y||^2."""
    dtype = next(block.parameters()).dtype
    device = next(block.parameters()).device
    total = 0.0
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start : start + chunk].to(device, dtype)
        y = targets[start : start + chunk].to(device, torch.float32)
        total += float(((_block_output(block, x).float() - y) ** 2).sum())
    return total / max(inputs.shape[0], 1)


def fit_router_local(
    block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
    dense_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, router_params: list[nn.Parameter] | None = None,
    steps: int = 200, lr: float = 1e-3, batch_tokens: int = 1024, seed: int = 0, max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """Train the router of compressed MoE `block` so block(inputs) reproduces `targets` (or dense_fn(inputs)).

    `router_params` default: the parameters of the block's router (found like `find_moe_layers`
    does, via the block's `gate`/`router` child). Every steps/10 steps the MSE on all cached tokens is
    measured and the best router so far is kept, so the fit never ends worse than it started.
    Returns MSE before/after and relative to ||y||^2.
    """
    if targets is None:
        if dense_fn is None:
            raise ValueError("fit_router_local needs targets or dense_fn")
        with torch.no_grad():
            targets = torch.cat([dense_fn(inputs[s : s + 4096]).reshape(-1, inputs.shape[-1]).float()
                                 for s in range(0, inputs.shape[0], 4096)])
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in shape")
    if router_params is None:
        router_params = _block_router_params(block)
    started = time.perf_counter()
    before = block_mse(block, inputs, targets)
    energy = float((targets.float() ** 2).sum(-1).mean()) or 1.0
    dtype = next(block.parameters()).dtype
    device = next(block.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    best, best_state = before, [p.detach().clone() for p in router_params]
    check_every = max(1, steps // 10)
    with only_trainable(block, router_params):
        optimizer = torch.optim.AdamW(router_params, lr=lr, weight_decay=0.0, foreach=False)
        for step in range(steps):
            rows = torch.randint(0, n, (min(batch_tokens, n),), generator=generator)
            pred = _block_output(block, inputs[rows].to(device, dtype)).float()
            loss = ((pred - targets[rows].to(device, torch.float32)) ** 2).sum(-1).mean() / energy
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(router_params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % check_every == 0 or step + 1 == steps:
                current = block_mse(block, inputs, targets)
                if current < best:
                    best, best_state = current, [p.detach().clone() for p in router_params]
    with torch.no_grad():  # top-k switches make the loss jumpy: keep the best router seen on the cached tokens
        for p, saved in zip(router_params, best_state):
            p.copy_(saved)
    after = best
    return {"mse_before": before, "mse_after": after, "rel_before": before / energy, "rel_after": after / energy,
            "tokens": int(n), "seconds": round(time.perf_counter() - started, 3)}


def _block_router_params(block: nn.Module) -> list[nn.Parameter]:
    for name in ("gate", "router", "wg"):
        router = getattr(block, name, None)
        if isinstance(router, nn.Module) and getattr(router, "weight", None) is not None:
            return [p for n, p in router.named_parameters() if not n.endswith("e_score_correction_bias")]
    raise ValueError(f"{type(block).__name__} has no gate/router child; pass router_params")


def router_kd_local(
    model: nn.Module, io: dict[int, tuple[torch.Tensor, torch.Tensor]], steps: int = 200, lr: float = 1e-3,
    batch_tokens: int = 1024, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """`fit_router_local` on every compressed MoE layer of `model` with its captured dense (inputs, outputs)."""
    layers = find_moe_layers(model)
    missing = [layer.layer for layer in layers if layer.layer not in io]
    if missing:
        raise ValueError(f"no cached dense block inputs/outputs for MoE layers {missing}")
    started = time.perf_counter()
    per_layer: dict[str, dict[str, float]] = {}
    for layer in tqdm(layers, desc="local router KD", unit="layer", disable=not progress):
        x, y = io[layer.layer]
        per_layer[str(layer.layer)] = fit_router_local(
            layer.block, x, y, router_params=list(layer_router_parameters(layer).values()), steps=steps, lr=lr,
            batch_tokens=batch_tokens, seed=seed + layer.layer)
    rel_before = sum(v["rel_before"] for v in per_layer.values()) / len(per_layer)
    rel_after = sum(v["rel_after"] for v in per_layer.values()) / len(per_layer)
    return {"steps_per_layer": steps, "lr": lr, "batch_tokens": batch_tokens, "seed": seed,
            "mean_rel_mse_before": rel_before, "mean_rel_mse_after": rel_after, "layers": per_layer,
            "seconds": round(time.perf_counter() - started, 3)}
