"""Write a random-weight, sharded Qwen3-MoE checkpoint of a requested size, shard by shard.

Tensor shapes and hub key names are those of Qwen3-30B-A3B (hidden 2048, 128 experts of width
768, top-8, 32 query / 4 key-value heads of 128) with as many decoder layers as fit the requested
size; the vocabulary is the byte-level test tokenizer's (272 ids), so embeddings are tiny and the
size is all decoder layers. Tensors are generated and written one at a time through the streaming
`ShardedWriter`, so memory stays at one tensor whatever the size. The routers are scaled up so
routing is decisive, as in the tiny test models.

    python scripts/make_synthetic_checkpoint.py /tmp/synthetic --size-gb 4
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moeprune.io.sharded_writer import ShardedWriter
from moeprune.testing.tiny_tokenizer import byte_tokenizer

logger = logging.getLogger(__name__)

QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, norm_topk_prob=True,
    decoder_sparse_step=1, max_position_embeddings=40960, tie_word_embeddings=False,
    vocab_size=272, bos_token_id=256, eos_token_id=256, pad_token_id=256,
)


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hub-layout tensor names (relative to `model.layers.{i}.`) and shapes of one decoder layer."""
    h, i, e, d = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate.weight": (e, h),
    }
    for j in range(e):
        shapes[f"mlp.experts.{j}.gate_proj.weight"] = (i, h)
        shapes[f"mlp.experts.{j}.up_proj.weight"] = (i, h)
        shapes[f"mlp.experts.{j}.down_proj.weight"] = (h, i)
    return shapes


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    std = 0.16 if name.endswith("mlp.gate.weight") else 0.02
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def make_checkpoint(
    out: str | Path, size_gb: float, num_experts: int | None = None, dtype: torch.dtype = torch.bfloat16,
    shard_size: str = "1GB", seed: int = 0, progress: bool = True,
) -> Path:
    """Write the checkpoint to `out` (created); returns its path."""
    from transformers import Qwen3MoeConfig

    cfg = dict(QWEN3_30B_A3B)
    if num_experts:
        cfg["num_experts"] = num_experts
    width = torch.finfo(dtype).bits // 8
    per_layer = sum(math.prod(s) for s in layer_shapes(cfg).values()) * width
    fixed = (2 * cfg["vocab_size"] + 1) * cfg["hidden_size"] * width
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    cfg["num_hidden_layers"] = layers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedWriter(out, shard_size)
    started = time.perf_counter()
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    writer.add("model.embed_tokens.weight", _tensor("embed", (v, h), dtype, gen))
    for index in tqdm(range(layers), desc="writing synthetic layers", disable=not progress):
        for name, shape in layer_shapes(cfg).items():
            writer.add(f"model.layers.{index}.{name}", _tensor(name, shape, dtype, gen))
    writer.add("model.norm.weight", torch.ones(h, dtype=dtype))
    writer.add("lm_head.weight", _tensor("lm_head", (v, h), dtype, gen))
    writer.close()
    config = Qwen3MoeConfig(**cfg)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    logger.info("wrote %s: %d layers, %.2f GB in %.0fs", out, layers, writer.total_bytes / 1e9, time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--num-experts", type=int, help="Experts per layer (default 128, as Qwen3-30B-A3B).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_checkpoint(args.out, args.size_gb, args.num_experts, getattr(torch, args.dtype), args.shard_size, args.seed)


if __name__ == "__main__":
    main()
