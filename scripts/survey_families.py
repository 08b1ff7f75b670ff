"""Survey every MoE family of the installed transformers (moeprune/testing/family_survey.py).

    python scripts/survey_families.py [--families qwen3_moe,mixtral] [--strategy reap] [--dtype bfloat16] [--json out.json]

Prints one markdown row per family: ok (keep-all exact, pruned == logit-masked original, reload
equal), refused (one-line reason), wrong (a check differs), or why no tiny model could be built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moeprune.testing.family_survey import as_json, survey


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="Comma-separated model types (default: all MoE families).")
    parser.add_argument("--strategy", default="reap", help="Strategy that prunes half the experts (default reap).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="Dtype the tiny checkpoints are saved in (and computed in).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f] or None
    results = survey(families, strategy=args.strategy, dtype=getattr(torch, args.dtype))
    print("| family | status | what | checks |")
    print("|---|---|---|---|")
    for r in results:
        checks = "; ".join(f"{k}: {v}" for k, v in r.checks.items())
        print(f"| {r.family} | {r.status} | {r.detail.replace('|', '/')} | {checks} |", flush=True)
    counts = {s: sum(r.status == s for r in results) for s in sorted({r.status for r in results})}
    print("\n" + ", ".join(f"{s}: {n}" for s, n in counts.items()))
    if args.json:
        args.json.write_text(as_json(results))
    return 1 if counts.get("wrong") else 0


if __name__ == "__main__":
    sys.exit(main())
