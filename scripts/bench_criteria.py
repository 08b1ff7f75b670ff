"""Held-out perplexity of the issue-12 criteria (MAN, MSAN, AIMER, auto) next to REAP and frequency.

For each calibration seed: one calibration pass (builtin:mixed, the recipe defaults), every score
strategy planned from it and applied to a copy of the model; `auto` runs through `moeprune.api.prune`
(it holds 1/8 of the calibration sequences out of planning to choose). AIMER needs no calibration,
so it is the same for every seed. Perplexity is on the built-in held-out code and prose (the
`--eval` sets, `eval_max_tokens` tokens each). Prints mean and spread (min-max) over seeds, and
writes every figure to --json.

    python scripts/bench_criteria.py [--model builtin:tiny-moe] [--ratio 0.5] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from moeprune import plan
from moeprune.api import prune
from moeprune.apply.surgery import apply_plan
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.cli.prune_eval import heldout_perplexities
from moeprune.config import PruneRecipe
from moeprune.io.loading import load_model

SCORED = ("frequency", "reap", "man", "msan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:tiny-moe")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--auto-candidates", default=None, help="comma-separated; default the auto default list")
    parser.add_argument("--json", default="/tmp/bench_criteria.json")
    parser.add_argument("--strategies", default=",".join(SCORED), help="calibrated strategies to run per seed")
    parser.add_argument("--no-auto", action="store_true", help="skip auto and aimer")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tok, _ = load_model(args.model)
    results: dict[str, dict] = {"dense": {"all": heldout_perplexities(dense, tok, args.max_tokens)}}
    print("dense", results["dense"]["all"], flush=True)

    def evaluate(name: str, p, key: str) -> None:
        model = apply_plan(copy.deepcopy(dense), p)
        ppl = heldout_perplexities(model, tok, args.max_tokens)
        results.setdefault(name, {})[key] = ppl
        print(name, key, {k: round(v, 2) for k, v in ppl.items()}, flush=True)

    if not args.no_auto:
        evaluate("aimer", plan(None, "aimer", args.ratio, model=dense), "all")
    for seed in args.seeds:
        ids = calibration_ids("builtin:mixed", tok, 64, 256, seed)
        stats = calibrate(dense, ids, progress=False, meta={"num_hidden_layers": dense.config.num_hidden_layers})
        for name in args.strategies.split(","):
            evaluate(name, plan(stats, name, args.ratio, model=dense), f"seed{seed}")
        if args.no_auto:
            continue
        auto = {"candidates": args.auto_candidates.split(",")} if args.auto_candidates else None
        start = time.perf_counter()
        result = prune(PruneRecipe(model=args.model, strategy="auto", ratio=args.ratio, auto=auto,
                                   calibration={"seed": seed}), model=copy.deepcopy(dense), tokenizer=tok,
                       progress=False)
        ppl = heldout_perplexities(result.model, tok, args.max_tokens)
        sel = result.report["selected"]
        results.setdefault("auto", {})[f"seed{seed}"] = {**ppl, "selected": f"{sel['strategy']}/{sel['budget']}",
                                                        "kl": {r["strategy"] + "/" + r["budget"]: r.get("kl")
                                                               for r in result.report["candidates"]},
                                                        "seconds": round(time.perf_counter() - start, 1)}
        print("auto", f"seed{seed}", sel, {k: round(v, 2) for k, v in ppl.items()}, flush=True)
    print(f"\nheld-out perplexity at ratio {args.ratio}, seeds {args.seeds}: mean (min-max)")
    print(f"  {'strategy':<10} {'code':>22} {'prose':>22}")
    for name, runs in results.items():
        cells = []
        for domain in ("code", "prose"):
            vals = [r[domain] for r in runs.values()]
            cells.append(f"{statistics.mean(vals):8.2f} ({min(vals):.2f}-{max(vals):.2f})")
        print(f"  {name:<10} {cells[0]:>22} {cells[1]:>22}")
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
