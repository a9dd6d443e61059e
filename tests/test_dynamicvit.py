"""Learned pruning (DynamicViT): predictors, training gradient, inference removal, files."""

from __future__ import annotations

import json

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from tokenbudget.learned import PredictorSet, TokenKeepPredictor, load_predictors, save_predictors
from tokenbudget.learned.train import budget_loss, train_predictors
from tokenbudget.state import DECISION_EPS, TokenState
from tokenbudget.strategies.dynamicvit import DynamicViTStrategy
from tokenbudget.strategies.stages import stage_removals

pytest.importorskip("safetensors", reason="predictor files need: pip install 'tokenbudget[learned]'")


def _predictors(model: torch.nn.Module, layers=(1, 2), seed: int = 0) -> PredictorSet:
    torch.manual_seed(seed)
    return PredictorSet(model.embed_dim, len(model.blocks), layers, keep=0.6).eval()


@pytest.fixture
def saved(tmp_path) -> tuple[torch.nn.Module, str]:
    model = make_tiny("dinov2_registers")
    path = tmp_path / "pred"
    save_predictors(_predictors(model), path)
    return model, str(path)


def test_predictor_scores_use_the_kept_tokens_only() -> None:
    torch.manual_seed(0)
    predictor = TokenKeepPredictor(16).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([1.0, 1, 0, 1, 0]).view(1, 5, 1).expand(2, -1, -1)
    logp = predictor(x, keep)
    assert logp.shape == (2, 5, 2) and torch.allclose(logp.exp().sum(-1), torch.ones(2, 5))
    moved = x.clone()
    moved[:, [2, 4]] += 10  # dropped tokens change: kept tokens' scores do not (global feature is masked)
    assert torch.allclose(predictor(moved, keep)[:, [0, 1, 3]], logp[:, [0, 1, 3]], atol=1e-6)


def test_masked_attention_bias_is_the_masked_softmax_with_finite_gradient() -> None:
    """softmax(a + log(D + eps)) equals DynamicViT's exp(a) D / sum exp(a) D, gradients included."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    decision = torch.tensor([[1.0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], requires_grad=True)
    state = TokenState(2, 6, 0, None, [0], [0], decision=decision.unsqueeze(-1))
    bias = state.attention_bias(torch.float32)  # [B, 1, 1, N]
    ours = (logits + bias[:, 0, 0]).softmax(dim=-1)
    weights = torch.randn(2, 6)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), decision)
    masked = logits.exp() * (decision + DECISION_EPS)
    paper = masked / masked.sum(dim=-1, keepdim=True)
    (grad_paper,) = torch.autograd.grad((paper * weights).sum(), decision)
    assert torch.allclose(ours, paper, atol=1e-6)
    assert ours[decision == 0].max() < 1e-5  # pruned keys get (almost) no attention
    assert torch.isfinite(grad_ours).all() and (grad_ours[decision.detach() == 0] != 0).all()
    assert torch.allclose(grad_ours, grad_paper, atol=1e-5)


def test_straight_through_gradient_reaches_every_predictor(images) -> None:
    model = make_tiny("vit")
    model.requires_grad_(False)
    predictors = _predictors(model).train()
    strategy = DynamicViTStrategy(tb.DynamicViT(keep=0.6, layers=(1, 2)), 4, predictors)
    from tokenbudget.adapters import find_adapter
    from tokenbudget.context import PatchContext
    from tokenbudget.patch import install_strategy

    adapter = find_adapter(model)
    install_strategy(model, adapter, PatchContext(strategy, 1, 4, adapter.grid))
    tokens = model.forward_features(images)
    state = tb.last_state(model)
    assert state.tokens_per_layer == [65] * 4  # training masks, removes nothing
    decision = state.decision[:, 1:]
    assert set(decision.unique().tolist()) <= {0.0, 1.0} and 0 < float(decision.detach().mean()) < 1
    stage1, stage2 = strategy.stage_decisions
    assert bool((stage2 <= stage1).all())  # cumulative: a token pruned at stage 1 stays pruned
    # a loss on the output only (no budget term): its gradient reaches the predictors through the mask
    (tokens[:, 1:] * decision).sum().backward()
    for name, p in predictors.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for p in model.parameters():
        assert p.grad is None  # backbone frozen


def test_training_reduces_the_loss(one_thread) -> None:
    model = make_tiny("dinov2_registers")
    torch.manual_seed(3)
    data = torch.randn(32, 3, 32, 32)
    # untrained predictors keep about half the tokens per stage: far from keep 0.85, 0.72
    predictors, report = train_predictors(
        model, data, keep=0.85, layers=(1, 2), steps=40, batch_size=8, lr=3e-3
    )
    first, last = sum(report.loss[:5]) / 5, sum(report.loss[-5:]) / 5
    assert last < 0.5 * first, report.loss
    # the budget term pulls the kept fractions towards keep, keep**2
    kept = torch.tensor(report.kept_fraction[-5:]).mean(0)
    assert abs(kept[0] - 0.85) < 0.1 and abs(kept[1] - 0.85**2) < 0.1, kept
    assert not predictors.training and predictors.info["train"]["steps"] == 40


def test_budget_loss_is_zero_on_target() -> None:
    on_target = [torch.tensor([1.0, 1, 0, 0]).view(1, 4, 1), torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1)]
    loss, kept = budget_loss(on_target, 0.5)
    assert float(loss) == 0.0 and kept == [0.5, 0.25]
    assert float(budget_loss(on_target, 0.7)[0]) == pytest.approx((0.5 - 0.7) ** 2 + (0.25 - 0.49) ** 2)


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers", "deit_distilled"])
def test_inference_removes_tokens_at_stage_counts(variant, images, tmp_path) -> None:
    model = make_tiny(variant)
    path = tmp_path / "pred"
    save_predictors(_predictors(model), path)
    with torch.no_grad():
        full = model(images)
        tb.apply(model, tb.DynamicViT(keep=0.6, layers=(1, 2), predictor=str(path)))
        out = model(images)
    state = tb.last_state(model)
    p, n0 = model.num_prefix_tokens, state.input_tokens
    removed = stage_removals(n0, p, 4, (1, 2), 0.6)
    assert state.merged_per_layer == removed and removed[1] > 0 and removed[2] > 0
    assert state.tokens_per_layer == [n0, n0 - removed[1], n0 - removed[1] - removed[2]] + [
        n0 - removed[1] - removed[2]
    ]
    assert torch.isfinite(out).all() and (out - full).abs().max() > 1e-4
    # the same counts as training-free pruning without fusion, so the two compare at equal tokens
    tb.apply(model, tb.Prune(keep=0.6, layers=(1, 2), fuse=False))
    with torch.no_grad():
        model(images)
    assert tb.last_state(model).tokens_per_layer == state.tokens_per_layer
    tb.remove(model)
    with torch.no_grad():
        assert torch.equal(model(images), full)


def test_kept_tokens_are_the_predictor_s_best(saved) -> None:
    model, path = saved
    strategy = DynamicViTStrategy(tb.DynamicViT(keep=0.6, layers=(1, 2), predictor=path), 4)
    torch.manual_seed(0)
    x = torch.randn(2, 69, model.embed_dim)  # 5 prefix + 64 patches
    state = TokenState(2, 69, 5, (8, 8), [0] * 4, [0] * 4)
    with torch.no_grad():
        out = strategy.reduce(x, None, state, 1)
        keep_logp = strategy.predictors.for_layer(1)(x[:, 5:])[..., 1]  # [B, 64]
    assert out.shape == (2, 5 + 39, model.embed_dim)  # ceil(0.6 * 64) = 39
    assert torch.equal(out[:, :5], x[:, :5])  # prefix first, untouched
    for b in range(2):
        best = keep_logp[b].topk(39).indices.sort().values + 5
        assert torch.equal(out[b, 5:], x[b, best])


def test_zero_budget_is_exact(saved, images) -> None:
    model, path = saved
    with torch.no_grad():
        expected = model(images)
        tb.apply(model, tb.DynamicViT(keep=1.0, layers=(1, 2), predictor=path))
        assert torch.equal(model(images), expected)


def test_save_load_round_trip_is_exact(saved, images) -> None:
    model, path = saved
    original = _predictors(model)  # same seed as the saved one
    loaded = load_predictors(path + ".safetensors")
    assert loaded.config() == original.config()
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    meta = json.loads(open(path + ".json").read())
    assert meta["embed_dim"] == model.embed_dim and meta["depth"] == 4 and meta["layers"] == [1, 2]
    x = torch.randn(2, 7, model.embed_dim)
    assert torch.equal(original.for_layer(2)(x), loaded.for_layer(2)(x))


def test_incompatible_predictors_are_refused(saved, tmp_path) -> None:
    model, path = saved
    with pytest.raises(ValueError, match=r"trained for layers \[1, 2\], the config asks for \[1, 3\]"):
        tb.apply(model, tb.DynamicViT(keep=0.6, layers=(1, 3), predictor=path))
    deeper = make_tiny("vit")
    deeper.blocks.append(deeper.blocks[-1])  # 5 blocks
    with pytest.raises(ValueError, match="trained for a model with 4 blocks, this one has 5"):
        tb.apply(deeper, tb.DynamicViT(keep=0.6, layers=(1, 2), predictor=path))
    wider = tmp_path / "wide"
    save_predictors(PredictorSet(64, 4, (1, 2), 0.6), wider)
    with pytest.raises(ValueError, match="trained for embed dim 64, this model has 48"):
        tb.apply(model, tb.DynamicViT(keep=0.6, layers=(1, 2), predictor=str(wider)))
    assert not tb.is_patched(model)
    with pytest.raises(ValueError, match="DynamicViT needs trained predictors"):
        tb.apply(model, tb.DynamicViT(keep=0.6, layers=(1, 2)))
    with pytest.raises(FileNotFoundError, match="train one with"):
        tb.apply(model, tb.DynamicViT(keep=0.6, layers=(1, 2), predictor=str(tmp_path / "missing")))


def test_config_json_and_eval_option(saved) -> None:
    from tokenbudget.evaluate.budgets import method_config

    _, path = saved
    cfg = tb.DynamicViT(keep=0.5, layers=(2, 1), predictor=path)
    assert cfg.layers == (1, 2) and tb.config_from_json(cfg.to_json()) == cfg
    assert method_config("dynamicvit", 0.5, {"predictor": path, "layers": (1, 2)}) == cfg
    with pytest.raises(ValueError, match="keep is the fraction"):
        tb.DynamicViT(keep=0)


def test_train_predictor_and_eval_cli(tmp_path, capsys, one_thread) -> None:

    from tokenbudget.cli import main

    write_two_class_folder(tmp_path / "data")
    common = ["--model", "test_vit", "--img-size", "64", "--data", str(tmp_path / "data")]
    out = str(tmp_path / "pred")
    argv = ["train-predictor", *common, "--layers", "1,3", "--keep", "0.6", "--steps", "3", "--batch-size", "4",
            "--out", out, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "in 3 steps" in capsys.readouterr().out
    assert load_predictors(out).layers == (1, 3)
    argv = ["eval", *common, "--methods", "prune,dynamicvit", "--layers", "1,3", "--predictor", out,
            "--keep", "1.0,0.6", "--speed-batch-size", "2", "--speed-samples", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["full", "prune", "dynamicvit"]
    # 16 patches: 16 -> 10 -> 6 (prune adds its fused token at each stage: 16 -> 10+1 -> 7+1)
    assert rows[2]["final_tokens"] == 1 + 6 and rows[1]["final_tokens"] == 1 + 8
    assert rows[2]["config"]["predictor"] == out
    assert main(["eval", *common, "--methods", "dynamicvit", "--layers", "1,3", "--keep", "0.5"]) == 2
    assert "needs trained predictors" in capsys.readouterr().err
