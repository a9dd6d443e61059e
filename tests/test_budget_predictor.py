"""The learned per-image token budget: targets, budget loss, grouped inference, files, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from tokenbudget.adaptive.budget_predictor import (
    agreement_targets,
    budget_loss,
    load_budget_predictor,
    model_glance,
    save_budget_predictor,
    train_budget_predictor,
)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_budget_loss_gradient_pushes_the_mean_to_the_target() -> None:
    budgets = torch.tensor([0.25, 0.5, 0.75, 1.0])
    logits = torch.zeros(3, 4, requires_grad=True)  # uniform: expected keep 0.625
    budget_loss(logits.softmax(-1), budgets, target_keep=0.3, weight=5.0).backward()
    grad = logits.grad.mean(0)
    # Above the target: descent moves mass from large budgets to small ones.
    assert grad[-1] > 0 > grad[0] and grad[0] < grad[1] < grad[2] < grad[3]
    logits.grad = None
    budget_loss(logits.softmax(-1), budgets, target_keep=0.9, weight=5.0).backward()
    grad = logits.grad.mean(0)
    assert grad[0] > 0 > grad[-1]
    logits.grad = None
    loss = budget_loss(logits.softmax(-1), budgets, target_keep=0.625, weight=5.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12) and logits.grad.abs().max() < 1e-6


def test_agreement_targets_pick_the_smallest_agreeing_budget() -> None:
    full = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    near, off = [1.0, 0.01], [0.0, 1.0]
    reduced = torch.tensor(
        [
            [near, near, near, [1.0, 0.0]],  # agrees at the smallest budget
            [off, off, near, [1.0, 0.0]],  # from the third on
            [off, off, off, off],  # never: the last budget is the fallback
        ]
    )
    assert agreement_targets(full, reduced, 0.999).tolist() == [0, 2, 3]
    assert agreement_targets(full, reduced, -1.0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="min_cosine"):
        agreement_targets(full, reduced, 1.5)


def test_grouped_inference_equals_per_image_tome(batch: torch.Tensor) -> None:
    model = make_tiny("dinov2_registers")
    predictor = tb.adaptive.BudgetPredictor(model.embed_dim, (0.25, 0.5, 1.0))
    choice = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 0])
    seen = []

    def run(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return m(x)

    with torch.no_grad():
        out = tb.adaptive.forward_with_budgets(model, predictor, batch, run, budget_index=choice)
        assert not tb.is_patched(model)
        assert sorted(seen) == [3, 3, 4] and out.group_sizes == {0.25: 4, 0.5: 3, 1.0: 3}
        assert out.keep.tolist() == [predictor.budgets[i] for i in choice.tolist()]
        for i, k in enumerate(choice.tolist()):
            keep = predictor.budgets[k]
            if keep < 1.0:
                tb.apply(model, tb.ToMe(keep=keep))
            alone = model(batch[i : i + 1])
            tb.remove(model)
            torch.testing.assert_close(out.outputs[i], alone[0], atol=1e-5, rtol=1e-5)
        # The predictor's own choice (no override) runs the same way.
        chosen = tb.adaptive.forward_with_budgets(model, predictor, batch)
        assert torch.equal(chosen.budget_index, predictor.choose(model_glance(model, batch)))


def test_training_learns_targets_and_the_budget_loss_steers_the_mean(one_thread) -> None:
    generator = torch.Generator().manual_seed(0)
    glance = torch.randn(96, 16, 8, generator=generator)
    busy = glance[:, :, 0].std(dim=1)  # one busy channel decides the target
    targets = torch.bucketize(busy, busy.quantile(torch.tensor([0.25, 0.5, 0.75])))
    kwargs = dict(hidden=16, epochs=30, batch_size=32, lr=1e-2)
    free, _ = train_budget_predictor(glance, targets, budget_weight=0.0, **kwargs)
    assert free.info["train_target_accuracy"] > 0.5  # chance is 0.25
    steered, report = train_budget_predictor(glance, targets, target_keep=0.3, budget_weight=50.0, **kwargs)
    assert report.expected_keep < free.info["train_expected_keep"] - 0.1
    assert abs(report.expected_keep - 0.3) < abs(free.info["train_expected_keep"] - 0.3)


def test_round_trip_and_refusals(tmp_path, batch: torch.Tensor) -> None:
    model = make_tiny("vit")
    torch.manual_seed(0)
    predictor = tb.adaptive.BudgetPredictor(
        model.embed_dim, (0.25, 0.5, 0.75, 1.0), hidden=16, info={"min_cosine": 0.99}
    )
    weights, config = save_budget_predictor(predictor, tmp_path / "budget")
    loaded = load_budget_predictor(weights)
    glance = model_glance(model, batch)
    with torch.no_grad():
        assert torch.equal(loaded(glance), predictor(glance)) and loaded.info["min_cosine"] == 0.99
    wide = tb.adaptive.BudgetPredictor(64, hidden=16)
    with pytest.raises(ValueError, match="trained for embed dim 64"):
        tb.adaptive.forward_with_budgets(model, wide, batch)
    with pytest.raises(ValueError, match="increasing keep fractions"):
        tb.adaptive.BudgetPredictor(48, (0.5, 0.25))
    with pytest.raises(ValueError, match="increasing keep fractions"):
        tb.adaptive.BudgetPredictor(48, (0.0, 1.0))
    with pytest.raises(ValueError, match="expected a glance"):
        predictor(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="budget_index"):
        tb.adaptive.forward_with_budgets(model, predictor, batch, budget_index=torch.full((10,), 4))
    tb.apply(model, tb.ToMe(r=2))
    with pytest.raises(ValueError, match="tb.remove"):
        tb.adaptive.forward_with_budgets(model, predictor, batch)
    tb.remove(model)
    config.write_text(json.dumps({"format": "tokenbudget-exit-heads", "version": 1}))
    with pytest.raises(ValueError, match="not a tokenbudget budget predictor"):
        load_budget_predictor(config)


def test_train_and_eval_budget_predictor_cli(tmp_path, capsys) -> None:

    from tokenbudget.cli import main

    write_two_class_folder(tmp_path / "data", splits=("train", "test"), spread=30)
    common = [
        "--model",
        "test_vit",
        "--img-size",
        "64",
        "--data",
        str(tmp_path / "data"),
        "--quiet",
        "--threads",
        "1",
    ]
    out = str(tmp_path / "budget")
    argv = ["train-budget-predictor", *common, "--budgets", "0.5,1.0", "--epochs", "3", "--hidden", "8",
            "--min-cosine", "0.99", "--out", out]  # fmt: skip
    assert main(argv) == 0
    assert "images per budget" in capsys.readouterr().out
    assert load_budget_predictor(out).budgets == (0.5, 1.0)
    assert main(["eval-budget-predictor", *common, "--predictor", out, "--n-test", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["condition"] for r in rows]
    assert names == [
        "fixed keep=0.5",
        "fixed keep=1",
        "predicted",
        "fixed, same mean",
        "shuffled predicted",
        "oracle",
    ]
    predicted, same = rows[2], rows[3]
    assert sum(predicted["budget_counts"]) == 8 and same["mean_keep"] == pytest.approx(predicted["mean_keep"])
    assert main(["train-budget-predictor", *common, "--budgets", "0.5,0.25", "--out", out]) == 2
    assert "increasing keep fractions" in capsys.readouterr().err


@pytest.mark.slow
def test_budget_predictor_on_the_embedded_dinov2(tmp_path, capsys, one_thread) -> None:
    """train-budget-predictor and eval-budget-predictor end to end on the real DINOv2-S weights."""
    from tokenbudget.cli import main

    common = [
        "--model",
        "dinov2_small",
        "--data",
        "fashion-mnist",
        "--n-train",
        "40",
        "--quiet",
    ]
    out = str(tmp_path / "budget")
    argv = ["train-budget-predictor", *common, "--epochs", "5", "--hidden", "16", "--out", out]
    assert main(argv) == 0
    assert load_budget_predictor(out).budgets == (0.25, 0.5, 0.75, 1.0)
    capsys.readouterr()
    assert main(["eval-budget-predictor", *common, "--n-test", "20", "--predictor", out, "--json"]) == 0
    rows = {r["condition"]: r for r in json.loads(capsys.readouterr().out)}
    predicted = rows["predicted"]
    assert sum(predicted["budget_counts"]) == 20 and 0.25 <= predicted["mean_keep"] <= 1.0
    assert rows["fixed, same mean"]["mean_keep"] == pytest.approx(predicted["mean_keep"])
    # ToMe on real features keeps the classes apart: every condition stays far above chance (0.1).
    assert min(r["knn_acc"] for r in rows.values()) > 0.3
