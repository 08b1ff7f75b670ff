"""Tiny configs of any transformers MoE family, for the family survey (`testing.family_survey`).

`shrunk_config(model_type)` takes the family's config class's defaults and shrinks every size it
knows (`SMALL_SIZES`; encoders to one block, `VISION_SIZES`), adds the fields some families need to
build at that size (`FAMILY_FIELDS`, `ENCODER_FIELDS`) and trims per-layer lists to one layer of each
kind. Only the shrunk fields are passed, so the fields a config derives from them are derived again.
Families with a hand-written tiny config in the family table (`testing.tiny_models`) use that one.
"""

from __future__ import annotations

import transformers

# attribute -> tiny value, applied where a family's config has the attribute
SMALL_SIZES: dict[str, object] = {
    "vocab_size": 272, "hidden_size": 32, "d_model": 32, "num_hidden_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
    "ffn_hidden_size": 48, "moe_intermediate_size": 24, "expert_ffn_hidden_size": 24,
    "shared_expert_intermediate_size": 48, "moe_shared_expert_intermediate_size": 48,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "num_expert_group": 1,
    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "max_position_embeddings": 256, "sliding_window": 16, "decoder_sparse_step": 1,
    "moe_layer_freq": 1, "mlp_only_layers": [], "tie_word_embeddings": False, "bos_token_id": 256,
    "eos_token_id": 256, "pad_token_id": 256, "attention_chunk_size": 64, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "zero_expert_num": 0,
    "num_experts_per_token": 2, "top_k_experts": 2, "unpadded_vocab_size": 260, "shared_intermediate_size": 48,
    "shared_experts_intermediate_size": 48, "linear_head_dim": 8, "linear_num_heads": 4, "mamba_n_heads": 4,
    "mamba_d_head": 8, "mamba_chunk_size": 16, "router_hidden_size": 16, "index_head_dim": 8, "index_n_heads": 2,
    "index_topk": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "num_dense_layers": 0,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 272, "attn_layer_period": 2,
    "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0, "ngram_vocab_size_base": 64,
    "moe_hidden_size": 32, "projector_hidden_size": 48, "out_hidden_size": 32,
}
VISION_SIZES: dict[str, object] = {
    "depth": 1, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
    "num_attention_heads": 4, "out_hidden_size": 32, "deepstack_visual_indexes": [0], "num_position_embeddings": 64,
}
# sizes set even where the default is None (the family then builds with experts)
FORCED = ("n_routed_experts", "num_experts", "num_experts_per_tok", "n_shared_experts", "top_k_experts",
          "moe_intermediate_size", "head_dim", "sliding_window", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim")
# model_type -> fields a family needs beyond the sizes
FAMILY_FIELDS: dict[str, dict[str, object]] = {
    "gemma4": {"enable_moe_block": True}, "doge": {"is_moe": True}, "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "granitemoehybrid": {"mamba_n_heads": 8, "layer_types": ["linear_attention", "full_attention"]},
    "dots3_note": {"head_dim": 16}, "mistral4": {"head_dim": 16}, "kolibri1_1": {"head_dim": 16, "index_num_heads": 2},  # NVFP4 KV rounding
    "glm4v_moe": {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
                                      "mrope_section": [1, 0, 1]}},
    "hy_v4_vl": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}}, "zaya": {"num_experts_per_tok": 1},
    "qwen4_exp": {"indexer_budget": 8, "indexer_compress_ratio": 2},
    "glm5_next": {"index_kpool": 2, "qk_rope_head_dim": 0},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "ernie4_5_vl_moe": {"moe_intermediate_size": [24, 16],  # text and vision experts' widths; 3-D RoPE of 8 dims
                        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [1, 1, 2]}},  # DSA layers: top-k a multiple of the pool, no RoPE
}
# a SAM image encoder (the OCR families' first vision stage), one block
SAM_SIZES: dict[str, object] = {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "global_attn_indexes": [0], "mlp_dim": 48, "downsample_channels": [32, 32], "image_size": 64}
# model_type -> {encoder config key: fields beyond VISION_SIZES}
ENCODER_FIELDS: dict[str, dict[str, dict[str, object]]] = {
    "muse_spark": {"audio_config": {"patch_sizes": [16], "hidden_sizes": [32], "depths": [1]}},
    "deepseek_ocr2": {"vision_config": {"sam_config": SAM_SIZES, "encoder_config": {  # SAM, then a Qwen2-like encoder
        "vocab_size": 272, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_window_layers": 1, "layer_types": ["full_attention"]}}},
    "unlimited_ocr": {"vision_config": {"sam_config": SAM_SIZES, "encoder_config": {  # SAM and a CLIP-like encoder
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}}},
}
LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "hybrid_override_pattern")


def shrunk_config(model_type: str) -> transformers.PretrainedConfig:
    """`model_type`'s tiny config: the hand-written one of the family table where there is one, else
    the class's defaults with every known size shrunk (only the shrunk fields are passed, so that the
    fields a config derives from them are derived again)."""
    from moeprune.testing.tiny_models import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, tiny_config

    if model_type in FAMILY_CONFIGS or model_type in MORE_FAMILY_CONFIGS:
        return tiny_config(model_type)
    cls = transformers.AutoConfig.for_model(model_type).__class__
    values = _shrunk_values(cls().to_dict(), model_type)
    defaults = cls().to_dict()
    text = defaults.get("text_config")
    if isinstance(text, dict):  # a multimodal family's causal LM: shrink its text model too
        values["text_config"] = _shrunk_values(text, model_type)
    for key in ("vision_config", "audio_config"):  # an image-text-to-text model: one-block encoders
        if isinstance(defaults.get(key), dict):
            values[key] = {**{k: v for k, v in VISION_SIZES.items() if k in defaults[key]},
                           **ENCODER_FIELDS.get(model_type, {}).get(key, {})}
    return cls(**values)


def _shrunk_values(defaults: dict, model_type: str) -> dict:
    """The fields of one (sub-)config to pass: tiny sizes, family fields, trimmed per-layer lists."""
    values = {key: small for key, small in SMALL_SIZES.items()
              if defaults.get(key) is not None or (key in FORCED and key in defaults)}
    values.update(FAMILY_FIELDS.get(model_type.removesuffix("_text"), {}))
    for key, sub in defaults.items():  # nested size dicts (DBRX's attn_config / ffn_config)
        if isinstance(sub, dict) and key.endswith("_config") and not key.startswith(("text", "vision", "audio")):
            values[key] = {**sub, **{k: v for k, v in SMALL_SIZES.items() if sub.get(k) is not None}}
    if defaults.get("kv_lora_rank") is not None:  # multi-head latent attention: one kv head per query head
        values["num_key_value_heads"] = values.get("num_attention_heads", 4)
    layers = values.get("num_hidden_layers") or values.get("num_layers") or 2
    for key in LAYER_LISTS:
        if key not in values and isinstance(defaults.get(key), (list, str)) and len(defaults[key]) > layers:
            seen = list(dict.fromkeys(defaults[key]))  # keep one of each layer kind, in order
            kinds = (seen + list(defaults[key]))[:max(layers, len(seen))]
            values[key] = kinds if isinstance(defaults[key], list) else "".join(kinds)
            layers = len(kinds)
    for key in ("num_hidden_layers", "num_layers"):
        if key in values:
            values[key] = layers
    for key, sub in defaults.items():  # per-layer dicts keyed by layer index
        if isinstance(sub, dict) and sub and all(str(k).isdigit() for k in sub):
            values[key] = {k: v for k, v in sub.items() if int(k) < layers}
    return values
