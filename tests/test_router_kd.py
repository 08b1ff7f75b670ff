"""Router calibration: top-k teacher cache, global Router KD, layer-local variant, recipe wiring."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from moeprune import apply, calibrate, plan
from moeprune.adapters import find_moe_layers
from moeprune.recover.router_kd import batch_order, cache_kl, router_kd
from moeprune.recover.router_kd_local import block_mse, capture_block_io, fit_router_local, router_kd_local
from moeprune.recover.router_params import router_parameters
from moeprune.recover.teacher_cache import TeacherCache, build_teacher_cache, kd_loss, topk_kl
from moeprune.recover.kd_data import held_apart_ids
from moeprune.testing.tiny_models import random_batch, sharp_tiny_model, tiny_model
from moeprune.testing.tiny_tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def text_ids(code_file) -> dict[str, torch.Tensor]:
    """Byte-level code text: planning, router-calibration and held-out windows, pairwise disjoint."""
    tok = byte_tokenizer()
    planning = held_apart_ids(code_file, tok, 8, 32, seed=0)
    train = held_apart_ids(code_file, tok, 32, 32, seed=1, exclude=planning)
    heldout = held_apart_ids(code_file, tok, 16, 32, seed=2, exclude=torch.cat([planning, train]))
    return {"planning": planning, "train": train, "heldout": heldout, "source": code_file}


def _compressed(family: str, planning: torch.Tensor, strategy: str = "frequency", ratio: float = 0.5):
    """(dense teacher, compressed student), pruned on the planning tokens."""
    dense = sharp_tiny_model(family)
    student = copy.deepcopy(dense)
    stats = calibrate(student, planning, progress=False)
    apply(student, plan(stats, strategy, ratio, model=student))
    return dense, student


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_router_kd_tokens_are_disjoint_from_planning_and_seeded(text_ids):
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    assert not rows(text_ids["planning"]) & rows(text_ids["train"])
    assert not rows(text_ids["heldout"]) & (rows(text_ids["planning"]) | rows(text_ids["train"]))
    again = held_apart_ids(text_ids["source"], byte_tokenizer(), 32, 32, seed=1, exclude=text_ids["planning"])
    assert torch.equal(again, text_ids["train"])


# ---- teacher cache ------------------------------------------------------------------------
def test_topk_kl_equals_full_kl_when_k_covers_the_vocabulary_and_bounds_it_below_otherwise():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 6, 40) * 3, torch.randn(2, 6, 40) * 3
    full = F.kl_div(F.log_softmax(student[:, :-1], -1), F.log_softmax(teacher[:, :-1], -1), log_target=True,
                    reduction="none").sum(-1)
    for k, exact in ((40, True), (5, False)):
        logp = F.log_softmax(teacher[:, :-1], -1)
        values, index = logp.topk(k, dim=-1)
        tail = torch.log1p(-values.exp().sum(-1)) if k < 40 else torch.full(values.shape[:2], float("-inf"))
        kl = topk_kl(student, index, values, tail)
        if exact:
            torch.testing.assert_close(kl, full, atol=1e-5, rtol=1e-5)
        else:
            assert (kl >= -1e-6).all() and (kl <= full + 1e-5).all() and (kl < full - 1e-3).any()
    same = topk_kl(teacher, *(lambda lp: (lp.topk(5, -1)[1], lp.topk(5, -1)[0]))(F.log_softmax(teacher[:, :-1], -1)),
                   torch.log1p(-F.log_softmax(teacher[:, :-1], -1).topk(5, -1)[0].exp().sum(-1)))
    assert same.abs().max() < 1e-5  # KL of the teacher to itself


def test_kd_loss_masks_padding_and_scales_by_tau_squared():
    torch.manual_seed(1)
    teacher, student = torch.randn(1, 5, 30), torch.randn(1, 5, 30)
    tau = 2.0
    logp = F.log_softmax(teacher[:, :-1] / tau, -1)
    values, index = logp.topk(30, -1)
    tail = torch.full(values.shape[:2], float("-inf"))
    per_token = topk_kl(student, index, values, tail, temperature=tau)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    expected = tau**2 * per_token[0, :2].mean()
    torch.testing.assert_close(kd_loss(student, index, values, tail, mask=mask, temperature=tau), expected)


def test_teacher_cache_round_trips_exactly(tmp_path):
    model = tiny_model("qwen3_moe")
    ids = random_batch(model.config.vocab_size, batch=3, seq_len=10, seed=4)
    cache = build_teacher_cache(model, ids, k=16, batch_size=2, progress=False)
    assert cache.top_index.shape == (3, 9, 16) and cache.tail_logmass.shape == (3, 9)
    full = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    torch.testing.assert_close(cache.top_logprob, full.topk(16, -1)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.tail_logmass.exp() + cache.top_logprob.exp().sum(-1), torch.ones(3, 9), atol=1e-5, rtol=0)
    assert cache_kl(model, cache) == pytest.approx(0.0, abs=1e-5)
    back = TeacherCache.load(cache.save(tmp_path / "teacher.safetensors"))
    for name in ("input_ids", "top_index", "top_logprob", "tail_logmass"):
        assert torch.equal(getattr(back, name), getattr(cache, name))
    assert back.temperature == cache.temperature and back.meta == cache.meta


def test_batch_order_is_seeded_and_covers_every_sequence_each_epoch():
    a, b = batch_order(5, 4, 3, seed=7), batch_order(5, 4, 3, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a)[:5].tolist()) == list(range(5))
    assert not all(torch.equal(x, y) for x, y in zip(a, batch_order(5, 4, 3, seed=8)))


# ---- global router KD ---------------------------------------------------------------------
def _caches(dense, text_ids, k: int = 32):
    return (build_teacher_cache(dense, text_ids["train"], k=k, progress=False),
            build_teacher_cache(dense, text_ids["heldout"], k=k, progress=False))


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "deepseek_v3"])
def test_router_kd_changes_only_router_parameters(family, text_ids):
    dense, student = _compressed(family, text_ids["planning"])
    train, _ = _caches(dense, text_ids)
    before_state = _state(student)
    report = router_kd(student, train, steps=40, lr=3e-3, batch_size=8, seed=0, progress=False)
    routers = set(router_parameters(student))
    if family == "gpt_oss":
        assert any(name.endswith(".bias") for name in routers)  # the learnable router bias trains too
    after = _state(student)
    for name, tensor in after.items():
        if name in routers:
            assert not torch.equal(tensor, before_state[name]), f"router {name} did not change"
        else:
            assert torch.equal(tensor, before_state[name]), f"{name} changed but is not a router parameter"
    if family == "deepseek_v3":  # the load-balancing correction buffer exists and stayed frozen (checked above)
        assert any(n.endswith("e_score_correction_bias") for n in after)
        assert not any(n.endswith("e_score_correction_bias") for n in routers)
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert report["grad_norm_first"] > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_router_kd_recovers_perturbed_routers_on_heldout_text(family, text_ids):
    """A student whose only damage is in the routers can be repaired by router KD: held-out KL drops."""
    dense = sharp_tiny_model(family)
    student = copy.deepcopy(dense)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in find_moe_layers(student):
            layer.router.weight.add_(torch.randn(layer.router.weight.shape, generator=generator) * 0.5 * layer.router.weight.std())
    train, heldout = _caches(dense, text_ids)
    kl_before = cache_kl(student, heldout)
    router_kd(student, train, steps=40, lr=3e-3, batch_size=8, progress=False)
    assert cache_kl(student, heldout) < kl_before


def test_router_kd_is_reproducible_for_a_seed(text_ids):
    dense, a = _compressed("qwen3_moe", text_ids["planning"])
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    cache = build_teacher_cache(dense, text_ids["train"][:6], k=16, progress=False)
    for model, seed in ((a, 5), (b, 5), (c, 6)):
        router_kd(model, cache, steps=6, lr=1e-2, batch_size=2, seed=seed, progress=False)
    ra, rb, rc = (router_parameters(m) for m in (a, b, c))
    assert all(torch.equal(ra[n], rb[n]) for n in ra)
    assert not all(torch.equal(ra[n], rc[n]) for n in ra)


def test_router_kd_reaches_the_full_width_router_of_a_novice_model(text_ids):
    """MoNE keeps every router row and routes novices by their gate: perturb the routers of a novice
    model and router KD towards the unperturbed novice model repairs them (held-out KL drops)."""
    _, target = _compressed("qwen3_moe", text_ids["planning"], strategy="mone")
    assert [layer.router.weight.shape[0] for layer in find_moe_layers(target)] == [8, 8]
    student = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in find_moe_layers(student):
            layer.router.weight.add_(torch.randn(layer.router.weight.shape, generator=generator) * 0.5 * layer.router.weight.std())
    train, heldout = _caches(target, text_ids)
    kl_before = cache_kl(student, heldout)
    report = router_kd(student, train, steps=40, lr=3e-3, batch_size=8, progress=False)
    assert report["grad_norm_first"] > 0 and cache_kl(student, heldout) < kl_before


# ---- layer-local --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_local_router_fit_lowers_every_layers_reconstruction_error_and_touches_only_routers(family, text_ids):
    dense, student = _compressed(family, text_ids["planning"])
    io = capture_block_io(dense, text_ids["train"], progress=False)
    x, y = io[0]
    dense_block = find_moe_layers(dense)[0].block
    out = dense_block(x.unsqueeze(0))
    torch.testing.assert_close((out[0] if isinstance(out, tuple) else out).reshape(x.shape), y)  # cache = dense output
    before_state = _state(student)
    report = router_kd_local(student, io, steps=60, lr=3e-3, batch_tokens=256, progress=False)
    for values in report["layers"].values():
        assert values["mse_after"] <= values["mse_before"]  # the best router seen is kept
    assert report["mean_rel_mse_after"] < report["mean_rel_mse_before"]
    routers = set(router_parameters(student))
    assert all(torch.equal(v, before_state[k]) for k, v in _state(student).items() if k not in routers)


def test_fit_router_local_with_a_dense_function_equals_the_fit_with_targets(text_ids):
    dense, student = _compressed("mixtral", text_ids["planning"])
    dense_block = find_moe_layers(dense)[0].block
    x, y = capture_block_io(dense, text_ids["train"], progress=False)[0]
    a, b = (find_moe_layers(copy.deepcopy(student))[0] for _ in range(2))
    untouched = block_mse(copy.deepcopy(a.block), x, y)
    with_targets = fit_router_local(a.block, x, y, steps=30, lr=3e-3, batch_tokens=256)
    with_fn = fit_router_local(b.block, x, dense_fn=lambda h: dense_block(h.unsqueeze(0)), steps=30, lr=3e-3,
                               batch_tokens=256)
    assert with_targets["mse_before"] == pytest.approx(untouched, rel=1e-6)
    assert with_fn["mse_after"] == pytest.approx(with_targets["mse_after"], rel=1e-5)
    assert with_targets["mse_after"] < with_targets["mse_before"]
    torch.testing.assert_close(a.router.weight, b.router.weight)


# ---- recipe / API -------------------------------------------------------------------------
def test_recipe_router_kd_section_validates():
    from moeprune.config import load_recipe

    recipe = load_recipe(None, {"router_kd.steps": 200, "router_kd.lr": 1e-3})
    assert recipe.router_kd.steps == 200 and recipe.router_kd.temperature == 1.0 and recipe.router_kd.top_k == 64
    assert load_recipe(None).router_kd is None
    with pytest.raises(ValueError, match="steps > 0"):
        load_recipe(None, {"router_kd.lr": 1e-3})


@pytest.mark.parametrize("strategy", ["frequency", "mone"])
def test_api_prune_with_router_kd_saves_the_trained_routers(strategy, tmp_path, code_file):
    from moeprune.api import prune
    from moeprune.config import load_recipe
    from moeprune.io.checkpoint import load_pruned

    model = sharp_tiny_model("qwen3_moe")
    recipe = load_recipe(None, {
        "strategy": strategy, "ratio": 0.5, "output": str(tmp_path / "out"), "calibration.source": code_file,
        "calibration.samples": 4, "calibration.seq_len": 32, "router_kd.steps": 3, "router_kd.lr": 1e-2,
        "router_kd.samples": 4, "router_kd.batch_size": 2, "router_kd.top_k": 8, "router_kd.local": True,
        "router_kd.local_steps": 3,
    })
    result = prune(recipe, model=model, tokenizer=byte_tokenizer(), progress=False)
    report = result.plan.params["router_kd"]
    assert report["global"]["steps"] == 3 and set(report["local"]["layers"]) == {"0", "1"}
    assert report["sequences"] == 4 and report["seq_len"] == 32
    trained = {k: v.clone() for k, v in router_parameters(result.model).items()}
    reloaded = router_parameters(load_pruned(result.output))
    assert set(reloaded) == set(trained) and all(torch.equal(reloaded[k], trained[k]) for k in trained)


# ---- CLI ----------------------------------------------------------------------------------
def test_cli_prune_with_router_kd_and_its_refusals(tmp_path, code_file):
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    model = save_tiny_checkpoint("qwen3_moe", tmp_path / "model")

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    common = ["prune", model, "--strategy", "frequency", "--ratio", "0.5", "--calibration", code_file,
              "--samples", "4", "--seq-len", "32"]
    result = run(*common, "--router-kd", "2", "--router-kd-lr", "1e-2", "--router-kd-samples", "4",
                 "--router-kd-local", "--router-kd-local-steps", "2", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "router KD: 2 steps" in result.output and "local router KD: 2 steps/layer" in result.output
    saved = json.loads((tmp_path / "out" / "moeprune_plan.json").read_text())
    assert saved["params"]["router_kd"]["global"]["steps"] == 2
    refused = run(*common, "--router-kd", "2", "--offload", "-o", tmp_path / "out2")
    assert refused.exit_code != 0 and "in memory only" in refused.output
    nothing = run(*common, "--router-kd-lr", "1e-3", "-o", tmp_path / "out3")
    assert nothing.exit_code != 0 and "steps > 0" in nothing.output
