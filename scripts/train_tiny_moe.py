"""Train the small Qwen3-MoE bundled with moeprune (``moeprune/assets/tiny-moe``).

Why: pruning methods can only be told apart on a model whose experts actually specialise. A
random-init MoE routes uniformly, so every pruning strategy looks the same on it. This script trains
a 22M-parameter Qwen3-MoE on the offline stdlib corpora (code + prose) following
``shared/docs/fixture-recipe.md``; crucially the load-balancing loss is computed PER LAYER and
averaged (transformers' pooled version lets single layers collapse onto a few experts).

Steps are a flag, and ``--max-minutes`` caps wall-clock time: the cosine schedule is planned over
``--steps``; if the time cap hits first, training stops and the model is saved as it is.

The same script trains the fine-grained sibling ``tiny-moe-64`` (64 routed experts, top-8,
``moe_intermediate_size`` 64: the same active expert width per token as tiny-moe) on tiny-moe's
tokenizer, so both models read the same token ids and their perplexities are comparable.

Usage::

    python scripts/train_tiny_moe.py --steps 700 --max-minutes 40
    python scripts/train_tiny_moe.py --steps 700 --max-minutes 80 --num-experts 64 --top-k 8 \
        --moe-intermediate 64 --tokenizer-from moeprune/assets/tiny-moe --out /tmp/tiny-moe-64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from moeprune.calibration.builtin_corpus import builtin_documents  # noqa: E402

EOT = "<|endoftext|>"
VOCAB_SIZE = 8192
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "moeprune" / "assets" / "tiny-moe"
log = logging.getLogger("train_tiny_moe")


def build_tokenizer(cache: Path, reuse: Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the train split of both domains; cached under ``cache``.

    ``reuse`` names a directory whose tokenizer is taken as it is (tiny-moe-64 shares tiny-moe's
    tokenizer, so both models read the same token ids and perplexities are comparable).
    """
    if reuse is not None:
        tok_dir = cache / f"tokenizer-{hashlib.md5((reuse / 'tokenizer.json').read_bytes()).hexdigest()[:10]}"
        if not (tok_dir / "tokenizer.json").is_file():
            PreTrainedTokenizerFast.from_pretrained(reuse).save_pretrained(tok_dir)
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        docs = builtin_documents("code", "train") + builtin_documents("prose", "train")
        t0 = time.time()
        tok.train_from_iterator(docs, trainer=trainer)
        log.info("tokenizer trained in %.1f s", time.time() - t0)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
        )
        fast.save_pretrained(tok_dir)
    return PreTrainedTokenizerFast.from_pretrained(tok_dir)


def token_stream(tok: PreTrainedTokenizerFast, domain: str, cache: Path) -> np.ndarray:
    """All train documents of a domain, tokenised and packed with EOT separators (cached)."""
    digest = hashlib.md5(tok._tokenizer.to_str().encode()).hexdigest()[:10]
    path = cache / f"{domain}-train-{digest}.npy"
    if path.is_file():
        return np.load(path)
    docs = builtin_documents(domain, "train")
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok._tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.int32)
    np.save(path, arr)
    return arr


def build_config(
    tok: PreTrainedTokenizerFast, num_experts: int = 16, top_k: int = 2, moe_intermediate: int = 256
) -> Qwen3MoeConfig:
    eos = tok.eos_token_id
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        output_router_logits=False,
        router_aux_loss_coef=0.0,  # the pooled aux loss is replaced by the per-layer one below
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, k: int) -> torch.Tensor:
    """Switch load-balancing loss computed for each layer separately, then averaged."""
    losses = [load_balancing_loss_func((logits,), n_experts, k) for logits in router_logits]
    return torch.stack(losses).mean()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "norm" in name or name.endswith(".gate.weight") or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, steps: int, warmup: int, lr: float, lr_min: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def sample_batch(
    streams: dict[str, np.ndarray], batch: int, seq_len: int, p_prose: float, rng: random.Random
) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        stream = streams["prose" if rng.random() < p_prose else "code"]
        start = rng.randrange(0, len(stream) - seq_len)
        rows.append(stream[start : start + seq_len])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--max-minutes", type=float, default=40.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-min", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--p-prose", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/moeprune-train-cache"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--num-experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="reuse this directory's tokenizer instead of training one")
    ap.add_argument("--log-file", type=Path, default=None)
    args = ap.parse_args()

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(args.cache, args.tokenizer_from)
    streams = {d: token_stream(tok, d, args.cache) for d in ("code", "prose")}
    log.info("train tokens: code %d, prose %d", len(streams["code"]), len(streams["prose"]))

    config = build_config(tok, args.num_experts, args.top_k, args.moe_intermediate)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, experts impl %s", n_params / 1e6,
             getattr(model.config, "_experts_implementation", "default"))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))

    model.train()
    t_start = time.time()
    t_window, tokens_window, tokens_seen = time.time(), 0, 0
    step = 0
    for step in range(args.steps):
        elapsed_min = (time.time() - t_start) / 60
        if elapsed_min > args.max_minutes:
            log.info("time cap of %.1f min reached at step %d; stopping", args.max_minutes, step)
            break
        lr = lr_at(step, args.steps, args.warmup, args.lr, args.lr_min)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = sample_batch(streams, args.batch, args.seq_len, args.p_prose, rng)
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        aux = per_layer_balance_loss(out.router_logits, config.num_experts, config.num_experts_per_tok)
        loss = out.loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += ids.numel()
        tokens_window += ids.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            now = time.time()
            log.info(
                "step %d lr %.2e lm_loss %.4f aux %.4f grad %.2f tok/s %.0f tokens %d elapsed %.1f min",
                step, lr, out.loss.item(), aux.item(), grad_norm.item(),
                tokens_window / max(1e-9, now - t_window), tokens_seen, (now - t_start) / 60,
            )
            t_window, tokens_window = now, 0
    else:
        step = args.steps
    wall = time.time() - t_start

    model.eval()
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = args.aux_coef
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    meta = {
        "steps_planned": args.steps,
        "steps_done": step,
        "tokens_seen": tokens_seen,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": round(tokens_seen / max(wall, 1e-9), 1),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "lr_min": args.lr_min,
        "warmup": args.warmup,
        "aux_coef_per_layer": args.aux_coef,
        "p_prose": args.p_prose,
        "seed": args.seed,
        "train_tokens": {d: int(len(s)) for d, s in streams.items()},
        "parameters": n_params,
    }
    (args.out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("saved to %s: %s", args.out, meta)
    if args.log_file and args.log_file.is_file():
        target = args.out / "train.log"
        if args.log_file.resolve() != target.resolve():
            shutil.copy(args.log_file, target)


if __name__ == "__main__":
    main()
