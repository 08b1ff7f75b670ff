"""Router calibration benchmark: compressed model without / with global Router KD / with the local variant.

For each calibration seed: one calibration pass (planning tokens), then router-calibration tokens
drawn apart from them (`held_apart_ids`), the dense model's top-k teacher cache and MoE block
inputs/outputs, all BEFORE compression (the same functions `moeprune prune --router-kd` runs). Then
for each strategy a fresh copy of the dense model is pruned and measured on the held-out code and
prose splits (perplexity over `--eval-tokens` tokens per domain): as pruned, after
`router_kd_local`, after `router_kd`. Wall time and peak RSS of every phase are measured in-process
(RSS sampled from /proc/self/status every 10 ms; "peak" is the process peak during the phase, "+"
its rise above the phase's start).

    python scripts/bench_router_kd.py --model builtin:tiny-moe --seeds 0 1 2 --steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moeprune.api import apply
from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.evaluation import encode_texts, perplexity_from_ids
from moeprune.io.loading import BUNDLED, load_model
from moeprune.recover.kd_data import held_apart_ids
from moeprune.recover.router_kd import router_kd
from moeprune.recover.router_kd_local import capture_block_io, router_kd_local
from moeprune.recover.teacher_cache import build_teacher_cache
from moeprune.strategies import plan


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def phase(costs: dict, name: str):
    start_rss, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tick = time.perf_counter()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_mb())
        costs.setdefault(name, []).append({"seconds": time.perf_counter() - tick, "peak_mb": peak[0],
                                           "rise_mb": peak[0] - start_rss})


def summarise(results: dict) -> None:
    """Print mean +- sd over seeds per strategy and variant, the gap closed, and the cost table."""
    runs, costs = results["runs"], results["costs"]
    seeds = sorted({r["seed"] for r in runs})
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    dense = results["dense"]
    print(f"\ndense: code {dense['code']:.2f} prose {dense['prose']:.2f}; mean +- sd over seeds {seeds}")
    print(f"{'strategy':<10} {'variant':<7} {'code ppl':>16} {'prose ppl':>17}   gap to dense closed (code, prose)")
    summary = []
    for strategy in strategies:
        base = {d: statistics.mean(r[d] for r in runs if r["strategy"] == strategy and r["variant"] == "none")
                for d in ("code", "prose")} if "none" in variants else None
        for variant in variants:
            rows = [r for r in runs if r["strategy"] == strategy and r["variant"] == variant]
            cell = {d: (statistics.mean(r[d] for r in rows), statistics.stdev([r[d] for r in rows]) if len(rows) > 1 else 0.0)
                    for d in ("code", "prose")}
            closed = ""
            if base is not None and variant != "none":
                closed = "  ".join(f"{100 * (base[d] - cell[d][0]) / (base[d] - dense[d]):5.1f}%" for d in ("code", "prose"))
            summary.append({"strategy": strategy, "variant": variant, **{d: list(v) for d, v in cell.items()}})
            print(f"{strategy:<10} {variant:<7} {cell['code'][0]:9.2f} +- {cell['code'][1]:4.2f} "
                  f"{cell['prose'][0]:9.2f} +- {cell['prose'][1]:5.2f}   {closed}")
    results["summary"] = summary
    print("\ncost per run (mean over runs): seconds, peak RSS MB, rise MB")
    for name, entries in costs.items():
        print(f"  {name:<24} {statistics.mean(e['seconds'] for e in entries):7.1f}s "
              f"{max(e['peak_mb'] for e in entries):8.0f} {statistics.mean(e['rise_mb'] for e in entries):8.1f}")


def merge(paths: list[Path]) -> dict:
    """One result from per-seed runs (`--merge a.json b.json ...`)."""
    parts = [json.loads(p.read_text()) for p in paths]
    merged = {"args": parts[0]["args"], "dense": parts[0]["dense"], "runs": [], "costs": {}}
    for part in parts:
        merged["runs"] += part["runs"]
        for name, entries in part["costs"].items():
            merged["costs"].setdefault(name, []).extend(entries)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--strategies", nargs="+", default=["reap", "frequency"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source", default="builtin:mixed")
    parser.add_argument("--samples", type=int, default=64, help="planning (calibration) sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kd-samples", type=int, default=64, help="router-calibration sequences")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=200)
    parser.add_argument("--local-lr", type=float, default=1e-3)
    parser.add_argument("--local-batch-tokens", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["none", "local", "global"],
                        choices=["none", "local", "global", "both"], help="both: local, then global")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="print the summary of per-seed --json files instead")
    args = parser.parse_args()
    if args.merge:
        merged = merge(args.merge)
        summarise(merged)
        if args.json:
            args.json.write_text(json.dumps(merged, indent=1))
        return
    torch.manual_seed(0)

    dense, tokenizer, _ = load_model(args.model)
    data = {d: encode_texts(tokenizer, builtin_documents(d, "heldout"), max_tokens=args.eval_tokens) for d in ("code", "prose")}

    def ppl(model) -> dict[str, float]:
        return {d: perplexity_from_ids(model, ids, seq_len=args.seq_len, progress=False) for d, ids in data.items()}

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "dense": ppl(dense), "runs": []}
    costs: dict = {}
    print(f"dense: code {results['dense']['code']:.2f} prose {results['dense']['prose']:.2f}", flush=True)
    for seed in args.seeds:
        ids = calibration_ids(args.source, tokenizer, args.samples, args.seq_len, seed)
        with phase(costs, "calibration pass"):
            stats = calibrate(dense, ids, batch_size=8, progress=False)
        kd_ids = held_apart_ids(args.source, tokenizer, args.kd_samples, args.seq_len, seed, exclude=ids)
        with phase(costs, "teacher cache (global)"):
            cache = build_teacher_cache(dense, kd_ids, k=args.top_k, progress=False)
        with phase(costs, "dense block I/O (local)"):
            block_io = capture_block_io(dense, kd_ids, progress=False) if {"local", "both"} & set(args.variants) else None
        for strategy in args.strategies:
            pruned = copy.deepcopy(dense)
            apply(pruned, plan(stats, strategy, args.ratio, model=pruned))
            for variant in args.variants:
                model = copy.deepcopy(pruned) if variant != "none" else pruned
                report = None
                if variant in ("local", "both"):
                    with phase(costs, "router KD local"):
                        report = router_kd_local(model, block_io, steps=args.local_steps, lr=args.local_lr,
                                                 batch_tokens=args.local_batch_tokens, seed=seed, progress=False)
                if variant in ("global", "both"):
                    with phase(costs, "router KD global"):
                        report = router_kd(model, cache, args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                                           progress=False)
                row = {"seed": seed, "strategy": strategy, "variant": variant, **ppl(model)}
                if report is not None:
                    row["report"] = {k: v for k, v in report.items() if k != "layers"}
                results["runs"].append(row)
                print(f"seed {seed} {strategy:<10} {variant:<7} code {row['code']:8.2f} prose {row['prose']:8.2f}", flush=True)
                del model
    results["costs"] = costs
    summarise(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
