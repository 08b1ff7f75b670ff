"""NAEE, UNCURL and dynamic skipping on a bundled model, over calibration seeds.

Per seed: one calibration pass (--calibration, default the built-in mixed train split, with NAEE's token sample), then each
(strategy, ratio) prunes a fresh copy of the dense model in memory; held-out code and prose
perplexity (built-in held-out split). NAEE runs both ways where it can: exact enumeration
(max_subsets raised so that C(16, 8) = 12,870 fits) and greedy; their kept sets and relative
reconstruction errors are compared. Dynamic skipping is fitted on the (pruned) model with the
seed's calibration ids and measured as the share of expert calls skipped on the held-out text and
its perplexity. Prints mean +- std over seeds and writes every row to --json.

    python scripts/bench_naee.py --seeds 0 1 2 --json /tmp/bench_naee.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moeprune.api import apply
from moeprune.apply.dynamic_skip import calibrate_dynamic_skip, skip_counts
from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.evaluation import encode_texts, perplexity_from_ids
from moeprune.io.loading import BUNDLED, load_model
from moeprune.strategies import plan


def ppl(model, data: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {d: perplexity_from_ids(model, ids, seq_len=seq_len, progress=False) for d, ids in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    parser.add_argument("--strategies", nargs="*", default=["naee-exact", "naee-greedy", "uncurl", "reap", "frequency"])
    parser.add_argument("--skip", nargs="*", default=["dense", "naee-exact@0.25", "reap@0.25", "naee-exact@0.5"],
                        help="models to fit dynamic skipping on: dense, or STRATEGY@RATIO among the rows")
    parser.add_argument("--calibration", default="builtin:mixed", help="calibration source (task data for uncurl)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sample-tokens", type=int, default=2048)
    parser.add_argument("--max-subsets", type=int, default=20000)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dense, tokenizer, _ = load_model(args.model)
    dense.eval()
    data = {d: encode_texts(tokenizer, builtin_documents(d, "heldout"), max_tokens=args.eval_tokens) for d in ("code", "prose")}
    rows: list[dict[str, Any]] = [{"name": "dense", "seed": None, **ppl(dense, data, args.seq_len)}]
    print(rows[-1], flush=True)
    for seed in args.seeds:
        started = time.time()
        ids = calibration_ids(args.calibration, tokenizer, args.samples, args.seq_len, seed)
        stats = calibrate(dense, ids, progress=False, sample_tokens=args.sample_tokens, sample_seed=seed,
                          meta={"num_hidden_layers": dense.config.num_hidden_layers})
        print(f"seed {seed}: calibrated in {time.time() - started:.0f} s", flush=True)
        plans = {}
        for ratio in args.ratios:
            for name in args.strategies:
                tick = time.time()
                if name.startswith("naee"):
                    search = name.split("-")[1]
                    p = plan(stats, "naee", ratio, search=search, max_subsets=args.max_subsets)
                else:
                    p = plan(stats, name, ratio)
                plan_s = time.time() - tick
                model = copy.deepcopy(dense)
                apply(model, p)
                row = {"name": f"{name}@{ratio:g}", "seed": seed, "plan_s": round(plan_s, 1), **ppl(model, data, args.seq_len)}
                if name.startswith("naee"):
                    rel = p.params["relative_error"]
                    row["rel_error"] = sum(rel.values()) / len(rel)
                    row["kept"] = {str(i): lp.kept for i, lp in p.layers.items()}
                plans[row["name"]] = p
                rows.append(row)
                print({k: v for k, v in row.items() if k != "kept"}, flush=True)
                if row["name"] in args.skip:
                    rows.append(skip_row(model, ids, data, args.seq_len, row["name"], seed))
                    print(rows[-1], flush=True)
                del model
        if "dense" in args.skip:
            model = copy.deepcopy(dense)
            rows.append(skip_row(model, ids, data, args.seq_len, "dense", seed))
            print(rows[-1], flush=True)
            del model
        for ratio in args.ratios:
            a, b = plans.get(f"naee-exact@{ratio:g}"), plans.get(f"naee-greedy@{ratio:g}")
            if a is not None and b is not None:
                same = sum(a.layers[i].kept == b.layers[i].kept for i in a.layers)
                print(f"seed {seed} ratio {ratio:g}: greedy picks the exact subset in {same}/{len(a.layers)} layers", flush=True)
                rows.append({"name": f"greedy==exact@{ratio:g}", "seed": seed, "layers_equal": same, "layers": len(a.layers)})
        print(f"seed {seed}: {time.time() - started:.0f} s", flush=True)
    summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def skip_row(model, ids, data, seq_len: int, name: str, seed: int) -> dict[str, Any]:
    record = calibrate_dynamic_skip(model, ids, progress=False)
    skip_counts(model, reset=True)
    row = {"name": f"{name}+skip", "seed": seed, **ppl(model, data, seq_len)}
    row["skipped_share"] = skip_counts(model)["share"]
    row["betas"] = [round(b, 4) for b in record["betas"].values()]
    return row


def summary(rows: list[dict[str, Any]]) -> None:
    names = list(dict.fromkeys(r["name"] for r in rows))
    print("\n| model | seeds | code ppl | prose ppl | rel. error | skipped share |\n|---|---|---|---|---|---|")
    for name in names:
        group = [r for r in rows if r["name"] == name and "code" in r]
        if not group:
            continue
        cells = []
        for key in ("code", "prose", "rel_error", "skipped_share"):
            values = [r[key] for r in group if key in r]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}" if key in ("rel_error", "skipped_share") else f"{values[0]:.2f}")
            else:
                fmt = "{:.3f} ± {:.3f}" if key in ("rel_error", "skipped_share") else "{:.2f} ± {:.2f}"
                cells.append(fmt.format(statistics.mean(values), statistics.stdev(values)))
        print(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
