"""FastV inside the LLM (tb.FastV, adapters.hf_vlm_llm.install_fastv) on a tiny random LLaVA.

Checked against the unpatched model: identity at tokens=1.0, the per-layer KV cache lengths at k,
left-padded batched generate against one row at a time, the recomputed attention row against the
eager attention maps, exact uninstall, and the errors for bad layers and budgets.
"""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from tokenbudget.adapters.hf_vlm_llm import install_fastv
from tokenbudget.ops.llm_attention import gather_positions, image_spans, keep_positions

transformers = pytest.importorskip("transformers")

PAD = 0


def tiny_llava(seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A random LLaVA: CLIP tower on 32x32 images (16 visual tokens), 4-layer GQA Llama."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=63,
        image_seq_length=16,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


def visual_count(model: torch.nn.Module) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def batch(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows, one image each, prompts of different lengths, left padded."""
    gen = torch.Generator().manual_seed(seed)
    n, token = visual_count(model), model.config.image_token_id
    rows = [[5, 6, *([token] * n), 7, 8, 9, 10], [11, *([token] * n), 12, 13]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(
        2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size, generator=gen
    )
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def row(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    keep = inputs["attention_mask"][b].bool()
    return {
        "input_ids": inputs["input_ids"][b : b + 1, keep],
        "attention_mask": inputs["attention_mask"][b : b + 1, keep],
        "pixel_values": inputs["pixel_values"][b : b + 1],
    }


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD)


@pytest.fixture(scope="module")
def llava() -> torch.nn.Module:
    torch.set_num_threads(1)
    return tiny_llava()


def test_identity_keeps_logits_and_ids_exactly(llava):
    inputs = batch(llava)
    with torch.no_grad():
        ref_logits = llava(**inputs).logits
    ref_ids = generate(llava, inputs)
    handle = install_fastv(llava, tb.FastV(tokens=1.0, layer=2))
    try:
        with torch.no_grad():
            logits = llava(**inputs).logits
        ids = generate(llava, inputs)
        assert handle.state.visual_tokens == [visual_count(llava)] * 2
    finally:
        handle.uninstall()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_cache_of_layers_from_k_holds_only_kept_tokens(llava, layer):
    inputs, k, n = batch(llava), 5, visual_count(llava)
    cache = transformers.DynamicCache(config=llava.config.text_config)
    handle = install_fastv(llava, tb.FastV(tokens=k, layer=layer))
    try:
        with torch.no_grad():
            out = llava(**inputs, past_key_values=cache, use_cache=True)
    finally:
        handle.uninstall()
    length = inputs["input_ids"].shape[1]
    lengths = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    assert lengths == [length] * layer + [length - n + k] * (len(lengths) - layer)
    assert out.logits.shape[1] == length  # the full prompt length comes back
    state = handle.state
    assert state.method == "fastv" and state.available == [n, n]
    assert state.visual_tokens == [k, k] and state.kv_visual_tokens == [k, k]
    # the kept positions: every text position, k of the image's, in order
    image = inputs["input_ids"] == llava.config.image_token_id
    kept_image = gather_positions(image, state.keep, dim=1)
    assert kept_image.sum(1).tolist() == [k, k] and bool((state.keep.diff(dim=1) > 0).all())
    assert (~kept_image).sum(1).tolist() == (~image).sum(1).tolist()


def test_fraction_budget_and_generate_through_the_cut_cache(llava):
    inputs = batch(llava)
    handle = install_fastv(llava, tb.FastV(tokens=0.25, layer=2))
    try:
        out = generate(llava, inputs, steps=6)
        state = handle.state
    finally:
        handle.uninstall()
    assert state.visual_tokens == [visual_count(llava) // 4] * 2
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_left_padded_batch_generates_what_each_row_does_alone(llava):
    inputs = batch(llava)
    handle = install_fastv(llava, tb.FastV(tokens=4, layer=2))
    try:
        together = generate(llava, inputs, steps=6)
        keep_together = handle.state.keep
        alone = []
        for b in range(2):
            alone.append(generate(llava, row(inputs, b), steps=6))
            pad = int((inputs["attention_mask"][b] == 0).sum())
            # the same visual tokens were chosen (positions shifted by the row's padding)
            assert torch.equal(handle.state.keep[0] + pad, keep_together[b, pad:])
    finally:
        handle.uninstall()
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(together[:, :prompt], inputs["input_ids"])
    for b in range(2):
        assert torch.equal(together[b, prompt:], alone[b][0, alone[b].shape[1] - 6 :])


def test_fastv_changes_the_output_at_small_budgets(llava):
    inputs = batch(llava)
    with torch.no_grad():
        ref = llava(**inputs).logits[:, -1]
        handle = install_fastv(llava, tb.FastV(tokens=1, layer=1))
        try:
            cut = llava(**inputs).logits[:, -1]
        finally:
            handle.uninstall()
    assert not torch.allclose(cut, ref)


def test_recomputed_score_row_equals_eager_attention(llava):
    inputs, layer = batch(llava), 2
    handle = install_fastv(llava, tb.FastV(tokens=4, layer=layer))
    try:
        with torch.no_grad():
            llava(**inputs)  # SDPA: the row is recomputed, never read from attention maps
        scores = handle.state.scores
    finally:
        handle.uninstall()
    eager = tiny_llava(attn="eager")
    eager.load_state_dict(llava.state_dict())
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions
    reference = maps[layer][:, :, -1, :].mean(dim=1)  # the last token's row, mean over heads
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert bool((scores[inputs["attention_mask"] == 0] == 0).all())  # padding gets no attention


def test_uninstall_restores_exactly(llava):
    inputs = batch(llava)
    keys = list(llava.state_dict())
    with torch.no_grad():
        ref = llava(**inputs).logits
    handle = install_fastv(llava, tb.FastV(tokens=3, layer=1))
    with torch.no_grad():
        llava(**inputs)
    handle.uninstall()
    assert list(llava.state_dict()) == keys
    inner = llava.model
    assert not inner._forward_pre_hooks and "get_image_features" not in inner.__dict__
    assert all("forward" not in layer.__dict__ for layer in inner.language_model.layers)
    with torch.no_grad():
        assert torch.equal(llava(**inputs).logits, ref)


def test_bad_layers_budgets_and_models(llava):
    with pytest.raises(ValueError, match="layer"):
        tb.FastV(tokens=4, layer=0)
    with pytest.raises(ValueError, match="layer"):
        install_fastv(llava, tb.FastV(tokens=4, layer=llava.config.text_config.num_hidden_layers))
    for tokens in (0, 1.5, -2):
        with pytest.raises(ValueError, match="tokens|count|fraction"):
            tb.FastV(tokens=tokens)
    handle = install_fastv(llava, tb.FastV(tokens=visual_count(llava) + 1, layer=2))
    try:
        with pytest.raises(ValueError, match="larger than"):
            llava(**batch(llava))
    finally:
        handle.uninstall()
    with pytest.raises(ValueError, match="vision-language"):
        install_fastv(torch.nn.Linear(2, 2), tb.FastV(tokens=4))
    other = type("OtherVLM", (transformers.LlavaForConditionalGeneration,), {})
    llava.__class__ = other
    try:
        with pytest.raises(NotImplementedError, match="supported"):
            install_fastv(llava, tb.FastV(tokens=4))
    finally:
        llava.__class__ = transformers.LlavaForConditionalGeneration


def test_config_round_trips_json():
    config = tb.FastV(tokens=64, layer=3)
    assert tb.config_from_json(config.to_json()) == config and config.method == "fastv"
    assert tb.FastV(tokens=1.0).is_identity


def test_ops_keep_the_top_tokens_of_each_span_in_order():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.4, 0.1, 0.8, 0.6, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]]).bool()
    spans = image_spans(mask, [2, 3, 5])  # row 0's run holds two images
    assert spans == [[(1, 3), (3, 6)], [(1, 6)]]
    assert image_spans(mask, [4, 4]) == [[(1, 6)], [(1, 6)]]  # lengths that do not tile: runs
    assert keep_positions(scores, spans, [1, 1, 2]).tolist() == [[0, 1, 3, 6], [0, 4, 5, 6]]
    with pytest.raises(ValueError, match="same count"):
        keep_positions(scores, spans, [1, 1, 3])
