"""PreMoE task conditioning and channel slimming vs expert dropping, on the bundled trained MoE.

--part premoe: per calibration seed, PreMoE and REAP at 50% calibrated on code, prose or mixed
(train split), measured on held-out code and prose; plus task-pattern retrieval accuracy: held-out
documents of each domain as queries against patterns built from the code and prose train splits.

--part slim: per calibration seed (mixed train split), expert dropping (REAP) against channel
slimming (CAMERA-P, MoE-Slimming coverage; uniform and per-expert widths) and their combination at
the same share of routed-expert parameters removed; stored and real (unpadded) parameter counts.

    python scripts/bench_slim_premoe.py --part premoe --seeds 0 1 2 --json out/premoe.json
    python scripts/bench_slim_premoe.py --part slim --seeds 0 1 2 --json out/slim.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from moeprune.adapters import find_moe_layers
from moeprune.api import apply
from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.evaluation import encode_texts, perplexity_from_ids
from moeprune.io.loading import BUNDLED, load_model
from moeprune.patterns import build_patterns, nearest_task, query_key
from moeprune.slimming.run import slim_channels
from moeprune.strategies import plan


def routed_params(model) -> tuple[int, int]:
    """(stored, real) routed-expert parameters; real excludes zero-padding channels."""
    stored = real = 0
    widths = getattr(model.config, "moeprune_expert_widths", None) or {}
    for layer in find_moe_layers(model):
        lay = layer.layout
        n = sum(p.numel() for p in layer.experts.parameters())
        stored += n
        per_channel = (3 if lay.has_gate else 2) * lay.hidden_dim
        w = widths.get(str(layer.layer))
        real += n if w is None else n - per_channel * (lay.num_experts * lay.intermediate_dim - sum(w))
    return stored, real


def evaluate(model, data: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {d: perplexity_from_ids(model, ids, seq_len=seq_len, progress=False) for d, ids in data.items()}


def part_premoe(dense, tok, seeds, args, data) -> list[dict]:
    rows = []
    for seed in seeds:
        stats = {src: calibrate(dense, calibration_ids(f"builtin:{src}", tok, args.samples, args.seq_len, seed),
                                progress=False, meta={"seed": seed})
                 for src in ("code", "prose", "mixed")}
        for strategy in ("premoe", "reap"):
            for src, s in stats.items():
                model = copy.deepcopy(dense)
                apply(model, plan(s, strategy, 0.5))
                rows.append({"seed": seed, "strategy": strategy, "calibration": src, **evaluate(model, data, args.seq_len)})
                print(json.dumps(rows[-1]), flush=True)
        pats = build_patterns(dense, tok, {"code": "builtin:code", "prose": "builtin:prose"}, samples=args.samples,
                              seq_len=args.seq_len, seed=seed, progress=False)
        k_a = int(pats["peu_top_k"])
        hits = {}
        for domain in ("code", "prose"):
            docs = [d for d in builtin_documents(domain, "heldout") if len(d) > 400][: args.queries]
            ok = sum(nearest_task(pats, query_key(dense, tok, d[:2000], k_a))[0] == domain for d in docs)
            hits[domain] = [ok, len(docs)]
        rows.append({"seed": seed, "retrieval": hits})
        print(json.dumps(rows[-1]), flush=True)
    return rows


SLIM_CONFIGS = {
    # name: (expert drop ratio, slim kwargs or None)
    "reap 25%": (0.25, None),
    "camera uniform 25%": (0.0, dict(ratio=0.25, method="camera", mode="uniform")),
    "camera expert 25%": (0.0, dict(ratio=0.25, method="camera", mode="expert")),
    "coverage expert 25%": (0.0, dict(ratio=0.25, method="coverage", mode="expert")),
    "reap 50%": (0.5, None),
    "camera uniform 50%": (0.0, dict(ratio=0.5, method="camera", mode="uniform")),
    "camera expert 50%": (0.0, dict(ratio=0.5, method="camera", mode="expert")),
    "coverage expert 50%": (0.0, dict(ratio=0.5, method="coverage", mode="expert")),
    "reap 25% + camera uniform 1/3": (0.25, dict(ratio=1 / 3, method="camera", mode="uniform")),
    "random uniform 50%": (0.0, "random"),  # baseline: each expert keeps a random half of its channels
}


def random_slim(model, ratio: float, seed: int) -> None:
    from moeprune.slimming.allocate import width_for
    from moeprune.slimming.channels import record_widths, slim_experts

    g = torch.Generator().manual_seed(seed)
    widths = {}
    for layer in find_moe_layers(model):
        i, w = layer.layout.intermediate_dim, width_for(layer.layout.intermediate_dim, ratio)
        widths[layer.layer] = slim_experts(layer.experts, [torch.randperm(i, generator=g)[:w] for _ in range(layer.num_experts)])
    record_widths(model, widths)


def part_slim(dense, tok, seeds, args, data) -> list[dict]:
    rows = []
    base_stored, _ = routed_params(dense)
    total = sum(p.numel() for p in dense.parameters())
    rows.append({"config": "dense", "routed_params": base_stored, "params": total, **evaluate(dense, data, args.seq_len)})
    print(json.dumps(rows[-1]), flush=True)
    for seed in seeds:
        stats = calibrate(dense, calibration_ids("builtin:mixed", tok, args.samples, args.seq_len, seed), progress=False)
        for name, (drop, slim) in SLIM_CONFIGS.items():
            if args.only and name not in args.only:
                continue
            model = copy.deepcopy(dense)
            p = plan(stats, "reap", drop)
            apply(model, p)
            tick = time.perf_counter()
            if slim == "random":
                random_slim(model, 0.5, seed)
            elif slim is not None:
                slim_channels(model, stats, p, **slim)
            stored, real = routed_params(model)
            rows.append({"seed": seed, "config": name, "routed_removed_real": 1 - real / base_stored,
                         "routed_removed_stored": 1 - stored / base_stored, "params": sum(q.numel() for q in model.parameters()),
                         "slim_s": round(time.perf_counter() - tick, 2), **evaluate(model, data, args.seq_len)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict], keys: tuple[str, ...]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "code" in r and "seed" in r:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    for key, rs in groups.items():
        parts = []
        for d in ("code", "prose"):
            v = [r[d] for r in rs]
            parts.append(f"{d} {statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}")
        extra = f"  removed real {rs[0]['routed_removed_real']:.3f} stored {rs[0]['routed_removed_stored']:.3f}" if "routed_removed_real" in rs[0] else ""
        print(" / ".join(map(str, key)), f"(n={len(rs)}):", ", ".join(parts) + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["premoe", "slim"], required=True)
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--only", nargs="*", help="slim: run only these configs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok, _ = load_model(args.model, dtype=torch.float32)
    data = {d: encode_texts(tok, builtin_documents(d, "heldout"), max_tokens=args.eval_tokens) for d in ("code", "prose")}
    if args.part == "premoe":
        rows = part_premoe(dense, tok, args.seeds, args, data)
        summary(rows, ("strategy", "calibration"))
    else:
        rows = part_slim(dense, tok, args.seeds, args, data)
        summary(rows, ("config",))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
