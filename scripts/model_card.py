"""Measure a bundled tiny MoE and write its ``MODEL_CARD.md`` (tiny-moe, tiny-moe-64).

Why: the bundled model is a test fixture for pruning strategies, so its card must show that its
experts specialise: dropping the most-used half of each layer's experts must hurt far more than
dropping the least-used half, with random drops in between. Frequencies come from a calibration
sample of the TRAIN split; perplexities from the held-out split and from the third-party held-out
text (dependencies' sources and docs, never trained on: ``builtin:third-party-code/-prose``). Dropping an expert = masking its
router logit with -inf (``moeprune.evaluation.routing_mask``), the reference semantics of pruning.

Usage::

    python scripts/model_card.py [--model DIR] [--max-tokens N] [--third-party-tokens N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from moeprune.calibration.builtin_corpus import builtin_documents  # noqa: E402
from moeprune.evaluation.perplexity import encode_texts, perplexity_from_ids  # noqa: E402
from moeprune.evaluation.routing_mask import mask_experts  # noqa: E402
from moeprune.evaluation.routing_stats import (  # noqa: E402
    experts_by_frequency,
    routing_entropy,
    routing_frequencies,
    total_variation,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "moeprune" / "assets" / "tiny-moe"
SETS = {"code": "code", "prose": "prose", "3rd-party code": "third-party-code", "3rd-party prose": "third-party-prose"}
INTRO = {
    "tiny-moe": "A small Qwen3-MoE (coarse-grained: 16 experts, top-2)",
    "tiny-moe-64": "A small fine-grained Qwen3-MoE (64 experts, top-8, the same active expert width per token as "
                   "tiny-moe's 16 x top-2, like Qwen3-30B-A3B's 128 x top-8)",
}
CHKHSH = "7859bac030b15539874a2233536bd330489b7a237b7bb9236e3ed6ca9b320c7d"  # tiny-moe's vocabulary
CONVERT = ("- llama.cpp: the stock `convert_hf_to_gguf.py` refuses this checkpoint (\"BPE pre-tokenizer was not "
           "recognized\"): its `get_vocab_base_pre()` names a pre-tokenizer by the sha256 of the token ids that the "
           "model's own tokenizer gives for a fixed probe text, so every newly trained vocabulary is unknown whatever "
           "its pre-tokenizer, and Qwen3-MoE has no other vocabulary path. The pre-tokenizer here is GPT-2's "
           "byte-level regex (`ByteLevel`, `use_regex`), so registering this vocabulary's hash "
           f"(`{CHKHSH}`) as `\"gpt-2\"` converts it unchanged (token ids, merges and tensors read back equal): "
           "`scripts/check_gguf_conversion.py` reproduces both runs.")


def calibration_ids(tok, domain: str, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A deterministic random sample of TRAIN documents of one domain, capped at n_tokens."""
    docs = builtin_documents(domain, "train")
    random.Random(seed).shuffle(docs)
    return encode_texts(tok, docs, max_tokens=n_tokens)


def drop_conditions(freq: torch.Tensor, freq_code: torch.Tensor, freq_prose: torch.Tensor,
                    n_experts: int) -> list[tuple[str, dict[int, list[int]]]]:
    conds: list[tuple[str, dict[int, list[int]]]] = [("none", {})]
    layers = freq.shape[0]
    for frac in (0.25, 0.5):
        pct = int(frac * 100)
        conds.append((f"{pct}% least-used", experts_by_frequency(freq, frac, highest=False)))
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            rand = {l: sorted(torch.randperm(n_experts, generator=g)[: round(frac * n_experts)].tolist())
                    for l in range(layers)}
            conds.append((f"{pct}% random (seed {seed})", rand))
        conds.append((f"{pct}% most-used", experts_by_frequency(freq, frac, highest=True)))
    lean = freq_prose - freq_code
    conds.append(("50% most prose-leaning", experts_by_frequency(lean, 0.5, highest=True)))
    conds.append(("50% most code-leaning", experts_by_frequency(-lean, 0.5, highest=True)))
    return conds


TP_START, TP_END = "<!-- third-party:start -->", "<!-- third-party:end -->"


def command_line() -> str:
    """The command that produced a card, for the card (paths as given)."""
    return shlex.join(["python", "scripts/model_card.py", *sys.argv[1:]])


def append_third_party(args, rows: list[dict], heldout: dict[str, torch.Tensor], seconds: float) -> None:
    """Add the third-party figures to an existing card (its other figures stay as published)."""
    sets = [d for d in SETS if d.startswith("3rd")]
    block = [
        TP_START,
        "## Third-party held-out text",
        f"Text nobody here trained on: sources and docs of the dependencies (`builtin:third-party-code`, "
        f"{heldout['3rd-party code'].numel():,} tokens; `builtin:third-party-prose`, "
        f"{heldout['3rd-party prose'].numel():,} tokens), same experts dropped as above "
        f"(frequencies from {args.calib_tokens:,} train-split tokens per domain).",
        "",
        "| experts dropped per layer | " + " | ".join(f"{d} ppl" for d in sets) + " |",
        "|---|" + "---|" * len(sets),
        *[f"| {r['dropped per layer']} | " + " | ".join(f"{r[f'{d} ppl']:.2f}" for d in sets) + " |" for r in rows],
        "",
        f"_Measured in {seconds:.0f} s with torch {torch.__version__}: `{command_line()}`._",
        TP_END,
    ]
    card = args.model / "MODEL_CARD.md"
    text = card.read_text()
    if TP_START in text:
        text = text[: text.index(TP_START)] + text[text.index(TP_END) + len(TP_END):].lstrip("\n")
    card.write_text(text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n")
    ev = args.model / "evaluation.json"
    data = json.loads(ev.read_text()) if ev.is_file() else {}
    data["third_party_rows"] = rows
    ev.write_text(json.dumps(data, indent=1) + "\n")
    print(f"updated {card}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap per held-out domain (default: all)")
    ap.add_argument("--calib-tokens", type=int, default=32768, help="train-split tokens per domain")
    ap.add_argument("--third-party-tokens", type=int, default=32768, help="cap per third-party held-out domain")
    ap.add_argument("--append-third-party", action="store_true",
                    help="keep the card and add (or replace) a section measured on the third-party sets only")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on a busy 2-core machine 2 threads measured >10x slower than 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    cfg = model.config
    n_experts = cfg.num_experts

    heldout = {name: encode_texts(tok, builtin_documents(d, "heldout"),
                                  args.third_party_tokens if d.startswith("third-party") else args.max_tokens)
               for name, d in SETS.items()
               if not args.append_third_party or d.startswith("third-party") or d in ("code", "prose")}
    calib = {d: calibration_ids(tok, d, args.calib_tokens) for d in ("code", "prose")}
    freq_code = routing_frequencies(model, calib["code"], args.seq_len)
    freq_prose = routing_frequencies(model, calib["prose"], args.seq_len)
    # Calibration mix as in training: code and prose weighted 0.65 / 0.35.
    freq = 0.65 * freq_code + 0.35 * freq_prose
    if not args.append_third_party:  # only the full card shows held-out routing
        held_code = routing_frequencies(model, heldout["code"], args.seq_len)
        held_prose = routing_frequencies(model, heldout["prose"], args.seq_len)

    measured = {k: v for k, v in heldout.items() if not args.append_third_party or k.startswith("3rd")}
    rows = []
    for name, dropped in drop_conditions(freq, freq_code, freq_prose, n_experts):
        with mask_experts(model, dropped):
            ppl = {d: perplexity_from_ids(model, ids, args.seq_len) for d, ids in measured.items()}
        rows.append({"dropped per layer": name, **{f"{d} ppl": v for d, v in ppl.items()}})
        print(f"{name:28s} " + " ".join(f"{d} {v:8.2f}" for d, v in ppl.items()), flush=True)

    if args.append_third_party:
        append_third_party(args, rows, heldout, time.time() - t0)
        return
    meta_path = args.model / "training_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    entropy = routing_entropy(freq)
    tv = total_variation(held_code, held_prose)
    dead = (freq < 1e-3).sum(dim=1)

    name = args.model.resolve().name
    lines = [
        f"# {name}: a model bundled with moeprune (`builtin:{name}`)",
        "",
        f"{INTRO.get(name, 'A small Qwen3-MoE')} trained from scratch on text shipped with CPython (stdlib sources as *code*;",
        "pydoc topics, long docstrings, LICENSE and IDLE NEWS as *prose*), so tests and demos of MoE",
        "pruning run offline on a model whose experts actually specialise. Not a useful language model.",
        "Trained with `scripts/train_tiny_moe.py`; this card written by `scripts/model_card.py`.",
        "",
        "## Configuration",
        f"- `Qwen3MoeForCausalLM`: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim}, "
        f"{n_experts} experts, top-{cfg.num_experts_per_tok}, moe_intermediate {cfg.moe_intermediate_size}, "
        f"norm_topk_prob={cfg.norm_topk_prob}, vocab {cfg.vocab_size}, tied embeddings.",
        f"- Parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M; stored in bf16 "
        "(load with `dtype=torch.float32`).",
        "- Tokenizer: byte-level BPE, 8,192 tokens, `<|endoftext|>` is bos/eos/pad/unk (tiny-moe and tiny-moe-64 "
        "share it, so their perplexities are comparable).",
        CONVERT,
        "",
        "## Training",
        f"- Steps: {meta.get('steps_done', '?')} of {meta.get('steps_planned', '?')} planned; "
        f"tokens seen: {meta.get('tokens_seen', '?'):,}; wall time: "
        f"{meta.get('wall_seconds', 0) / 60:.1f} min ({meta.get('tokens_per_second', '?')} tokens/s on 2 CPU cores, "
        "shared machine)." if meta else "- (training_meta.json missing)",
        f"- Batch {meta.get('batch')} x {meta.get('seq_len')} tokens, sequences prose with p={meta.get('p_prose')}; "
        f"AdamW lr {meta.get('lr')} (warm-up {meta.get('warmup')}, cosine to {meta.get('lr_min')}), betas (0.9, 0.95), "
        f"wd 0.1 (not norms/routers), grad clip 1.0; per-layer load-balancing loss averaged over layers, "
        f"coefficient {meta.get('aux_coef_per_layer')}; seed {meta.get('seed')}.",
        f"- Train-split tokens available: {meta.get('train_tokens')}.",
        "",
        "## Held-out evaluation",
        f"Held-out split of the built-in corpora ({heldout['code'].numel():,} code tokens, "
        f"{heldout['prose'].numel():,} prose tokens{'' if args.max_tokens is None else f', capped at {args.max_tokens}'}) "
        f"and third-party held-out text never trained on ({heldout['3rd-party code'].numel():,} code tokens, "
        f"{heldout['3rd-party prose'].numel():,} prose tokens: sources and docs of transformers, torch, scipy, ..., "
        "`builtin:third-party-code` / `builtin:third-party-prose`), "
        f"non-overlapping windows of {args.seq_len} tokens.",
        "",
        f"- Code perplexity: **{rows[0]['code ppl']:.2f}**; prose perplexity: **{rows[0]['prose ppl']:.2f}**.",
        f"- Third-party code perplexity: **{rows[0]['3rd-party code ppl']:.2f}**; third-party prose perplexity: "
        f"**{rows[0]['3rd-party prose ppl']:.2f}**.",
        "",
        "Routing entropy and rarely used experts: train-calibration frequencies (see below); TV: total",
        "variation between the routing frequencies on held-out code and on held-out prose.",
        "",
        f"| layer | routing entropy (bits, max {math.log2(n_experts):.1f}) | experts used < 0.1% | TV(held-out code, prose) |",
        "|---|---|---|---|",
    ]
    for layer in range(freq.shape[0]):
        lines.append(f"| {layer} | {entropy[layer]:.3f} | {int(dead[layer])} | {tv[layer]:.3f} |")
    lines += [
        "",
        "## Specialisation evidence",
        f"Expert frequencies from {args.calib_tokens:,} TRAIN-split tokens per domain (mixed 0.65 code / "
        "0.35 prose); experts dropped per layer by masking their router logits with -inf; held-out "
        "perplexity. Domain-leaning = largest (prose frequency - code frequency) or the reverse.",
        "",
        "| experts dropped per layer | " + " | ".join(f"{d} ppl" for d in SETS) + " |",
        "|---|" + "---|" * len(SETS),
    ]
    lines += [f"| {r['dropped per layer']} | " + " | ".join(f"{r[f'{d} ppl']:.2f}" for d in SETS) + " |" for r in rows]
    lines += ["", f"_Measured in {time.time() - t0:.0f} s with torch {torch.__version__}: `{command_line()}`._", ""]
    (args.model / "MODEL_CARD.md").write_text("\n".join(lines))
    (args.model / "evaluation.json").write_text(json.dumps({
        "rows": rows,
        "routing_entropy_bits": entropy.tolist(),
        "tv_heldout_code_prose": tv.tolist(),
        "calibration_frequency": freq.tolist(),
    }, indent=1) + "\n")
    print(f"wrote {args.model / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
