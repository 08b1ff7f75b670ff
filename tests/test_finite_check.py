"""`nonfinite.all_finite` (min/max based) agrees with `torch.isfinite(t).all()` for every position of
a bad value, every float dtype and both signs of Inf (the streamed writer and loader rely on it)."""

from __future__ import annotations

import pytest
import torch

from moeprune.nonfinite import all_finite, nonfinite_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_every_position_and_kind_of_bad_value_is_found(dtype):
    for size in (1, 67, 1031):  # short, odd (vector tails), several vector widths
        base = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(dtype)
        assert all_finite(base)
        positions = range(size) if size < 100 else (0, 1, 15, 16, 31, 32, 63, 64, 511, size - 2, size - 1)
        for pos in positions:
            for bad in (float("nan"), float("inf"), float("-inf")):
                t = base.clone()
                t[pos] = bad
                assert not all_finite(t), (size, pos, bad)


def test_large_finite_values_empty_tensors_and_float8_fallback():
    assert all_finite(torch.full((5,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16))
    assert all_finite(torch.empty(0, 3))
    t = torch.zeros(40, dtype=torch.float8_e5m2)  # no aminmax for float8: chunked isfinite
    assert all_finite(t)
    t[33] = float("inf")
    assert not all_finite(t)


def test_rows_of_bad_values():
    t = torch.randn(6, 4, dtype=torch.bfloat16)
    assert nonfinite_rows(t) == []
    t[2, 1], t[5, 3] = float("nan"), float("-inf")
    assert nonfinite_rows(t) == [2, 5]
