"""The VLM contract on tiny random transformers VLMs of every family, for every visual-token cut:
generate on a left-padded batch of 2, bit-identical at tokens=1.0, exactly k visual tokens reaching
the language model (counted at its input), the prompt kept in generate's output, remove restoring
the model exactly, clear errors for bad budgets and unsupported models."""

from __future__ import annotations

import inspect

import pytest
import torch

import tokenbudget as tb
from vlm_models import FAMILIES, make_vlm, text_tokens

torch.set_num_threads(1)

METHODS = {
    "random": lambda t: tb.VisualRandom(tokens=t, seed=3),
    "pool": lambda t: tb.VisualPool(tokens=t),
    "select": lambda t: tb.VisualSelect(tokens=t),
    "select-attention": lambda t: tb.VisualSelect(tokens=t, query="attention"),
    "visionzip": lambda t: tb.VisionZip(tokens=t),
    "tower": lambda t: tb.TowerReduce(tokens=t, reducer="tome"),
}
# a ViT reducer needs whole grids: anyres packing and Qwen's packed tower refuse it (clearly)
NO_TOWER = {"llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"}

_CACHE: dict[str, tuple] = {}


def vlm(family: str) -> tuple[torch.nn.Module, object, dict]:
    """(model, batch builder, reference outputs of the unpatched model), built once per family."""
    if family not in _CACHE:
        model, make_batch = make_vlm(family)
        with torch.no_grad():
            ref = {"logits": model(**make_batch()).logits, "ids": generate(model, make_batch())}
        _CACHE[family] = (model, make_batch, ref)
    model, make_batch, ref = _CACHE[family]
    tb.remove(model)
    return model, make_batch, ref


def generate(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=3, do_sample=False)


class LLMInputs:
    """Forward pre-hooks: per call, the image tokens of each row the multimodal model scatters the
    visual features into (its input_ids, after any cut), and the sequence the language model gets."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.image_token = model.config.image_token_id
        self.images: list[list[int]] = []  # image tokens per row, per call
        self.rows: list[list[int]] = []  # non-padding tokens per row, per call
        self.lengths: list[int] = []  # sequence length the language model received, per call
        self.positions: list[torch.Tensor] = []
        self.handles = [
            model.model.register_forward_pre_hook(self.outer, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(self.inner, with_kwargs=True),
        ]

    def outer(self, module, args, kwargs):
        given = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        ids, mask = given["input_ids"], given["attention_mask"]
        self.images.append((ids == self.image_token).sum(1).tolist())
        self.rows.append(mask.sum(1).tolist())
        self.pending = True

    def inner(self, module, args, kwargs):
        if not getattr(self, "pending", False):
            return  # not a model call (VisualSelect's attention query runs the LLM's first layers itself)
        self.pending = False
        self.lengths.append(kwargs["inputs_embeds"].shape[1])
        self.positions.append(kwargs.get("position_ids"))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def supported(family: str, method: str) -> bool:
    return not (method == "tower" and family in NO_TOWER)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_full_budget(family, method):
    model, make_batch, ref = vlm(family)
    if not supported(family, method):
        with pytest.raises(NotImplementedError, match="use tb.VisionZip"):
            tb.apply(model, METHODS[method](1.0))
        assert not tb.is_patched(model)
        return
    tb.apply(model, METHODS[method](1.0))
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, ref["logits"])
        assert torch.equal(generate(model, make_batch()), ref["ids"])
    state = tb.last_state(model)
    assert state.visual_tokens == state.available
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("family", "method"), [(f, m) for m in METHODS for f in FAMILIES if supported(f, m)]
)  # the others are refused with a clear error (test_identity_at_full_budget)
def test_k_visual_tokens_reach_the_llm(family, method):
    model, make_batch, ref = vlm(family)
    k = 5
    tb.apply(model, METHODS[method](k))
    batch = make_batch()
    seen = LLMInputs(model)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
            out = generate(model, make_batch())
    finally:
        seen.remove()
    expected = [t + k for t in text_tokens(model, batch)]  # one image per prompt
    assert seen.images[0] == seen.images[1] == [k, k]  # forward, generate's prefill
    assert seen.rows[0] == seen.rows[1] == expected
    assert seen.lengths[0] == seen.lengths[1] == logits.shape[1] == max(expected)
    assert tb.last_state(model).visual_tokens == [k, k]
    assert tb.last_state(model).method == METHODS[method](k).method
    assert out.shape == ref["ids"].shape
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # the prompt is kept
    assert not torch.equal(logits[:, -1], ref["logits"][:, -1])  # the cut changed what the LLM saw


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_fraction_and_adaptive_budgets(family):
    model, make_batch, _ = vlm(family)
    tb.apply(model, tb.VisualPool(tokens=0.25))
    with torch.no_grad():
        model(**make_batch())
    state = tb.last_state(model)
    assert state.visual_tokens == [max(1, round(0.25 * n)) for n in state.available]
    tb.apply(model, tb.VisualRandom(tokens=0.25, allocation="adaptive"))
    with torch.no_grad():
        generate(model, make_batch())
    state = tb.last_state(model)
    assert sum(state.visual_tokens) == sum(max(1, round(0.25 * n)) for n in state.available)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_keeps_the_3d_positions_of_surviving_tokens(family):
    model, make_batch, ref = vlm(family)
    batch = make_batch()
    full = LLMInputs(model)
    with torch.no_grad():
        generate(model, make_batch())
    full.remove()
    tb.apply(model, tb.VisualRandom(tokens=5))
    cut = LLMInputs(model)
    with torch.no_grad():
        generate(model, make_batch())
    cut.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full_pos, cut_pos = full.positions[0][-3:], cut.positions[0][-3:]  # the 3 rope rows [3, B, L]
    for row in range(2):
        real = full_pos[:, row, mask[row] == 1]
        kept = cut_pos[:, row, cut_pos.shape[2] - cut.rows[0][row] :]
        text = real[:, ids[row][mask[row] == 1] != model.config.image_token_id]
        # every kept position is one of the full prompt's, in order, all text positions among them
        assert all(any(torch.equal(c, r) for r in real.T) for c in kept.T)
        assert all(any(torch.equal(t, c) for c in kept.T) for t in text.T)
    # decoding continues where the full prompt would: the first new token's positions match
    assert torch.equal(cut.positions[1][-3:], full.positions[1][-3:])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_remove_restores_exactly_and_keys_unchanged(family):
    model, make_batch, ref = vlm(family)
    keys = list(model.state_dict())
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    tb.apply(model, tb.VisionZip(tokens=4))
    tb.apply(model, tb.VisualSelect(tokens=6))  # applying again replaces the patch
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        generate(model, make_batch())
    assert tb.last_state(model).visual_tokens == [6, 6]
    tb.remove(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert "get_rope_index" not in model.model.__dict__
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, ref["logits"])
        assert torch.equal(generate(model, make_batch()), ref["ids"])


def test_bad_budgets_and_models_fail_clearly():
    model, make_batch, _ = vlm("llava")
    with pytest.raises(ValueError, match="larger than image 0's 16 tokens"):
        tb.apply(model, tb.VisualPool(tokens=17))
    assert not tb.is_patched(model)
    for bad in (0, 1.5, -3, "64"):
        with pytest.raises(ValueError, match="token"):
            tb.VisionZip(tokens=bad)
    with pytest.raises(ValueError, match="reducer must be one of"):
        tb.TowerReduce(tokens=4, reducer="nope")
    anyres, make_anyres, _ = vlm("llava_next")  # images of 52 and 36 tokens
    tb.apply(anyres, tb.VisualPool(tokens=40))
    with pytest.raises(ValueError, match="larger than image 1's 36 tokens"), torch.no_grad():
        anyres(**make_anyres())
    import transformers as T

    llm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))  # fmt: skip
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        tb.apply(llm, tb.VisionZip(tokens=4))
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    with pytest.raises(ValueError, match="transformers VLMs"):
        tb.apply(vit, tb.VisualRandom(tokens=4))


def test_tower_budget_counts_at_the_layer_the_projector_reads():
    model, make_batch, _ = vlm("llava")
    assert model.config.vision_feature_layer == -2
    tb.apply(model, tb.TowerReduce(tokens=6, reducer="tome"))
    captured = []
    layers = [m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    handle = layers[-2].register_forward_hook(
        lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(**make_batch())
    handle.remove()
    assert captured[0].shape[1] == 6 + 1  # 6 visual tokens + the class token the projector drops
    assert tb.last_state(model).visual_tokens == [6, 6]


@pytest.mark.parametrize("family", ["llava", "llava_dinov2"])  # CLIP and DINOv2 towers
def test_visionzip_keeps_the_tokens_the_class_token_attends_to_most(family):
    model, make_batch, _ = vlm(family)
    batch = make_batch()
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")  # attention weights for the reference
    try:
        with torch.no_grad():
            out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation("sdpa")
    layer = len(out.attentions) + model.config.vision_feature_layer  # the layer the projector reads (-2)
    cls_attention = out.attentions[layer][:, :, 0, 1:].mean(1)  # [images, patches]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(
            out.hidden_states[model.config.vision_feature_layer][:, 1:]
        )
    tb.apply(model, tb.VisionZip(tokens=4, contextual=0))
    scattered = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: scattered.append(kw["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    embeds = scattered[0]
    for image in range(2):
        top = cls_attention[image].topk(4).indices.sort().values
        got = embeds[image][
            (embeds[image][:, None] - projected[image][top][None]).abs().amax(-1).min(1).values < 1e-5
        ]
        assert got.shape[0] == 4  # exactly the 4 dominant tokens' projected features reached the LLM


def test_vlm_config_names_and_json():
    assert tb.vlm_config("full", 8) is None
    assert tb.vlm_config("random", 8, seed=2) == tb.VisualRandom(tokens=8, seed=2)
    assert tb.vlm_config("pool", 0.5) == tb.VisualPool(tokens=0.5)
    assert tb.vlm_config("visionzip", 8) == tb.VisionZip(tokens=8)
    assert tb.vlm_config("select", 8) == tb.VisualSelect(tokens=8)
    assert tb.vlm_config("tome", 8) == tb.TowerReduce(tokens=8, reducer="tome")
    names = tb.vlm_method_names()
    assert names[:6] == ["full", "random", "pool", "visionzip", "select", "fastv"]
    assert {"tome", "pitome", "auto"} <= set(names)
    with pytest.raises(ValueError, match="choose from full, random"):
        tb.vlm_config("nope", 8)
    for config in (tb.VisualRandom(tokens=8, seed=2), tb.VisionZip(tokens=0.3, contextual=2),
                   tb.TowerReduce(tokens=8, reducer="pitome", options={"prop_attn": False})):  # fmt: skip
        assert tb.config_from_json(config.to_json()) == config


def test_cut_ops():
    from tokenbudget.ops.visual_cut import (
        compact,
        grid_cells,
        keep_random,
        pool_cells,
        question_scores,
        visionzip,
    )

    for rows, cols, k in [(4, 4, 5), (4, 6, 7), (3, 5, 1), (4, 4, 16), (2, 9, 13)]:
        cells = grid_cells(rows, cols, k)
        assert cells.unique().numel() == k  # exactly k non-empty cells
        x = torch.randn(rows * cols, 3)
        feats, kept = pool_cells(x, cells, k)
        assert feats.shape == (k, 3) and kept.tolist() == sorted(kept.tolist())
        for j in range(k):  # each feature is the mean of the cell of its representative token
            assert torch.allclose(feats[j], x[cells == cells[kept[j]]].mean(0))
    x = torch.randn(16, 3)
    assert torch.equal(pool_cells(x, grid_cells(4, 4, 16), 16)[0], x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(keep_random(20, 6, g1), keep_random(20, 6, g2))
    visual = torch.randn(10, 256, generator=torch.Generator().manual_seed(0))
    query = visual[[3, 7]] * 2.0  # the question "talks about" tokens 3 and 7
    assert set(question_scores(visual, query).topk(2).indices.tolist()) == {3, 7}
    scores = torch.arange(10.0)
    feats, kept = visionzip(visual, scores, visual, 5, 2)
    assert feats.shape == (5, 256) and {7, 8, 9} <= set(kept.tolist())  # 3 dominant + 2 contextual
    assert torch.allclose(feats[[kept.tolist().index(i) for i in (7, 8, 9)]], visual[[7, 8, 9]])
    merged = feats[[j for j, i in enumerate(kept.tolist()) if i not in (7, 8, 9)]]
    # the 7 other tokens are averaged onto 2 centres: the group means, weighted by size, give their mean
    assert merged.shape == (2, 256) and not any(torch.allclose(m, v) for m in merged for v in visual[7:])
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]]).bool()
    source, valid = compact(keep, left=True)
    assert source[0, 2:].tolist() == [1, 2, 4] and valid[0].tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("family", ["llava", "llava_dinov2", "qwen2_vl"])
def test_right_padding_sampling_and_labels(family):
    model, make_batch, _ = vlm(family)
    batch = make_batch()
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    right = {k: v for k, v in batch.items()}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in right:
            right[key] = torch.stack([row.roll(-p) for row, p in zip(right[key], pads, strict=True)])
    with torch.no_grad():
        ref = model(**right).logits
    tb.apply(model, tb.VisualPool(tokens=1.0))
    with torch.no_grad():
        assert torch.equal(model(**right).logits, ref)
    tb.apply(model, tb.VisualPool(tokens=4))
    seen = LLMInputs(model)
    with torch.no_grad():
        model(**right)
        out = model.generate(**make_batch(), max_new_tokens=2, do_sample=True, num_return_sequences=2,
                             return_dict_in_generate=True)  # fmt: skip
    seen.remove()
    assert seen.images[0] == [4, 4] and seen.rows[0] == [t + 4 for t in text_tokens(model, batch)]
    prompt = batch["input_ids"].repeat_interleave(2, 0)
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)
    labeled = make_batch()
    labeled["labels"] = labeled["input_ids"].clone()
    loss = model(**labeled).loss
    loss.backward()  # gradients flow through the cut features into the projector
    projector = next(p for n, p in model.named_parameters() if "visual" in n or "projector" in n)
    assert torch.isfinite(loss) and projector.grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(NotImplementedError, match="input_ids"):
        embeds = model.get_input_embeddings()(batch["input_ids"])
        model(
            inputs_embeds=embeds, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        )


def test_several_feature_layers_and_the_full_select_strategy():
    import transformers as T

    import vlm_models as V

    torch.manual_seed(0)
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**V.VISION), text_config=T.LlamaConfig(**V.TEXT),
        image_token_id=V.IMAGE_TOKEN, vision_feature_layer=[-3, -2], vision_feature_select_strategy="full",
        attn_implementation="sdpa",
    )  # fmt: skip
    model = T.LlavaForConditionalGeneration(config).eval()
    tokens = (V.VISION["image_size"] // V.VISION["patch_size"]) ** 2 + 1  # the class token is a visual token
    ids = torch.tensor([[5] + [V.IMAGE_TOKEN] * tokens + [6, 7]] * 2)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 32, 32),
    }
    with pytest.raises(ValueError, match="cannot reach 6 tokens.*give a larger budget"):
        tb.apply(model, tb.TowerReduce(tokens=6))  # one layer before layer -3 merges at most half
    for config in (tb.TowerReduce(tokens=9), tb.VisionZip(tokens=6), tb.VisualPool(tokens=6)):
        tb.apply(model, config)
        seen = LLMInputs(model)
        with torch.no_grad():
            model(**batch)
        seen.remove()
        assert seen.images[0] == [config.tokens] * 2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_select_attention_query_matches_the_llm_own_attention(family):
    from tokenbudget.adapters import hf_vlm_parts as parts
    from tokenbudget.patch import installed

    model, make_batch, _ = vlm(family)
    batch = make_batch()
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions[1]  # layer 1 [B, H, L, L]
    finally:
        language_model.set_attn_implementation("sdpa")
    tb.apply(model, tb.VisualSelect(tokens=4, query="attention"))
    adapter = installed(model)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        feats = list(model.model.get_image_features(**{k: v for k, v in batch.items() if "pixel" in k or
                     k in ("image_sizes", "image_grid_thw")}, return_dict=True).pooler_output)  # fmt: skip
    llm = adapter._layer_queries(batch, ids, mask, ids == model.config.image_token_id, feats)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    row = int(mask.sum(1).argmax())  # the prompt without padding
    weights = torch.softmax(
        (llm.q[row] @ llm.k[row].transpose(-1, -2) * llm.scaling).masked_fill(~causal, -1e9), -1
    )
    assert torch.allclose(weights, attentions[row].float(), atol=1e-5)
    assert isinstance(llm, parts.LayerQueries)


def test_qwen_video_passes_uncut_beside_cut_images():
    from vlm_models import IMAGE_TOKEN

    model, make_batch, _ = vlm("qwen2_vl")
    batch = make_batch()
    vc = model.config.vision_config
    grid = torch.tensor([[2, 4, 4]])  # a 2-frame video: 2 * 4 * 4 / 4 = 8 tokens
    video, n = model.config.video_token_id, int(grid.prod()) // vc.spatial_merge_size**2
    ids = torch.cat([batch["input_ids"], torch.tensor([[video] * n + [20], [0] * (n + 1)])], 1)
    mask = torch.cat([batch["attention_mask"], torch.tensor([[1] * (n + 1), [0] * (n + 1)])], 1)
    ids[1], mask[1] = ids[1].roll(n + 1), mask[1].roll(n + 1)  # row 1 left-padded (a padding column too)
    pixels = torch.randn(int(grid.prod()), 3 * vc.temporal_patch_size * vc.patch_size**2)
    batch.update(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid,
                 mm_token_type_ids=(ids == IMAGE_TOKEN).int() + 2 * (ids == video).int())  # fmt: skip
    with torch.no_grad():
        ref, ref_ids = model(**batch).logits, generate(model, dict(batch))
    tb.apply(model, tb.VisualPool(tokens=1.0))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref) and torch.equal(generate(model, dict(batch)), ref_ids)
    tb.apply(model, tb.VisualPool(tokens=4))
    seen = LLMInputs(model)
    with torch.no_grad():
        out = generate(model, dict(batch))
    seen.remove()
    assert seen.images[0] == [4, 4] and tb.last_state(model).visual_tokens == [4, 4]
    assert seen.rows[0] == (mask.sum(1) - torch.tensor([16 - 4, 24 - 4])).tolist()  # the video tokens stay
    assert torch.equal(out[:, : ids.shape[1]], ids)
