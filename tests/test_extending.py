"""The worked example of docs/extending.md runs: a method defined outside the package (its config and
its strategy, registered by decorator) reaches apply, bench and eval by name on every framework."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from hf_models import make_hf
from openclip_models import make_openclip
from tokenbudget.adapters import find_adapter
from tokenbudget.config import BudgetConfig
from tokenbudget.config.base import _REGISTRY
from tokenbudget.ops.prune import select_tokens, top_k_split
from tokenbudget.state import TokenState
from tokenbudget.strategies import STRATEGIES, ScheduledStrategy, register


@pytest.fixture
def norm_drop():  # noqa: ANN201 - the config class, registered for this test only
    @dataclass(frozen=True)
    class NormDrop(BudgetConfig):
        method: ClassVar[str] = "norm-drop"

    @register(NormDrop)
    class NormDropStrategy(ScheduledStrategy):
        def reduce(self, x: Tensor, keys: Tensor | None, state: TokenState, layer: int) -> Tensor:
            r, prefix = state.merged_per_layer[layer], state.num_prefix
            norms = x[:, prefix:].norm(dim=-1)  # [B, N - prefix]
            keep, _ = top_k_split(norms, norms.shape[1] - r, prefix)
            return select_tokens(x, keep)

    yield NormDrop
    _REGISTRY.pop("norm-drop")
    STRATEGIES.pop(NormDrop)


@pytest.mark.parametrize("make", [lambda: make_tiny("vit"), lambda: make_hf("vit"), make_openclip])
def test_a_new_method_runs_everywhere(norm_drop: type, make, images: torch.Tensor) -> None:  # noqa: ANN001
    model = make()
    adapter = find_adapter(model)
    tb.apply(model, tb.config_from_json('{"method": "norm-drop", "r": 4}'))
    with torch.no_grad():
        out = adapter.features(images)
    assert out.shape[1] == 65 - 16
    state = tb.last_state(model)
    assert state.tokens_per_layer == [61, 57, 53, 49]
    tb.remove(model)


def test_a_new_method_reaches_eval_by_name(norm_drop: type, tmp_path) -> None:
    from tokenbudget.data.eval_sets import load_eval_data
    from tokenbudget.evaluate import evaluate

    model = make_tiny("vit")
    folder = write_two_class_folder(tmp_path / "d", splits=("train", "test"))
    data = load_eval_data(str(folder), 32, *find_adapter(model).normalization())
    rows = evaluate(model, data, ["norm-drop"], [1.0, 0.5], batch_size=4, speed_batch_size=2, speed_samples=1)
    assert [r.method for r in rows] == ["full", "norm-drop"] and rows[1].flops_ratio < 1.0
