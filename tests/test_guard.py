"""The entropy guard: per-image merge counts with size-0 padding, and its contracts."""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from conftest import VARIANTS, assert_concurrent_forwards_match, make_tiny
from tokenbudget.ops.entropy import token_entropy
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.ops.merge import merge_weighted
from tokenbudget.ops.ragged import merge_pairs, pair_positions
from tokenbudget.state import TokenState
from tokenbudget.strategies import make_strategy

GUARDED = {
    "tome": lambda floor, **kw: tb.ToMe(entropy_floor=floor, **kw),
    "tome-detail": lambda floor, **kw: tb.ToMe(entropy_floor=floor, preserve_detail=True, **kw),
    "tome-optimal": lambda floor, **kw: tb.ToMe(entropy_floor=floor, matching="optimal", **kw),
    "tofu": lambda floor, **kw: tb.ToFu(entropy_floor=floor, switch_layer=2, **kw),
    "pool": lambda floor, **kw: tb.GridPool(entropy_floor=floor, **kw),
}


def _state(batch: int, tokens: int, r: int, prefix: int = 1) -> TokenState:
    return TokenState(batch, tokens, prefix, None, [r], [r], token_map=torch.arange(tokens).expand(batch, -1))


def _identical_and_orthogonal(tokens: int = 17, channels: int = 32) -> torch.Tensor:
    """[2, tokens, C]: image 0 all one direction, image 1 mutually orthogonal tokens (class token first)."""
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 1, channels, generator=g).expand(1, tokens, channels)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g))
    orth = q[:tokens].unsqueeze(0)
    return torch.cat([same, orth]).contiguous()


def test_identical_tokens_merge_freely_and_orthogonal_ones_are_protected() -> None:
    x = _identical_and_orthogonal()
    strategy = make_strategy(tb.ToMe(r=6, entropy_floor=1.0), 1)
    state = _state(2, 17, 6)
    out = strategy.reduce(x, x, state, 0)
    merged, withheld, padding = state.guard_layers[0]
    assert merged.tolist() == [6, 0] and withheld.tolist() == [0, 6] and padding.tolist() == [6, 0]
    assert out.shape == (2, 17, 32)  # as wide as the protected image
    layout = [0, *range(2, 17, 2), *range(1, 17, 2)]  # ToMe's: prefix, set A, set B
    assert torch.equal(out[1], x[1, layout]) and (state.sizes[1] == 1).all()  # nothing merged
    assert state.sizes[0].sum() == 17 and (state.sizes[0, -6:] == 0).all()  # padding at the end
    assert state.padding is not None and state.padding[0, -6:].all() and not state.padding[1].any()
    # image 0 alone gives exactly what it got in the batch (its real tokens)
    alone_state = _state(1, 17, 6)
    alone = make_strategy(tb.ToMe(r=6, entropy_floor=1.0), 1).reduce(x[:1], x[:1], alone_state, 0)
    assert torch.allclose(out[0, :11], alone[0], atol=1e-6)
    assert torch.equal(state.token_map[0], alone_state.token_map[0])


def test_guard_merges_as_much_as_the_floor_allows() -> None:
    x = _identical_and_orthogonal()[1:]  # orthogonal tokens: each merge lowers the entropy a little
    matching = bipartite_soft_matching(x, 8, 1)
    src, dst = pair_positions(matching)
    fractions = []
    for c in range(9):
        take = torch.arange(8) < c
        merged, size = merge_pairs(x, None, src, dst, take.unsqueeze(0))
        fractions.append(token_entropy(merged[:, 1:], size[:, 1:]).item())
    # The fraction falls with the first merges (it need not be monotone later: its maximum
    # log(n) falls too); 3 merges stay above this floor, 4 or more fall below it.
    floor = (fractions[3] + fractions[4]) / 2
    assert all(a > b for a, b in zip(fractions[:4], fractions[1:5], strict=True))
    assert max(fractions[4:]) < floor
    state = _state(1, 17, 8)
    out = make_strategy(tb.ToMe(r=8, entropy_floor=floor), 1).reduce(x, x, state, 0)
    assert state.guard_layers[0][0].tolist() == [3] and state.guard_layers[0][1].tolist() == [5]
    assert out.shape[1] == 17 - 3 and token_entropy(out[:, 1:], state.size[:, 1:]).item() >= floor


def test_floor_zero_is_the_unguarded_method_and_none_is_default() -> None:
    assert tb.ToMe(r=4).entropy_floor is None and tb.ToFu(r=4).entropy_floor is None
    assert tb.ToMeGuard(r=4).entropy_floor == tb.DEFAULT_ENTROPY_FLOOR == 0.2734
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = make_tiny("dinov2_registers")
    with torch.no_grad():
        for name, make in GUARDED.items():
            plain = tb.config_from_dict({**make(None, r=8).to_dict()})
            tb.apply(model, plain)
            expected, expected_state = model(images), tb.last_state(model)
            tb.apply(model, make(0.0, r=8, trace_source=name != "tome-optimal"))
            out, state = model(images), tb.last_state(model)
            assert torch.equal(out, expected), name
            assert state.tokens_per_layer == expected_state.tokens_per_layer
            assert state.withheld_per_layer.sum() == 0 and state.padding is None
    tb.remove(model)


def _ragged_floor(model: torch.nn.Module, images: torch.Tensor, make, runner=None, **kw) -> float:  # noqa: ANN001
    """A floor at which some images of ``images`` are guarded and others are not."""
    with torch.no_grad():
        for floor in torch.arange(0.5, 1.0, 0.02).tolist():
            tb.apply(model, make(floor, **kw))
            (runner or model)(images)
            fired = (tb.last_state(model).withheld_per_layer > 0).any(dim=1)
            if fired.any() and not fired.all():
                return floor
    raise AssertionError("no floor gives a ragged batch")


@pytest.mark.parametrize("method", list(GUARDED))
@pytest.mark.parametrize("prop_attn", [True, False])
def test_a_ragged_batch_equals_each_image_alone(method, prop_attn) -> None:
    # Padding must be invisible: masked out of attention (with or without proportional attention),
    # never matched, weighed 0 by pooling. Each image of the batch then gets what it gets alone.
    model = make_tiny("avgpool_cls")  # size-weighted average pooling reads the padding too
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    make = GUARDED[method]
    kw = {"r": 12, "prop_attn": prop_attn}
    if method != "tome-optimal":
        kw["trace_source"] = True
    floor = _ragged_floor(model, images, make, **kw)
    tb.apply(model, make(floor, **kw))
    with torch.no_grad():
        out = model(images)
        state = tb.last_state(model)
        real = state.real_tokens_per_layer
        assert state.padding is not None and real[:, -1].min() < state.tokens_per_layer[-1]
        assert torch.equal(real.max(dim=0).values, torch.tensor(state.tokens_per_layer))
        assert torch.equal((state.sizes > 0).sum(dim=1), real[:, -1])
        assert torch.allclose(state.sizes.sum(dim=1), torch.full((4,), float(state.input_tokens)))
        if state.token_map is not None:
            assert (state.sizes.gather(1, state.token_map) > 0).all()  # patches live in real tokens
        # (grid pooling's seeded tie-break is drawn per batch row, so only it differs alone)
        for i in range(4 if method != "pool" else 0):
            alone = model(images[i : i + 1])
            assert (alone - out[i : i + 1]).abs().max() < 1e-5
            assert torch.equal(tb.last_state(model).real_tokens_per_layer[0], real[i])
    tb.remove(model)


def test_padding_is_masked_without_proportional_attention(monkeypatch) -> None:
    import torch.nn.functional as F

    masks = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN202
        masks.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    model = make_tiny("vit")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    floor = _ragged_floor(model, images, GUARDED["tome"], r=12, prop_attn=False)
    tb.apply(model, tb.ToMe(r=12, prop_attn=False, entropy_floor=floor))
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(images)
    assert len(masks) == 4  # timm's fused attention ran in every block
    state = tb.last_state(model)
    first_padded = next(i for i in range(4) if state._per_image(2)[:, i].any())
    assert all(m is None for m in masks[: first_padded + 1])  # no sizes, no padding: no mask
    for mask in masks[first_padded + 1 :]:
        assert mask is not None and torch.isinf(mask).any() and not torch.isinf(mask[:, :, :, 0]).any()
        assert set(mask[torch.isfinite(mask)].unique().tolist()) == {0.0}  # no proportional term


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_contracts_on_every_variant(variant) -> None:
    model = make_tiny(variant)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        keys = set(model.state_dict())
        tb.apply(model, tb.ToMeGuard(r=0))
        assert (model(images) - expected).abs().max() <= 1e-5
        for config in (tb.ToMe(r=12, entropy_floor=0.8, trace_source=True), tb.ToMeGuard(keep=0.1)):
            tb.apply(model, config)
            tb.apply(model, config)  # twice is once
            out = model(images)
            state = tb.last_state(model)
            assert torch.isfinite(out).all() and set(model.state_dict()) == keys
            p = model.num_prefix_tokens
            assert (state.sizes[:, :p] == 1).all()  # prefix tokens never merged, still in front
            if state.token_map is not None:
                assert torch.equal(state.token_map[:, :p], torch.arange(p).expand(3, -1))
            assert state.real_tokens_per_layer.shape == (3, 4)
        tb.remove(model)
        assert torch.equal(model(images), expected) and set(model.state_dict()) == keys


def test_concurrent_forwards() -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=12, entropy_floor=0.75))
    with torch.no_grad():
        assert_concurrent_forwards_match(model, model)


def test_config_validation_json_and_names() -> None:
    from tokenbudget.cli import build_parser
    from tokenbudget.evaluate.budgets import method_config

    config = tb.ToMe(keep=0.1, entropy_floor=0.5)
    assert tb.config_from_json(config.to_json()) == config
    assert method_config("tome-guard", 0.05) == tb.ToMeGuard(keep=0.05)
    for bad in (-0.1, 1.5, "0.3", True):
        with pytest.raises(ValueError, match="entropy_floor is a fraction"):
            tb.ToMe(r=4, entropy_floor=bad)
    with pytest.raises(ValueError, match="needs an entropy_floor"):
        tb.ToMeGuard(r=4, entropy_floor=None)
    args = build_parser().parse_args(
        ["bench", "--methods", "tome,tofu", "--r", "8", "--entropy-floor", "0.3"]
    )
    from tokenbudget.cli.methods import configs

    assert [c.entropy_floor for c in configs(args)] == [0.3, 0.3]


def test_merge_pairs_equals_merge_weighted_when_every_pair_is_taken() -> None:
    g = torch.Generator().manual_seed(4)
    x, size = torch.randn(2, 21, 8, generator=g), torch.randint(1, 4, (2, 21, 1), generator=g).float()
    matching = bipartite_soft_matching(torch.randn(2, 21, 8, generator=g), 7, 1)
    src, dst = pair_positions(matching)
    merged, merged_size = merge_pairs(x, size, src, dst, torch.ones(2, 7, dtype=torch.bool))
    expected, expected_size = merge_weighted(x, size, matching)
    kept = matching.kept_idx
    assert torch.allclose(merged.gather(1, kept.unsqueeze(-1).expand(-1, -1, 8)), expected, atol=1e-6)
    assert torch.equal(merged_size.gather(1, kept.unsqueeze(-1)), expected_size)
    assert (merged_size.gather(1, src.unsqueeze(-1)) == 0).all()


def _ragged_matches_alone(model, run, images, kw) -> None:  # noqa: ANN001
    """Find a floor giving a ragged batch; then each image's output must equal its own forward."""
    floor = _ragged_floor(model, images, GUARDED["tome"], runner=run, **kw)
    tb.apply(model, tb.ToMe(entropy_floor=floor, **kw))
    with torch.no_grad():
        out = run(images)
        assert tb.last_state(model).padding is not None
        for i in range(len(images)):
            assert (run(images[i : i + 1]) - out[i : i + 1]).abs().max() < 1e-5
        tb.remove(model)


@pytest.mark.parametrize("family", ["dinov2_registers", "siglip_vision"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_hugging_face(family, prop_attn) -> None:
    pytest.importorskip("transformers")
    from hf_models import make_hf, output

    model = make_hf(family)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = output(model, family, images)
    tb.apply(model, tb.ToMeGuard(r=0))
    assert (output(model, family, images) - expected).abs().max() <= 1e-5
    _ragged_matches_alone(
        model, lambda x: output(model, family, x), images, {"r": 12, "prop_attn": prop_attn}
    )
    assert torch.equal(output(model, family, images), expected)


def test_openclip() -> None:
    pytest.importorskip("open_clip")
    from openclip_models import make_openclip

    model = make_openclip(pool_type="avg")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode_image(images)
        tb.apply(model, tb.ToMeGuard(r=0))
        assert (model.encode_image(images) - expected).abs().max() <= 1e-5
    _ragged_matches_alone(model, model.encode_image, images, {"r": 12})
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), expected)


def test_entropy_profile_and_summary() -> None:
    from tokenbudget.evaluate.guard_report import entropy_profile, format_profile, guard_summary

    model = make_tiny("vit")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    floor = _ragged_floor(model, images, GUARDED["tome"], r=12)
    tb.remove(model)
    plain = entropy_profile(model, images, tb.ToMe(r=12), batch_size=3)
    guarded = entropy_profile(model, images, tb.ToMe(r=12, entropy_floor=floor), batch_size=3)
    assert not tb.is_patched(model)
    assert plain.entropy.shape == plain.entropy_out.shape == (4, 4) and plain.features.shape == (4, 96)
    assert (plain.withheld == 0).all() and plain.planned_tokens.tolist() == [53, 41, 29, 17]
    assert torch.equal(plain.real_tokens, plain.planned_tokens.expand(4, -1))
    summary = guard_summary(guarded, floor)
    assert 0 < summary["images_fired"] < 1 and summary["extra_tokens_final_mean"] > 0
    assert (guarded.flops_ratio >= plain.flops_ratio).all() and (guarded.flops_ratio <= 1).all()
    # every merge the guard withheld is a real token kept beyond the plan, in that block and after
    assert torch.equal(guarded.real_tokens - plain.real_tokens, guarded.withheld.cumsum(dim=1))
    assert "fired" in format_profile(guarded, floor)


@pytest.mark.slow
def test_entropy_cli_on_the_embedded_model(capsys) -> None:
    import json

    from tokenbudget.cli import main

    assert main(["entropy", "--n-test", "10", "--keep", "0.05", "--threads", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["tome", "tome-guard"]
    assert rows[0]["fired_share"] == 0 and 0 <= rows[1]["fired_share"] <= 1
