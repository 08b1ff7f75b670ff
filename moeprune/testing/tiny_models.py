"""Tiny random-weight MoE models of every required transformers family, built from config classes.

Tests, benchmarks and the offline demo need real architectures without the Hugging Face hub: each
builder returns a 2-3 layer model with hidden size 32-64 and 8+ routed experts, seeded so that two
calls give the same weights. Router weights are scaled up so routing is decisive (random tiny
routers are otherwise nearly uniform, and ties make tests fragile).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    Glm4MoeConfig,
    DbrxConfig,
    JetMoeConfig,
    LongcatFlashConfig,
    GptOssConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

_COMMON = dict(
    vocab_size=272,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=256,
    pad_token_id=256,
)


def _mixtral() -> PretrainedConfig:
    return MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)


def _qwen2_moe() -> PretrainedConfig:
    return Qwen2MoeConfig(
        **_COMMON, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
    )


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(
        **_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    )


def _olmoe() -> PretrainedConfig:
    return OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)


def _deepseek_v2() -> PretrainedConfig:
    cfg = dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4)
    return DeepseekV2Config(
        **cfg, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
        topk_method="greedy", routed_scaling_factor=1.0,
    )


def _deepseek_v3() -> PretrainedConfig:
    cfg = dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4)
    return DeepseekV3Config(
        **cfg, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )


def _gpt_oss() -> PretrainedConfig:
    return GptOssConfig(
        **_COMMON, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16,
    )


def _glm4_moe() -> PretrainedConfig:
    cfg = dict(_COMMON, num_hidden_layers=3)
    return Glm4MoeConfig(
        **cfg, head_dim=8, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.5,
    )


FAMILY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "glm4_moe": _glm4_moe,
}


def _qwen3_next() -> PretrainedConfig:  # hybrid attention: gated-delta-rule linear + full layers
    return Qwen3NextConfig(
        **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    )


def _llama4_text() -> PretrainedConfig:  # Llama4ForCausalLM: sigmoid top-1 routing + a shared expert
    return Llama4TextConfig(
        **_COMMON, head_dim=8, intermediate_size=24, intermediate_size_mlp=48, num_local_experts=8,
        num_experts_per_tok=1, attention_chunk_size=64,
    )


def _dbrx() -> PretrainedConfig:  # flat w1/v1/w2 experts (shimmed); 5.24 needs rope_theta and clip_qkv in attn_config
    c = {k: v for k, v in _COMMON.items() if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "max_position_embeddings")}
    return DbrxConfig(
        **c, d_model=32, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8, "moe_top_k": 2},
    )


def _jetmoe() -> PretrainedConfig:  # MLP experts in two ParallelExperts (shimmed) + attention experts (kept)
    c = {k: v for k, v in _COMMON.items() if k not in ("num_attention_heads",)}
    return JetMoeConfig(**c, kv_channels=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)


def _longcat_flash() -> PretrainedConfig:  # 8 real + 3 identity (zero-compute) experts per layer (shimmed)
    c = {k: v for k, v in _COMMON.items() if k not in ("num_hidden_layers", "num_key_value_heads")}
    return LongcatFlashConfig(**c, num_layers=2, ffn_hidden_size=32, q_lora_rank=16, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=2,
                              n_routed_experts=8, zero_expert_num=3, expert_ffn_hidden_size=24,
                              routed_scaling_factor=2.0)


# Families covered by the family table (tests/test_families.py) and the contract table, not (yet) by
# every feature test that iterates FAMILY_CONFIGS.
MORE_FAMILY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen3_next": _qwen3_next,
    "llama4_text": _llama4_text,
    "dbrx": _dbrx,
    "jetmoe": _jetmoe,
    "longcat_flash": _longcat_flash,
}


def tiny_config(family: str) -> PretrainedConfig:
    """The tiny config of `family` (one of FAMILY_CONFIGS or MORE_FAMILY_CONFIGS)."""
    known = {**FAMILY_CONFIGS, **MORE_FAMILY_CONFIGS}
    if family not in known:
        raise ValueError(f"unknown family {family!r}; known: {sorted(known)}")
    return known[family]()


def tiny_model(family: str, seed: int = 0, router_scale: float = 8.0) -> torch.nn.Module:
    """A seeded random causal LM of `family` in float32 and eval mode, with sharpened routers."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = router_scale * 0.02 if _is_router_weight(name) else 0.05
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=generator) * 0.05)
    return model.eval()


def sharp_tiny_model(family: str) -> torch.nn.Module:
    """A tiny model whose next-token distributions depend visibly on the experts (random tiny models
    are near-uniform): larger lm_head and expert output weights. For router-calibration tests."""
    from moeprune.adapters import find_moe_layers

    model = tiny_model(family)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
        for layer in find_moe_layers(model):
            layer.experts.down_proj.mul_(2.0)
    return model


def _is_router_weight(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight",
                          "feed_forward.router.weight", "ffn.router.layer.weight",
                          "mlp.router.classifier.weight"))


def random_batch(vocab_size: int, batch: int = 2, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def save_tiny_checkpoint(family: str, path, seed: int = 0, max_shard_size: str | int = "5GB"):
    """Write a tiny random checkpoint of `family` with a byte-level tokenizer to `path`."""
    from pathlib import Path

    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    path = Path(path)
    model = tiny_model(family, seed=seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(path)
    return path
