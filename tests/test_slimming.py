"""Channel slimming: CAMERA energy and statistics by hand, attribution vs autograd, physical slicing in
every layout, allocation rules, save/reload (stock loader for uniform widths, load_pruned otherwise)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moeprune
from moeprune.adapters import find_moe_layers
from moeprune.calibration.attribution import AttributionCollector
from moeprune.calibration.stats import LayerStats
from moeprune.io.checkpoint import load_pruned
from moeprune.slimming.allocate import attr_coverage, global_keep, loss_coverage, uniform_keep
from moeprune.slimming.channels import EXPERT_WIDTH_KEY, LAYER_WIDTH_KEY, slim_experts
from moeprune.slimming.run import slim_channels
from moeprune.slimming.scores import camera_energy, expert_attribution
from moeprune.sparsify.expert_weights import read_expert_linears, write_expert_linears
from moeprune.testing.checks import logits_of
from moeprune.testing.tiny_models import FAMILY_CONFIGS, random_batch, tiny_model


def test_camera_energy_by_hand():
    stats = LayerStats({"act_gsq_sum": torch.tensor([[4.0, 1.0], [0.0, 9.0]], dtype=torch.float64),
                        "act_gmax": torch.tensor([[2.0, 1.0], [0.0, 5.0]], dtype=torch.float64)})
    down = torch.tensor([[[1.0, 0.0], [2.0, 1.0]], [[0.5, 3.0], [0.0, 0.0]]])  # [E=2, H=2, I=2]
    # ||down[:, i]||^2: expert 0 -> (5, 1), expert 1 -> (0.25, 9)
    e = camera_energy(stats, down, alpha=0.9)
    assert e.reshape(-1).tolist() == pytest.approx([5 * (0.1 * 4 + 0.9 * 2), 1 * (0.1 * 1 + 0.9 * 1), 0.0, 9 * (0.1 * 9 + 0.9 * 5)])
    assert camera_energy(stats, down, alpha=1.0)[1, 1] == pytest.approx(45.0)


def test_observer_camera_statistics_by_hand():
    """act_gsq_sum / act_gmax equal sum / max over routed tokens of (g * silu(gate x) * (up x))^2."""
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[0]
    seen = {}

    def grab(module, args, kwargs, output):
        seen["x"], seen["idx"], seen["w"] = args

    handle = layer.experts.register_forward_hook(grab, with_kwargs=True)
    ids = random_batch(272, 2, 10)
    with torch.no_grad():
        model(ids)
    handle.remove()
    stats = moeprune.calibrate(model, ids, progress=False).layers[layer.layer]
    lin = read_expert_linears(layer.experts)
    x, idx, w = seen["x"].double(), seen["idx"], seen["w"].double()
    e_count, i_dim = lin["gate"].shape[:2]
    ssum = torch.zeros(e_count, i_dim, dtype=torch.float64)
    smax = torch.zeros(e_count, i_dim, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            phi = w[t, slot] * F.silu(lin["gate"][e].double() @ x[t]) * (lin["up"][e].double() @ x[t])
            ssum[e] += phi**2
            smax[e] = torch.maximum(smax[e], phi**2)
    assert torch.allclose(stats.act_gsq_sum, ssum, rtol=1e-4, atol=1e-9)
    assert torch.allclose(stats.act_gmax, smax, rtol=1e-4, atol=1e-9)


def test_attribution_closed_form_equals_autograd():
    """a_e from the collector's sums equals -u_e * mean_t(dL/dz . z) of the scaled block, by autograd."""
    torch.manual_seed(0)
    n, h, e, alpha = 6, 5, 3, 0.9
    residual = torch.randn(n, h, dtype=torch.float64)
    expert_ids = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1, 2, 0, 1])
    token_ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 2, 5, 3, 5, 4])
    gates = torch.rand(12, dtype=torch.float64)
    z = torch.randn(12, h, dtype=torch.float64, requires_grad=True)
    m = torch.zeros(n, h, dtype=torch.float64).index_add(0, token_ids, gates.unsqueeze(1) * z)
    y = (residual + m).detach()
    y_hat = residual + torch.zeros(n, h, dtype=torch.float64).index_add(0, token_ids, alpha * gates.unsqueeze(1) * z)
    loss = (((y_hat - y) ** 2).sum(1) / (y**2).sum(1)).sum()
    loss.backward()
    contrib = (z.grad * z.detach()).sum(1)
    count = torch.bincount(expert_ids, minlength=e).double()
    expected = -(count / n) * torch.zeros(e, dtype=torch.float64).index_add(0, expert_ids, contrib) / count

    tensors = {"attr_sum": torch.zeros(e, dtype=torch.float64), "layer_loss_sum": torch.zeros((), dtype=torch.float64)}
    collector = AttributionCollector(tensors)
    collector.record_routed(expert_ids, token_ids, (gates.unsqueeze(1) * z).detach(), torch.ones(n, dtype=torch.bool))
    collector.layer_hook(None, (), (residual + m).detach())
    stats = LayerStats({**tensors, "count": count, "tokens": torch.tensor(float(n), dtype=torch.float64)})
    assert expert_attribution(stats, alpha).tolist() == pytest.approx(expected.tolist())
    assert float((1 - alpha) ** 2 * tensors["layer_loss_sum"]) == pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_slimming_zero_channels_keeps_logits(family):
    model = tiny_model(family)
    ids = random_batch(272, 2, 10)
    g = torch.Generator().manual_seed(1)
    keeps = {}
    for layer in find_moe_layers(model):
        lin = {k: v.clone() for k, v in read_expert_linears(layer.experts).items()}
        keep = []
        for e in range(layer.num_experts):
            perm = torch.randperm(layer.layout.intermediate_dim, generator=g)
            n = int(torch.randint(1, layer.layout.intermediate_dim, (1,), generator=g))
            for k in lin:  # zero the dropped channels: gate/up rows, down columns
                if k == "down":
                    lin[k][e][:, perm[n:]] = 0
                else:
                    lin[k][e][perm[n:]] = 0
            keep.append(perm[:n])
        write_expert_linears(layer.experts, lin)
        keeps[layer.layer] = keep
    reference = logits_of(model, ids)
    params = sum(p.numel() for p in model.parameters())
    for layer in find_moe_layers(model):
        widths = slim_experts(layer.experts, keeps[layer.layer])
        assert widths == [k.numel() for k in keeps[layer.layer]]
    assert torch.allclose(logits_of(model, ids), reference, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in model.parameters()) <= params


def test_allocation_rules_by_hand():
    s = torch.tensor([[5.0, 1.0, 3.0, 0.0], [2.0, 8.0, 0.5, 4.0]])
    assert [k.tolist() for k in uniform_keep(s, 2)] == [[0, 2], [1, 3]]
    assert [k.tolist() for k in global_keep(s, 3)] == [[0], [1, 3]]
    # expert 1 has no attribution: it gets no channel; expert 0 keeps the target's 3 best
    c = torch.tensor([[1.0, 4.0, 2.0, 3.0], [9.0, 9.0, 9.0, 9.0]])
    keep = attr_coverage(c, torch.tensor([1.0, 0.0]), target=3, min_per_expert=0)
    assert [k.tolist() for k in keep] == [[1, 2, 3], []]
    # equal attributions: coverage picks the channels with the most score
    keep = attr_coverage(c, torch.tensor([1.0, 1.0]), target=4, min_per_expert=0)
    assert sum(k.numel() for k in keep) == 4
    counts = loss_coverage({0: 0.1, 1: 0.9, 2: 0.4}, {i: torch.rand(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)}, 0.5)
    assert sum(counts.values()) == 48


def _calibrated(family: str = "qwen3_moe"):
    model = tiny_model(family)
    ids = random_batch(272, 4, 16)
    return model, ids, moeprune.calibrate(model, ids, progress=False)


def test_uniform_width_is_stock_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, stats = _calibrated()
    plan = moeprune.plan(stats, strategy="reap", ratio=0.25)
    moeprune.apply(model, plan)
    report = slim_channels(model, stats, plan, ratio=1 / 3, method="camera", mode="uniform")
    assert all(w == [16] * 6 for w in report.widths.values())
    assert model.config.moe_intermediate_size == 16 and not hasattr(model.config, LAYER_WIDTH_KEY)
    moeprune.save(model, tmp_path / "out", plan=plan)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.allclose(logits_of(stock, ids), logits_of(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,mode", [("camera", "expert"), ("coverage", "expert"), ("coverage", "uniform")])
def test_non_uniform_widths_reload_with_load_pruned(tmp_path, method, mode):
    model, ids, stats = _calibrated()
    report = slim_channels(model, stats, None, ratio=0.5, method=method, mode=mode, min_per_expert=4)
    assert report.removed_share == pytest.approx(0.5, abs=0.05)
    before = logits_of(model, ids)
    moeprune.save(model, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits_of(loaded, ids), before)
    if mode == "expert":
        assert getattr(loaded.config, EXPERT_WIDTH_KEY)


def test_per_layer_widths_need_load_pruned(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, stats = _calibrated()
    layers = find_moe_layers(model)
    widths = {}
    for layer, w in zip(layers, (8, 16)):
        widths[layer.layer] = slim_experts(layer.experts, [torch.arange(w)] * layer.num_experts)
    from moeprune.slimming.channels import record_widths

    info = record_widths(model, widths)
    assert info["per_layer"] and not info["per_expert"]
    moeprune.save(model, tmp_path / "out")
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits_of(load_pruned(tmp_path / "out", dtype=torch.float32), ids), logits_of(model, ids))


def test_slimming_after_expert_dropping_uses_kept_experts_statistics():
    model, ids, stats = _calibrated()
    reference = copy.deepcopy(model)
    plan = moeprune.plan(stats, strategy="frequency", ratio=0.25)
    moeprune.apply(model, plan)
    slim_channels(model, stats, plan, ratio=0.0, method="camera", mode="uniform")  # keeps every channel
    moeprune.apply(reference, plan)
    assert torch.equal(logits_of(model, ids), logits_of(reference, ids))
    assert plan.params["slim"]["removed_share"] == 0.0


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_uniform_width_reloads_in_every_family(tmp_path, family):
    """Stock-loadable where only the routed experts read the width key; otherwise (shared experts sized
    from moe_intermediate_size: DeepSeek-V2/V3, GLM-4.5) the key is kept and load_pruned rebuilds it."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    ids = random_batch(272, 2, 10)
    stats = moeprune.calibrate(model, ids, progress=False)
    report = slim_channels(model, stats, None, ratio=1 / 3, method="camera", mode="uniform")
    moeprune.save(model, tmp_path / "out")
    expected = logits_of(model, ids)
    shared_from_key = family in ("deepseek_v2", "deepseek_v3", "glm4_moe")
    assert report.storage["stock_loadable"] is not shared_from_key
    if not shared_from_key:
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        assert torch.allclose(logits_of(stock, ids), expected, atol=1e-6, rtol=0)
    assert torch.allclose(logits_of(load_pruned(tmp_path / "out", dtype=torch.float32), ids), expected, atol=1e-6, rtol=0)


def test_uniform_width_with_tied_embeddings_is_stock_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    from moeprune.testing.tiny_models import tiny_config

    config = tiny_config("qwen3_moe")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = random_batch(272, 2, 10)
    report = slim_channels(model, moeprune.calibrate(model, ids, progress=False), None, ratio=1 / 3)
    assert report.storage["stock_loadable"]
    moeprune.save(model, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.allclose(logits_of(stock, ids), logits_of(model, ids), atol=1e-6, rtol=0)
