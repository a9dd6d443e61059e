"""The patching contract on every tiny timm variant: zero budget, remove, repeat, threads, entry points."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenbudget as tb
from conftest import assert_concurrent_forwards_match, make_tiny


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def test_zero_budget_is_the_unpatched_model(tiny_model, images) -> None:
    expected = _outputs(tiny_model, images)
    tb.apply(tiny_model, tb.ToMe(r=0))
    got = _outputs(tiny_model, images)
    assert (got - expected).abs().max() <= 1e-5
    assert tb.last_state(tiny_model).tokens_per_layer == [tb.last_state(tiny_model).input_tokens] * 4


def test_budget_changes_output_and_remove_restores_it(tiny_model, images) -> None:
    expected = _outputs(tiny_model, images)
    keys = list(tiny_model.state_dict())
    tb.apply(tiny_model, tb.ToMe(r=8))
    assert list(tiny_model.state_dict()) == keys  # patching does not rename parameters
    patched = _outputs(tiny_model, images)
    state = tb.last_state(tiny_model)
    assert state.tokens_per_layer == [state.input_tokens - 8 * (i + 1) for i in range(4)]
    assert (patched - expected).abs().max() > 1e-4
    tb.remove(tiny_model)
    assert torch.equal(_outputs(tiny_model, images), expected)
    assert list(tiny_model.state_dict()) == keys
    assert not tb.is_patched(tiny_model)


def test_apply_twice_is_the_same_as_once(tiny_model, images) -> None:
    tb.apply(tiny_model, tb.ToMe(r=4))
    tb.apply(tiny_model, tb.ToMe(r=8))
    twice = _outputs(tiny_model, images)
    fresh = copy.deepcopy(tiny_model)
    tb.remove(fresh)
    tb.apply(fresh, tb.ToMe(r=8))
    assert torch.equal(twice, _outputs(fresh, images))
    tb.remove(tiny_model)
    tb.remove(tiny_model)  # removing an unpatched model is a no-op
    fresh_expected = _outputs(make_tiny_from(tiny_model), images)
    assert torch.equal(_outputs(tiny_model, images), fresh_expected)


def make_tiny_from(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    tb.remove(clone)
    return clone


def test_prefix_tokens_are_never_merged(tiny_model, images) -> None:
    tb.apply(tiny_model, tb.ToMe(r=12, trace_source=True))
    _outputs(tiny_model, images)
    state = tb.last_state(tiny_model)
    p = tiny_model.num_prefix_tokens
    assert state.num_prefix == p
    # each prefix token is still alone, at its own position, in its order
    assert torch.equal(state.token_map[:, :p], torch.arange(p).expand(len(images), -1))
    assert bool((state.sizes[:, :p] == 1).all())
    # sizes sum to the input count; the source map is a partition of the input tokens
    assert bool((state.sizes.sum(dim=1) == state.input_tokens).all())
    assert bool((state.source.sum(dim=1) == 1).all())


def test_forward_features_and_head_entry_points(tiny_model, images) -> None:
    tb.apply(tiny_model, tb.ToMe(r=8))
    with torch.no_grad():
        logits = tiny_model(images)
        feats = tiny_model.forward_features(images)
        assert feats.shape[1] == tb.last_state(tiny_model).num_tokens
        head = tiny_model.forward_head(feats)
    torch.testing.assert_close(head, logits)


def test_concurrent_forwards_match_sequential(images) -> None:
    model = make_tiny("dinov2_registers")
    tb.apply(model, tb.ToMe(r=(8, -1.0), trace_source=True))
    # different batch sizes and inputs per thread, so any shared state would show
    assert_concurrent_forwards_match(model, lambda x: _outputs(model, x), reps=15)


def test_deepcopy_of_a_patched_model_is_patched_independently(images) -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=8))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_outputs(clone, images), _outputs(model, images))
    tb.remove(clone)
    assert tb.is_patched(model) and not tb.is_patched(clone)
    assert tb.last_state(model).tokens_per_layer[-1] == 65 - 32


def test_state_is_fresh_every_forward(images) -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=8))
    _outputs(model, images)
    first = tb.last_state(model)
    _outputs(model, images[:1])
    second = tb.last_state(model)
    assert first is not second and second.batch_size == 1 and len(second.tokens_per_layer) == 4


def test_layer_that_cannot_merge_r_says_so(images) -> None:
    model = make_tiny("vit")  # 65 tokens, 4 blocks
    tb.apply(model, tb.ToMe(r=30))
    _outputs(model, images)
    state = tb.last_state(model)
    assert state.requested_per_layer == [30] * 4
    assert state.merged_per_layer == [30, 17, 8, 4]  # 65 -> 35 -> 18 -> 10 -> 6
    assert state.clamped_layers == [1, 2, 3]


def test_keep_and_tokens_budgets(images) -> None:
    model = make_tiny("dinov2_registers")  # 64 patches + 5 prefix tokens
    tb.apply(model, tb.ToMe(keep=0.5))
    _outputs(model, images)
    assert tb.last_state(model).tokens_per_layer[-1] == 5 + 32
    tb.apply(model, tb.ToMe(tokens=20))
    _outputs(model, images)
    assert tb.last_state(model).tokens_per_layer[-1] == 20


def test_budget_errors_are_clear() -> None:
    model = make_tiny("vit")
    with pytest.raises(ValueError, match="larger than the 64 mergeable tokens"):
        tb.apply(model, tb.ToMe(r=100))
    with pytest.raises(ValueError, match="one count per block: the model has 4 blocks"):
        tb.apply(model, tb.ToMe(r=[1, 2]))
    with pytest.raises(ValueError, match="cannot reach 2 tokens"):
        tb.apply(model, tb.ToMe(tokens=2))
    assert not tb.is_patched(model)  # a failed apply leaves the model as it was


def test_unsupported_models_get_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot patch .*Sequential.*supports timm VisionTransformer"):
        tb.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), tb.ToMe(r=1))
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    post_norm = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock
    )
    with pytest.raises(ValueError, match="not timm's pre-norm Block"):
        tb.apply(post_norm, tb.ToMe(r=1))
    with pytest.raises(ValueError, match="config must be a tokenbudget config"):
        tb.apply(make_tiny("vit"), {"r": 8})


def test_grid_entry_points_and_masks_are_guarded(images) -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=4))
    with pytest.raises(NotImplementedError, match="patch grid"):
        model.forward_intermediates(images)
    with pytest.raises(NotImplementedError, match="patch grid"):
        model.get_intermediate_layers(images)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model(images, attn_mask=torch.zeros(65, 65))
    tb.apply(model, tb.ToMe(r=0))  # a zero budget keeps every entry point
    assert len(model.forward_intermediates(images, intermediates_only=True)) == 4
    tb.remove(model)


def test_last_state_before_any_forward() -> None:
    model = make_tiny("vit")
    with pytest.raises(ValueError, match="not patched"):
        tb.last_state(model)
    tb.apply(model, tb.ToMe(r=2))
    with pytest.raises(ValueError, match="has not run a forward"):
        tb.last_state(model)


def test_timm_model_at_another_image_size() -> None:
    """dynamic_img_size models get a fresh plan for each token count."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, dynamic_img_size=True
    ).eval()
    tb.apply(model, tb.ToMe(keep=0.5))
    for side, patches in ((32, 16), (48, 36)):
        with torch.no_grad():
            model(torch.randn(1, 3, side, side))
        state = tb.last_state(model)
        assert state.input_tokens == patches + 1
        assert state.tokens_per_layer[-1] == 1 + patches // 2
        assert state.grid == (side // 8, side // 8)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {"depth": 3}),
        ("deit_tiny_distilled_patch16_224", {"depth": 3}),
        ("vit_small_patch14_reg4_dinov2", {"depth": 3, "img_size": 112}),
        ("vit_base_patch16_clip_224", {"depth": 2}),
        ("vit_small_patch16_224", {"depth": 3, "qk_norm": True, "global_pool": "avg"}),
    ],
)
def test_timm_model_names(name: str, kwargs: dict) -> None:
    """The same contract on timm's own model definitions (random weights, fewer blocks)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    expected = _outputs(model, x)
    tb.apply(model, tb.ToMe(r=0))
    assert (_outputs(model, x) - expected).abs().max() <= 1e-5
    tb.apply(model, tb.ToMe(r=8, trace_source=True))
    reduced = _outputs(model, x)
    state = tb.last_state(model)
    assert state.num_prefix == model.num_prefix_tokens
    assert state.tokens_per_layer[-1] == state.input_tokens - 8 * len(model.blocks)
    assert bool((state.sizes[:, : state.num_prefix] == 1).all())
    assert reduced.shape == expected.shape and not torch.allclose(reduced, expected)
    tb.remove(model)
    assert torch.equal(_outputs(model, x), expected)


def test_training_backward_through_merges(images) -> None:
    """Merging is differentiable (the matching itself is not): a patched model can be fine-tuned."""
    model = make_tiny("dinov2_layerscale").train()
    tb.apply(model, tb.ToMe(r=8))
    loss = model(images).logsumexp(dim=-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


def test_bad_config_keeps_the_previous_patch(images) -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=4))
    with pytest.raises(ValueError):
        tb.apply(model, tb.ToMe(r=100))
    assert tb.patched_config(model) == tb.ToMe(r=4)
    _outputs(model, images)
    assert tb.last_state(model).tokens_per_layer[-1] == 65 - 16
