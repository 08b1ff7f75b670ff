"""Quality benchmark that separates signal from noise: strategies x ratios x calibration seeds.

For each model (default: both bundled models, coarse tiny-moe and fine-grained tiny-moe-64) one
calibration per seed (``--samples`` x ``--seq-len`` tokens of builtin:mixed, train split) is
reused by every registered strategy (``available_strategies()``, minus ``SKIP``) at every ratio
(0.75 only where the kept experts still cover top-k); a calibration-size sweep (16k/64k/256k
tokens) runs for ``--sweep-strategies``; ``RECIPE_ROWS`` (in ``bench_quality_rows.py``: PruneRecipe
dicts run through ``moeprune.api.prune``; other features append rows there) run per seed too. Every pruned model is
measured on four held-out sets (built-in held-out code/prose, third-party code/prose nobody trained
on), against the dense model's cached log-probabilities (top-1 agreement, KL) and on the offline
multiple-choice tasks (``acc_mutual_info``; chance 0.25; retention = pruned / dense accuracy).
Summary rows give mean ± half-range over seeds (half of max - min); a row is marked when its seed
range of third-party code perplexity is disjoint from the best row's at the same model and ratio.

    python scripts/bench_quality.py --quick                       # one model, one seed, ratio 0.5
    python scripts/bench_quality.py --json /tmp/bq.json            # everything (hours on 2 cores)
    python scripts/bench_quality.py --render /tmp/a.json /tmp/b.json --readme README.md --plot docs/bench_quality.png
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from moeprune.api import apply  # noqa: E402
from moeprune.calibration.builtin_corpus import builtin_documents  # noqa: E402
from moeprune.calibration.data import calibration_ids  # noqa: E402
from moeprune.calibration.observer import calibrate  # noqa: E402
from moeprune.evaluation.agreement import kl_and_agreement  # noqa: E402
from moeprune.evaluation.mc_score import score_items  # noqa: E402
from moeprune.evaluation.mc_tasks import TASKS, generate_task, load_task  # noqa: E402
from moeprune.evaluation.perplexity import _logits, encode_texts, iter_windows, perplexity_from_ids  # noqa: E402
from moeprune.io.loading import load_model  # noqa: E402
from moeprune.strategies import available_strategies, get_strategy, plan  # noqa: E402

START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"
MODELS = ["builtin:tiny-moe", "builtin:tiny-moe-64"]
SETS = {"code": "code", "prose": "prose", "3p code": "third-party-code", "3p prose": "third-party-prose"}
# Strategies that need inputs the benchmark does not have (or special arguments): name -> why.
SKIP: dict[str, str] = {"unified": "its defaults (b, alpha, beta) = (1, 0, 1) are MAN: identical plans"}
STRATEGY_PARAMS: dict[str, dict[str, Any]] = {}  # extra plan() params per strategy, if any needs them
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_quality_rows
from bench_quality_rows import RECIPE_ROWS  # noqa: E402
RANK_METRIC = "3p code ppl"


class Reference:
    """Held-out token streams, the dense model's cached log-probabilities and task items."""

    def __init__(self, dense, tok, eval_tokens: int, agree_tokens: int, task_items: int, seq_len: int,
                 task_budget: int = 0) -> None:
        self.seq_len = seq_len
        self.data = {name: encode_texts(tok, builtin_documents(d, "heldout"), eval_tokens) for name, d in SETS.items()}
        self.agree = torch.cat([ids[:agree_tokens] for ids in self.data.values()])
        with torch.no_grad():
            self.ref_logp = [torch.log_softmax(_logits(dense, b)[:, :-1], -1)
                             for b in iter_windows(self.agree, seq_len, 8)]
        # the shipped task files, or (task_budget > 0) items generated here from that many characters
        # of each task's held-out third-party text: more items, from the installed packages' text
        self.items = {name: (generate_task(name, n_items=task_items, budget_chars=task_budget) if task_budget
                             else load_task(name)[:task_items]) for name in TASKS} if task_items else {}
        self.tok = tok

    def measure(self, model, tasks: bool = True) -> dict[str, float]:
        row = {f"{name} ppl": perplexity_from_ids(model, ids, self.seq_len, progress=False) for name, ids in self.data.items()}
        kl = agree = n = 0.0
        with torch.no_grad():
            for ref, batch in zip(self.ref_logp, iter_windows(self.agree, self.seq_len, 8)):
                k, a, p = kl_and_agreement(ref, _logits(model, batch)[:, :-1])
                kl, agree, n = kl + k, agree + a, n + p
        row.update({"top-1 agree": agree / n, "KL": max(0.0, kl / n)})
        for name, items in (self.items.items() if tasks else ()):
            scored = score_items(model, self.tok, items)
            row[f"{name.removeprefix('moeprune_')} acc"] = scored["acc_mutual_info"]
            row[f"{name.removeprefix('moeprune_')} hits"] = "".join(map(str, scored["acc_mutual_info_hits"]))
        return row


def printable(row: dict[str, Any]) -> dict[str, Any]:
    """A row for the log: floats rounded, per-item task outcomes left out (they are in --json)."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith(" hits")}


def strategies(names: list[str] | None) -> list[str]:
    chosen = names or [s for s in available_strategies() if s not in SKIP]
    return [s for s in chosen if s in available_strategies()]


def run_model(spec: str, args, out: list[dict[str, Any]], dump) -> None:
    dense, tok, _ = load_model(spec, dtype=torch.float32)
    dense.eval()
    cfg = dense.config
    n_exp, top_k = cfg.num_experts, cfg.num_experts_per_tok
    ref = Reference(dense, tok, args.eval_tokens, args.agree_tokens, args.task_items, args.seq_len, args.task_budget)
    base = {"model": spec, "experts": n_exp, "top_k": top_k}
    t0 = time.time()
    if (spec, "dense", 0.0, None, 0) not in args.done:
        out.append({**base, "strategy": "dense", "ratio": 0.0, "seed": None, "calib_tokens": 0, **ref.measure(dense),
                    "seconds": time.time() - t0})
    dump(out)
    names = strategies(args.strategies)
    ratios = [r for r in args.ratios if round(n_exp * (1 - r)) >= top_k]
    need_dense = max(get_strategy(s).dense_tokens for s in names)
    need_sample = max(get_strategy(s).sample_tokens(STRATEGY_PARAMS.get(s)) for s in names)
    sizes = sorted({args.samples * args.seq_len, *(args.sweep_tokens if args.sweep_strategies else [])})
    if args.sweep_only:
        sizes = [t for t in sizes if t != args.samples * args.seq_len]
    for seed in args.seeds:
        for size in sizes:
            main = size == args.samples * args.seq_len
            todo = [(s, r) for s in names for r in ratios] if main else \
                [(s, args.sweep_ratio) for s in args.sweep_strategies if s in names]
            todo = [(s, r) for s, r in todo if (spec, s, r, seed, size) not in args.done]  # --resume-json
            if not todo:
                continue
            ids = calibration_ids("builtin:mixed", tok, size // args.seq_len, args.seq_len, seed)
            stats = calibrate(dense, ids, dense_tokens=need_dense, progress=False, sample_tokens=need_sample,
                              sample_seed=seed, meta={"num_hidden_layers": cfg.num_hidden_layers})
            for name, ratio in todo:
                t0 = time.time()
                row = {**base, "strategy": name, "ratio": ratio, "seed": seed, "calib_tokens": size}
                model = copy.deepcopy(dense)
                try:
                    apply(model, plan(stats, name, ratio, model=model, **STRATEGY_PARAMS.get(name, {})))
                    row.update(ref.measure(model, tasks=ratio in args.task_ratios and main))
                except Exception as err:  # a strategy that cannot run here is reported, not fatal
                    row["error"] = f"{type(err).__name__}: {err}"[:200]
                row["seconds"] = time.time() - t0
                out.append(row)
                dump(out)
                print(json.dumps(printable(row)), flush=True)
                del model
            del stats
        if args.recipes:
            run_recipes(spec, dense, tok, seed, ref, base, args, out, dump)


def run_recipes(spec, dense, tok, seed, ref, base, args, out, dump) -> None:
    from moeprune.api import prune
    from moeprune.config import PruneRecipe

    picked: dict[str, str] = {}  # row name -> the strategy `auto` selected in it (this seed)
    for entry in RECIPE_ROWS:
        if args.recipe_rows and entry["name"] not in args.recipe_rows:
            continue
        fields = {k: v for k, v in entry.items() if k not in ("name", "pick", "group_ratio", "tasks")}
        t0 = time.time()
        ratio = fields.get("ratio", 0.5)
        done = args.done.get((spec, entry["name"], entry.get("group_ratio", ratio), seed, args.samples * args.seq_len))
        if done is not None:  # --resume-json: measured already (its auto pick still serves the rows after it)
            if "picked" in done:
                picked[entry["name"]] = done["picked"]
            continue
        row = {**base, "strategy": entry["name"], "ratio": ratio, "seed": seed, "calib_tokens": args.samples * args.seq_len}
        try:
            if "pick" in entry:
                if entry["pick"] not in picked:
                    raise RuntimeError(f"row {entry['pick']!r} did not run or picked nothing for this seed")
                fields["auto"] = {**fields.get("auto", {}), "candidates": [picked[entry["pick"]]]}
                row["picked"] = picked[entry["pick"]]
            calibration = {"samples": args.samples, "seq_len": args.seq_len, "seed": seed, **fields.pop("calibration", {})}
            recipe = PruneRecipe(model=spec, **fields, calibration=calibration)
            result = prune(recipe, model=copy.deepcopy(dense), tokenizer=tok, progress=False)
            if result.report is not None:
                picked[entry["name"]] = row["picked"] = result.report["selected"]["strategy"]
            choice = result.plan.params.get("router_kd", {}).get("choice")
            if choice is not None:  # router_kd.samples as a list: which count won, and every candidate's KL
                row["kd_choice"] = {"selected": choice["selected"]["samples"],
                                    "kl": {str(c["samples"]): c["kl"] for c in choice["candidates"]}}
            row["ratio"] = entry.get("group_ratio", ratio)
            row.update(ref.measure(result.model, tasks=entry.get("tasks", row["ratio"] in args.task_ratios)))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        row["seconds"] = time.time() - t0
        out.append(row)
        dump(out)
        print(json.dumps(printable(row)), flush=True)


def metrics(rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k.endswith(" ppl")] + ["top-1 agree", "KL"]
    return keys + sorted({k for r in rows for k in r if k.endswith(" acc")})


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, strategy, ratio, calibration tokens): mean, half-range and seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["model"], r["strategy"], r["ratio"], r["calib_tokens"]), []).append(r)
    dense = {r["model"]: r for r in rows if r["strategy"] == "dense"}
    out = []
    for (model, strategy, ratio, size), members in groups.items():
        s = {"model": model, "strategy": strategy, "ratio": ratio, "calib_tokens": size, "n_seeds": len(members)}
        for key in metrics(members):
            values = [max(0.0, m[key]) if key == "KL" else m[key] for m in members if key in m]  # -1e-10 is 0
            if values:
                s[key] = statistics.fmean(values)
                s[f"{key} ±"] = (max(values) - min(values)) / 2
                if key.endswith(" acc") and model in dense and dense[model].get(key):
                    s[f"{key} retention %"] = 100 * s[key] / dense[model][key]
        out.append(s)
    for s in out:  # disjoint seed ranges from the best (lowest third-party code ppl) at the same model/ratio
        peers = [p for p in out if p["model"] == s["model"] and p["ratio"] == s["ratio"] and p["strategy"] != "dense"
                 and p["calib_tokens"] == s["calib_tokens"] and RANK_METRIC in p]
        if s["strategy"] == "dense" or RANK_METRIC not in s or not peers:
            continue
        best = min(peers, key=lambda p: p[RANK_METRIC])
        lo, hi = s[RANK_METRIC] - s[f"{RANK_METRIC} ±"], best[RANK_METRIC] + best[f"{RANK_METRIC} ±"]
        s["vs best"] = "best" if best is s else ("worse" if lo > hi else "≈")
    return out


def _higher_is_better(key: str) -> bool:
    return key.endswith(" acc") or key == "top-1 agree"


def separated(s: dict[str, Any], peers: list[dict[str, Any]], key: str) -> str:
    """'best', 'worse' (seed range disjoint from the best peer's) or '' (within the seed spread)."""
    sign = -1 if _higher_is_better(key) else 1
    ranked = [p for p in peers if key in p]
    if not ranked or key not in s:
        return ""
    best = min(ranked, key=lambda p: sign * p[key])
    if best is s:
        return "best"
    if s.get("n_seeds", 1) < 2 or best.get("n_seeds", 1) < 2:  # no spread measured: nothing to separate
        return ""
    gap = sign * (s[key] - best[key])
    return "worse" if gap > s.get(f"{key} ±", 0) + best.get(f"{key} ±", 0) else ""


def _cell(s: dict[str, Any], key: str, fmt: str, mark: str = "") -> str:
    if key not in s:
        return ""
    text = format(s[key], fmt) + (f" ± {format(s[f'{key} ±'], fmt)}" if s.get("n_seeds", 1) > 1 else "")
    text = f"**{text}**" if mark == "best" else text + (" *" if mark == "worse" else "")
    return text + (f" ({s[f'{key} retention %']:.0f}%)" if f"{key} retention %" in s else "")


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    keys = metrics([r for r in rows if "error" not in r])
    fmts = {k: (".3f" if k.endswith("acc") or k == "top-1 agree" else ".4f" if k == "KL" else ".1f") for k in keys}
    head = ["model", "strategy", "ratio", "calib", "seeds", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(summary, key=lambda s: (s["model"], s["ratio"], s["calib_tokens"] != 16384, s["calib_tokens"],
                                           s.get(RANK_METRIC, 0)))
    for s in order:
        cells = [s["model"].removeprefix("builtin:"), s["strategy"], f"{s['ratio']:g}",
                 f"{s['calib_tokens'] // 1024}k" if s["calib_tokens"] else "", str(s["n_seeds"])]
        peers = [p for p in summary if p["strategy"] != "dense" and p["model"] == s["model"]
                 and p["ratio"] == s["ratio"] and p["calib_tokens"] == s["calib_tokens"]]
        marks = {k: separated(s, peers, k) if s["strategy"] != "dense" and len(peers) > 1 else "" for k in keys}
        cells += [_cell(s, k, fmts[k], marks[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    errors = sorted({(r["model"], r["strategy"], r["error"]) for r in rows if "error" in r})
    lines += [f"\nNot measured: {m.removeprefix('builtin:')} {s}: {e}" for m, s, e in errors]
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, metric: str = RANK_METRIC) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({s["model"] for s in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(9 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [s for s in summary if s["model"] == model and s["calib_tokens"] in (0, 16384) and metric in s]
        if len({s["ratio"] for s in rows if s["strategy"] != "dense"}) == 1:  # one ratio: strategies side by side
            pruned = sorted((s for s in rows if s["strategy"] != "dense"), key=lambda s: s[metric])
            ax.errorbar(range(len(pruned)), [s[metric] for s in pruned], yerr=[s[f"{metric} ±"] for s in pruned],
                        fmt="o", capsize=4)
            ax.set_xticks(range(len(pruned)), [s["strategy"] for s in pruned], rotation=30, ha="right")
            for s in rows:
                if s["strategy"] == "dense":
                    ax.axhline(s[metric], color="black", linestyle=":", label="dense")
            ax.set(title=f"{model.removeprefix('builtin:')}, {pruned[0]['ratio']:g} of experts removed: {metric}\n"
                         "(mean ± half-range over calibration seeds)", ylabel=metric, yscale="log")
            ax.legend(fontsize=7)
            continue
        for strategy in sorted({s["strategy"] for s in rows if s["strategy"] != "dense"}):
            pts = sorted((s["ratio"], s[metric], s[f"{metric} ±"]) for s in rows if s["strategy"] == strategy)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=strategy)
        for s in rows:
            if s["strategy"] == "dense":
                ax.axhline(s[metric], color="black", linestyle=":", label="dense")
        ax.set(title=f"{model.removeprefix('builtin:')}: {metric} (mean ± half-range over seeds)",
               xlabel="share of experts removed (slimming: share of expert weights)", ylabel=metric, yscale="log")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--strategies", nargs="*", default=None, help="default: every registered strategy minus SKIP")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sweep-strategies", nargs="*", default=["reap", "frequency"])
    ap.add_argument("--sweep-tokens", nargs="*", type=int, default=[16384, 65536, 262144])
    ap.add_argument("--sweep-ratio", type=float, default=0.5)
    ap.add_argument("--sweep-only", action="store_true", help="only the calibration sizes other than --samples x --seq-len")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="tokens per held-out set (perplexity)")
    ap.add_argument("--agree-tokens", type=int, default=1024,
                    help="tokens per held-out set for agreement/KL (dense log-probs cached in float32: 32 KB per token)")
    ap.add_argument("--task-items", type=int, default=500, help="items per task (0: no tasks)")
    ap.add_argument("--task-budget", type=int, default=0,
                    help="characters of held-out third-party text to generate the task items from (0: the "
                         "shipped 500-item files; 200000 yields ~880 / ~700 items, more text more items)")
    ap.add_argument("--task-ratios", nargs="*", type=float, default=[0.5],
                    help="ratios at which pruned models are scored on the tasks (dense always is)")
    ap.add_argument("--no-recipes", dest="recipes", action="store_false")
    ap.add_argument("--recipe-rows", nargs="*", default=None, help="only these RECIPE_ROWS names (default: all)")
    ap.add_argument("--quick", action="store_true", help="first model, first seed, ratio 0.5, small eval, no sweep")
    ap.add_argument("--json", type=Path, help="per-run rows (written as they come)")
    ap.add_argument("--resume-json", action="store_true",
                    help="keep the rows already in --json and measure only the strategy cells missing there")
    ap.add_argument("--render", nargs="*", type=Path, help="only render these JSON files (no runs)")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.seeds, args.ratios = args.models[:1], args.seeds[:1], [0.5]
        args.eval_tokens, args.agree_tokens, args.task_items = 4096, 1024, 100
        args.sweep_strategies, args.recipes = [], False
    started = time.time()
    if args.render:
        rows, seen = [], set()
        for p in args.render:  # every file measured its model's dense row; keep one row per cell
            for r in json.loads(p.read_text())["rows"]:  # (the first measured; errors yield to a later rerun)
                key = (r["model"], r["strategy"], r["ratio"], r["seed"], r["calib_tokens"])
                if key in seen or "error" in r:
                    continue
                seen.add(key)
                rows.append(r)
        measured = {(r["model"], r["strategy"], r["ratio"], r["seed"], r["calib_tokens"]) for r in rows}
        for p in args.render:  # an error stays reported only where no file measured that cell
            rows += [r for r in json.loads(p.read_text())["rows"] if "error" in r and
                     (r["model"], r["strategy"], r["ratio"], r["seed"], r["calib_tokens"]) not in measured]
        commands = [json.loads(p.read_text())["command"] for p in args.render]
        wall = sum(json.loads(p.read_text())["wall_seconds"] for p in args.render)  # summed, run in parallel or not
    else:
        rows, commands = [], ["python scripts/bench_quality.py " + " ".join(sys.argv[1:])]
        args.done = {}
        if args.resume_json and args.json and args.json.is_file():  # an interrupted run: keep what it measured
            previous = json.loads(args.json.read_text())
            rows = [r for r in previous["rows"] if "error" not in r]
            commands[0] = previous["command"] + "` (interrupted), resumed as `" + commands[0]
            started -= previous["wall_seconds"]
            args.done = {(r["model"], r["strategy"], r["ratio"], r["seed"], r["calib_tokens"]): r for r in rows}

        def dump(current):
            if args.json:
                args.json.write_text(json.dumps({"command": commands[0], "wall_seconds": time.time() - started,
                                                 "rows": current}, indent=1))

        for spec in args.models:
            run_model(spec, args, rows, dump)
        wall = time.time() - started
    summary = summarise(rows)
    table = markdown(summary, rows)
    header = ("`" + "`, `".join(commands) + f"` ({wall / 60:.0f} min of runs). Mean ± half-range over calibration seeds "
              f"(64 x 256 tokens of builtin:mixed unless `calib` says otherwise); perplexity on the built-in held-out "
              f"split (code, prose) and third-party text (3p); agreement/KL vs the dense model's cached outputs; "
              f"task accuracy = acc_mutual_info, chance 0.250 (retention in brackets). Bold: best in its column at "
              "that model, ratio and calibration size; `*`: worse than the best by more than the two seed "
              "half-ranges together (disjoint seed ranges); unmarked: within the seed spread of the best.")
    print("\n" + header + "\n\n" + table)
    if args.plot:
        plot(summary, args.plot)
    if args.readme:
        text = args.readme.read_text()
        block = f"{START}\n{header}\n\n{table}\n{END}"
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text += "\n" + block + "\n"
        args.readme.write_text(text)


if __name__ == "__main__":
    main()
