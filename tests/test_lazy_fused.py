"""Per-expert checkpoint tensors are copied straight into the fused experts tensor (no stacked
temporaries), giving exactly what transformers' converter builds."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from moeprune.io.lazy_load import build_skeleton
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint
from moeprune.testing.tiny_models import save_tiny_checkpoint


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_direct_fill_equals_the_converter(family, dtype, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family, max_shard_size="20KB")
    model = build_skeleton(path)
    with LazyCheckpoint(path) as ckpt:
        keymap = KeyMap(model, ckpt.keys())
        groups: dict[str, list[str]] = {}
        for key, target in keymap.targets.items():
            if target.source_pattern is not None and target.expert_index is not None:
                groups.setdefault(target.model_key, []).append(key)
        assert groups, "expected per-expert keys on disk"
        for name, keys in groups.items():
            pattern = keymap.targets[keys[0]].source_pattern
            converter = keymap.pattern_to_converter[pattern]
            direct = keymap._stack_direct(ckpt, keys, converter, dtype)
            assert direct is not None, name
            mapping = deepcopy(converter)
            for key in sorted(keys, key=lambda k: (keymap.targets[k].source_pattern != converter.source_patterns[0],
                                                   keymap.targets[k].expert_index)):
                mapping.add_tensor(name, key, keymap.targets[key].source_pattern, ckpt.get(key))
            reference = mapping.convert(name, model=model, config=model.config)[name]
            reference = reference[0] if isinstance(reference, list) else reference
            reference = reference.to(dtype) if dtype is not None else reference
            assert direct.dtype == reference.dtype and torch.equal(direct, reference), name


def test_irregular_keys_fall_back_to_the_converter(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "m")
    model = build_skeleton(path)
    with LazyCheckpoint(path) as ckpt:
        keymap = KeyMap(model, ckpt.keys())
        keys = [k for k, t in keymap.targets.items() if t.model_key.endswith("layers.0.mlp.experts.down_proj")]
        converter = keymap.pattern_to_converter[keymap.targets[keys[0]].source_pattern]
        missing_one = [k for k in keys if keymap.targets[k].expert_index != 3]
        assert keymap._stack_direct(ckpt, missing_one, converter, None) is None
