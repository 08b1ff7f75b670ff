"""Which transformers auto class loads a checkpoint: a causal LM, or a multimodal model whose text
model is the MoE (Qwen3-VL-MoE, GLM-4.5V, ERNIE-4.5-VL, ...: `AutoModelForImageTextToText`).

Every loader of moeprune (in memory, lazy, skeleton, reload) asks here, so a multimodal MoE
checkpoint loads, prunes (its text model's experts; the vision tower is copied) and saves as the
same class it came as.
"""

from __future__ import annotations

from typing import Any


# image-text-to-text classes that are no autoregressive LM: model_type -> what they are
NOT_AUTOREGRESSIVE = {"diffusion_gemma": "a block-diffusion model (its forward samples noise)"}


def text_model_class(config: Any) -> type | None:
    """The auto class that loads `config` as a model taking token ids: `AutoModelForCausalLM`, or
    `AutoModelForImageTextToText` for a model type with no causal LM but an image-text-to-text
    model; None when there is neither (or it is no autoregressive LM: `NOT_AUTOREGRESSIVE`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in NOT_AUTOREGRESSIVE:
        return AutoModelForImageTextToText
    return None


def auto_model_class(config: Any) -> type:
    """`text_model_class`, defaulting to `AutoModelForCausalLM` (whose own error then says why)."""
    from transformers import AutoModelForCausalLM

    return text_model_class(config) or AutoModelForCausalLM
