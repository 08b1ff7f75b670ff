"""Benchmark: the one-pass observer vs a plain forward vs a dense all-experts observer.

Same model (Qwen3-MoE shape, 64 experts, top-8), same tokens, runs interleaved and repeated so the
ratios are measured side by side on a noisy machine. The dense observer evaluates every expert on
every token, as the REAP reference observer does, and accumulates the same norms.
Targets: observer <= 1.3x a plain forward; >= 4x faster than the dense observer.

    python scripts/bench_calibration.py [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moeprune.adapters import find_moe_layers
from moeprune.calibration.capture import patch_forward, run_experts
from moeprune.calibration.observer import calibrate
from moeprune.devices import resolve_device


def bench_model(experts: int, top_k: int) -> torch.nn.Module:
    config = Qwen3MoeConfig(
        vocab_size=4096, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def plain(model, ids, batch):
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            model(ids[i : i + batch], use_cache=False, logits_to_keep=1)


def dense_observer(model, ids, batch):
    """Every expert on every token (E/k times the routed expert FLOPs), accumulating norms."""
    undo = []
    sums = {}
    for layer in find_moe_layers(model):
        e = layer.num_experts
        sums[layer.layer] = torch.zeros(e, dtype=torch.float64, device=model.device)

        def sink(expert_ids, token_ids, gates, act, out, top_k_index, hidden, layer=layer, e=e):
            n = hidden.shape[0]
            ids_all = torch.arange(e, device=hidden.device).repeat_interleave(n)
            _, f = run_experts(layer.experts, hidden.repeat(e, 1), ids_all)
            sums[layer.layer] += f.double().norm(dim=-1).view(e, n).sum(1)

        undo.append(patch_forward(layer.experts, sink))
    try:
        plain(model, ids, batch)
    finally:
        for u in undo:
            u()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (moeprune.devices).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = bench_model(args.experts, args.top_k).to(device=device, dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, model.config.vocab_size, (args.tokens // args.seq_len, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    runs = {
        "plain forward (grouped_mm)": lambda: plain(model, ids, args.batch),
        "moeprune observer": lambda: calibrate(model, ids, batch_size=args.batch, progress=False),
        "dense all-experts observer": lambda: dense_observer(model, ids, args.batch),
    }
    plain(model, ids[:1], 1)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["plain forward (grouped_mm)"]
    print(f"{args.experts} experts, top-{args.top_k}, {ids.numel()} tokens, {args.dtype} on {device} "
          f"({torch.get_num_threads()} CPU threads), median of {args.repeats}")
    print("| run | seconds | vs plain forward |")
    print("|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |")
    obs, dense = med["moeprune observer"], med["dense all-experts observer"]
    print(f"\nobserver / plain forward = {obs / base:.2f} (target <= 1.3)")
    print(f"dense observer / observer = {dense / obs:.2f} (target >= 4)")


if __name__ == "__main__":
    main()
