"""A plan says what to do: typed per-layer operations that apply executes without reading params.

Old plans (operations in `params`: merge_align/merge_router, dern_threshold, novice_vectors) still
load, and give the same result as the typed form.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

import moeprune
from moeprune import apply, calibrate, plan
from moeprune.plan import LayerPlan, Plan, PlanError, encode_vectors
from moeprune.testing.checks import logits_of
from moeprune.testing.tiny_models import random_batch, tiny_model

ROOT = Path(moeprune.__file__).resolve().parent


def _stats(family: str = "qwen3_moe"):
    model = tiny_model(family)
    return model, calibrate(model, random_batch(model.config.vocab_size, batch=2, seq_len=12), progress=False)


def _legacy(p: Plan, **params) -> dict:
    """`p` as an old plan file wrote it: operations in params, none on the layers."""
    data = copy.deepcopy(p.to_dict())
    data["params"] = {**data["params"], **params}
    for entry in data["layers"].values():
        for key in ("merge_align", "merge_router", "recombine_threshold", "novice_vectors"):
            entry.pop(key, None)
    return data


def test_strategies_write_typed_operations_not_params():
    model, stats = _stats()
    dern = plan(stats, "dern", 0.5, threshold=0.3)
    assert {lp.recombine_threshold for lp in dern.layers.values()} == {0.3} and "dern_threshold" not in dern.params
    hc = plan(stats, "m-smoe", 0.5, router="average")
    assert all(lp.merge_router == "average" and lp.merge_align is True for lp in hc.layers.values())
    mone = plan(stats, "mone", 0.5)
    assert "novice_vectors" not in mone.params
    assert all(lp.novice_matrix().shape == (len(lp.novices), model.config.hidden_size) for lp in mone.layers.values())
    again = Plan.from_dict(json.loads(json.dumps(mone.to_dict())))
    assert all(torch.equal(again.layers[i].novice_matrix(), lp.novice_matrix()) for i, lp in mone.layers.items())


def test_old_plans_load_with_their_operations():
    _, stats = _stats()
    dern = plan(stats, "dern", 0.5, threshold=0.3)
    old = Plan.from_dict(_legacy(dern, dern_threshold=0.3))
    assert {lp.recombine_threshold for lp in old.layers.values()} == {0.3}
    merge = plan(stats, "m-smoe", 0.5, router="average")
    old = Plan.from_dict(_legacy(merge, merge_align=True, merge_router="average"))
    assert [(lp.merge_align, lp.merge_router) for lp in old.layers.values()] == [(True, "average")] * len(old.layers)
    mone = plan(stats, "mone", 0.5)
    vectors = {str(i): lp.novice_vectors for i, lp in mone.layers.items()}
    old = Plan.from_dict(_legacy(mone, novice_vectors=vectors))
    assert "novice_vectors" not in old.params  # moved onto the layers, not kept twice
    assert all(old.layers[i].novice_vectors == vectors[str(i)] for i in old.layers)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_legacy_and_typed_plans_apply_identically(family):
    model, stats = _stats(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12, seed=1)
    for strategy, kwargs, legacy in [
        ("dern", {"threshold": 0.0}, {"dern_threshold": 0.0}),
        ("m-smoe", {"router": "average"}, {"merge_align": True, "merge_router": "average"}),
    ]:
        typed = plan(stats, strategy, 0.5, **kwargs)
        typed.params = {}  # apply must not need them
        a, b = tiny_model(family), tiny_model(family)
        apply(a, typed)
        apply(b, Plan.from_dict(_legacy(typed, **legacy)))
        assert torch.equal(logits_of(a, ids), logits_of(b, ids)), strategy


def test_layer_operations_win_over_stray_params():
    model, stats = _stats()
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12, seed=1)
    p = plan(stats, "dern", 0.5, threshold=0.0)
    for lp in p.layers.values():
        lp.recombine_threshold = None  # plain dropping, whatever params say
    p.params["dern_threshold"] = 0.0
    p.params["merge_router"] = "average"
    dropped, plain = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    apply(dropped, p)
    apply(plain, plan(stats, "soft-frequency", 0.5))
    assert torch.equal(logits_of(dropped, ids), logits_of(plain, ids))


@pytest.mark.parametrize("change, message", [
    ({"merge_router": "mean"}, "merge_router must be one of representative, average"),
    ({"merge_align": True, "groups": None, "group_weights": None}, "merge_align/merge_router are options of merge groups"),
    ({"recombine_threshold": -0.5}, "recombine_threshold must be a cosine"),
    ({"novice_vectors": encode_vectors(torch.zeros(3, 8))}, "novice_vectors has 3 rows for 0 novices"),
])
def test_bad_operations_fail_naming_the_layer(change, message):
    lp = LayerPlan(layer=2, num_experts=4, kept=[0, 2], groups=[[0, 1], [2, 3]], group_weights=[[0.5, 0.5]] * 2)
    for key, value in change.items():
        setattr(lp, key, value)
    with pytest.raises(PlanError, match=f"layer 2: {re.escape(message)}"):
        lp.validate(top_k=2)


def test_apply_never_reads_strategy_params():
    # The executors (in memory and streamed, all in apply/) act on LayerPlan fields; they read no
    # `params[...]` / `params.get(...)` (writing a method's report into the plan's params is fine).
    sources = sorted((ROOT / "apply").glob("*.py"))
    assert ROOT / "apply" / "streamed.py" in sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"params(\.get\(|\[[^\]]*\](?!\s*=[^=]))", text), path.name
        for key in ("dern_threshold", '"merge_align"', '"merge_router"', '"novice_vectors"'):
            assert key not in text, (path.name, key)
