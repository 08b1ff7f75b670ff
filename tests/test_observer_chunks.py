"""The observer reduces large batches' routed rows in blocks (`observer.ROW_CHUNK`) to bound its
temporaries: the statistics equal the one-block reduction (sums to float rounding, maxima and
counts exactly), with and without padding masks."""

from __future__ import annotations

import torch

from moeprune.calibration import observer
from moeprune.calibration.observer import calibrate
from moeprune.testing.tiny_models import random_batch, tiny_model


def test_blockwise_statistics_equal_one_block(monkeypatch):
    model = tiny_model("qwen3_moe")
    ids = random_batch(272, batch=4, seq_len=12, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:]}]
    whole = calibrate(model, batches, progress=False)
    monkeypatch.setattr(observer, "ROW_CHUNK", 5)  # every layer's rows in several blocks
    blocks = calibrate(model, batches, progress=False)
    for index, layer in whole.layers.items():
        for name, value in layer.tensors.items():
            other = blocks.layers[index].tensors[name]
            if name.startswith("max") or name.endswith("gmax") or name == "count":
                assert torch.equal(other, value), (index, name)
            else:
                torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=f"{index} {name}")  # float32 block sums
