"""Quality benchmark: every expert strategy at 25% and 50% on the bundled trained MoE.

One calibration pass (built-in mixed train split), then for each strategy and ratio a fresh copy of
the dense model is pruned in memory and measured on the held-out split: code and prose perplexity,
next-token top-1 agreement and mean KL(dense || pruned) on held-out code + prose. The dense model is
the first row. With --readme the table replaces the block between the bench_quality markers.

    python scripts/bench_quality.py --readme README.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from moeprune.api import apply
from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.evaluation import compare_models, encode_texts, format_table, perplexity_from_ids
from moeprune.evaluation.report import format_markdown
from moeprune.io.loading import BUNDLED, load_model
from moeprune.plan import Plan
from moeprune.strategies import available_strategies, get_strategy, plan

START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"


def heldout(tokenizer, domain: str, tokens: int) -> torch.Tensor:
    return encode_texts(tokenizer, builtin_documents(domain, "heldout"), max_tokens=tokens)


def measure(dense, model, data: dict[str, torch.Tensor], agree_ids: torch.Tensor, seq_len: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for domain, ids in data.items():
        row[f"{domain} ppl"] = f"{perplexity_from_ids(model, ids, seq_len=seq_len, progress=False):.2f}"
    if model is dense:
        row.update({"top-1 agree": "1.000", "KL": "0.0000"})
    else:
        cmp = compare_models(dense, model, agree_ids, seq_len=seq_len)
        row.update({"top-1 agree": f"{cmp['top1_agreement']:.3f}", "KL": f"{cmp['kl']:.4f}"})
    return row


def prune_in_memory(model, stats, strategy: str, ratio: float):
    """Plan on `stats` and apply to `model`; returns the plan."""
    result = plan(stats, strategy, ratio, model=model)
    apply(model, result)
    return result


def sparsity_rows(stats, ids) -> list[tuple[str, str, Callable]]:
    """STUN's comparison: REAP 25% + 50% intra-expert sparsity (62.5% of routed-expert weights in
    total) with each method, vs unstructured-only at the same total (with and without OWL)."""
    from moeprune.sparsify.run import sparsify

    def structured_then(method: str) -> Callable:
        def run(model):
            result = prune_in_memory(model, stats, "reap", 0.25)
            sparsify(model, ids, method, 0.5, plan=result, progress=False)
            return result
        return run

    def unstructured(method: str, owl: bool) -> Callable:
        return lambda model: sparsify(model, ids, method, 0.625, owl=owl, progress=False)

    rows = [(f"reap + {m} 50%", "0.25+0.5", structured_then(m)) for m in ("wanda", "moe-pruner", "sparsegpt")]
    rows += [("wanda only", "0.625", unstructured("wanda", False)), ("wanda+OWL only", "0.625", unstructured("wanda", True))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--strategies", nargs="*", default=None, help="default: every registered strategy")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per domain")
    parser.add_argument("--agree-tokens", type=int, default=8192, help="held-out tokens per domain for agreement/KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-extra", action="store_true", help="skip the intra-expert sparsity rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG: code perplexity vs share of experts removed, per strategy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    started = time.time()
    dense, tokenizer, path = load_model(args.model)
    strategies = args.strategies or available_strategies()
    data = {d: heldout(tokenizer, d, args.eval_tokens) for d in ("code", "prose")}
    agree_ids = torch.cat([data["code"][: args.agree_tokens], data["prose"][: args.agree_tokens]])
    ids = calibration_ids("builtin:mixed", tokenizer, args.samples, args.seq_len, args.seed)
    dense_tokens = max(get_strategy(s).dense_tokens for s in strategies)
    sample_tokens = max(get_strategy(s).sample_tokens() for s in strategies)  # NAEE's token sample
    stats = calibrate(dense, ids, dense_tokens=dense_tokens, progress=False, sample_tokens=sample_tokens,
                      sample_seed=args.seed, meta={"num_hidden_layers": dense.config.num_hidden_layers})
    rows = [{"strategy": "dense", "ratio": "0", "experts/layer": stats.layers[min(stats.layers)].num_experts,
             **measure(dense, dense, data, agree_ids, args.seq_len)}]
    print(format_table(rows[-1:]), flush=True)
    jobs: list[tuple[str, float, Callable]] = []
    for ratio in args.ratios:
        for name in strategies:
            jobs.append((name, f"{ratio:g}", lambda m, name=name, ratio=ratio: prune_in_memory(m, stats, name, ratio)))
    if not args.no_extra:
        jobs += sparsity_rows(stats, ids)
    for name, ratio, run in jobs:
        model = copy.deepcopy(dense)
        try:
            result = run(model)
            counts = sorted({lp.num_kept for lp in result.layers.values()}) if isinstance(result, Plan) else None
            row = {"strategy": name, "ratio": ratio,
                   "experts/layer": counts[0] if counts and len(counts) == 1 else (f"{counts[0]}-{counts[-1]}" if counts else "")}
            row.update(measure(dense, model, data, agree_ids, args.seq_len))
        except Exception as err:  # a strategy that cannot reach a ratio is reported, not fatal
            row = {"strategy": name, "ratio": ratio, "experts/layer": f"error: {err}"[:60]}
        rows.append(row)
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        del model
    table = format_markdown(rows)
    command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    header = (f"Model `{args.model}` ({path}); calibration: {args.samples} x {args.seq_len} tokens of builtin:mixed "
              f"(seed {args.seed}); held-out: {args.eval_tokens} tokens per domain (perplexity), "
              f"{args.agree_tokens} per domain (agreement, KL); {time.time() - started:.0f} s.")
    print("\n" + header + "\n\n" + table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        from moeprune.evaluation.plots import plot_perplexity_vs_compression

        points = [{"strategy": r["strategy"], "experts removed": float(r["ratio"]), "code perplexity": float(r["code ppl"])}
                  for r in rows[1:] if "code ppl" in r and re.fullmatch(r"[0-9.]+", r["ratio"]) and r["strategy"] in strategies]
        plot_perplexity_vs_compression(points, args.plot, x="experts removed", y="code perplexity",
                                       dense=float(rows[0]["code ppl"]), title=f"{args.model}: held-out code perplexity")
        text = args.readme.read_text()
        block = f"{START}\n`{command.strip()}`\n\n{header}\n\n{table}\n{END}"
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text += "\n" + block + "\n"
        args.readme.write_text(text)


if __name__ == "__main__":
    main()
