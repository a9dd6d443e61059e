"""FastV inside the LLM (tb.FastV, adapters.hf_vlm_llm.install_fastv) on tiny random VLMs of every family.

Checked against the unpatched model: identity at tokens=1.0, the per-layer KV cache lengths at k,
left-padded batched generate against one row at a time, the recomputed attention row against the
eager attention maps, exact uninstall, and the errors for bad layers and budgets.
"""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from tokenbudget.adapters.hf_vlm_llm import install_fastv
from tokenbudget.ops.llm_attention import (
    apply_rope,
    gather_positions,
    image_spans,
    keep_positions,
    repeat_kv_heads,
)
from tokenbudget.ops.visual_budget import visual_token_counts

transformers = pytest.importorskip("transformers")

from fastv_vlms import FAMILIES, PAD, make_vlm, vlm_batch  # noqa: E402


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD)


_MODELS: dict[str, torch.nn.Module] = {}


def vlm(family: str) -> torch.nn.Module:
    """One SDPA model per family for the whole file (building them is the slow part)."""
    torch.set_num_threads(1)
    if family not in _MODELS:
        _MODELS[family] = make_vlm(family)
    return _MODELS[family]


@pytest.fixture
def llava() -> torch.nn.Module:
    return vlm("llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_keeps_logits_and_ids_exactly(family):
    model = vlm(family)
    inputs, _, n = vlm_batch(model, family)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_ids = generate(model, inputs)
    handle = install_fastv(model, tb.FastV(tokens=1.0, layer=2))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        ids = generate(model, inputs)
        assert handle.state.visual_tokens == [n, n]
    finally:
        handle.uninstall()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize(
    ("family", "layer"), [("llava", 1), ("llava", 2), ("llava", 3), *((f, 2) for f in FAMILIES[1:])]
)
def test_cache_of_layers_from_k_holds_only_kept_tokens(family, layer):
    model = vlm(family)
    inputs, _, n = vlm_batch(model, family)
    k = 5
    cache = transformers.DynamicCache(config=model.config.get_text_config())
    handle = install_fastv(model, tb.FastV(tokens=k, layer=layer))
    try:
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True)
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
    image = inputs["input_ids"] == model.config.image_token_id
    kept_image = gather_positions(image, state.keep, dim=1)
    assert kept_image.sum(1).tolist() == [k, k] and bool((state.keep.diff(dim=1) > 0).all())
    assert (~kept_image).sum(1).tolist() == (~image).sum(1).tolist()


def test_fraction_budget_and_generate_through_the_cut_cache(llava):
    inputs, _, n = vlm_batch(llava, "llava")
    handle = install_fastv(llava, tb.FastV(tokens=0.25, layer=2))
    try:
        out = generate(llava, inputs, steps=6)
        state = handle.state
    finally:
        handle.uninstall()
    assert state.visual_tokens == [round(0.25 * n)] * 2
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_what_each_row_does_alone(family):
    model = vlm(family)
    inputs, rows, _ = vlm_batch(model, family)
    handle = install_fastv(model, tb.FastV(tokens=4, layer=2))
    try:
        together = generate(model, inputs, steps=6)
        keep_together = handle.state.keep
        alone = []
        for b in range(2):
            alone.append(generate(model, rows[b], steps=6))
            pad = int((inputs["attention_mask"][b] == 0).sum())
            # the same visual tokens were chosen (positions shifted by the row's padding)
            assert torch.equal(handle.state.keep[0] + pad, keep_together[b, pad:])
    finally:
        handle.uninstall()
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(together[:, :prompt], inputs["input_ids"])
    for b in range(2):
        assert torch.equal(together[b, prompt:], alone[b][0, -6:])


def test_fastv_changes_the_output_at_small_budgets(llava):
    inputs, _, _ = vlm_batch(llava, "llava")
    with torch.no_grad():
        ref = llava(**inputs).logits[:, -1]
        handle = install_fastv(llava, tb.FastV(tokens=1, layer=1))
        try:
            cut = llava(**inputs).logits[:, -1]
        finally:
            handle.uninstall()
    assert not torch.allclose(cut, ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_recomputed_score_row_equals_eager_attention(family):
    model, layer = vlm(family), 2
    inputs, _, _ = vlm_batch(model, family)
    handle = install_fastv(model, tb.FastV(tokens=4, layer=layer))
    try:
        with torch.no_grad():
            model(**inputs)  # SDPA: the row is recomputed, never read from attention maps
        scores = handle.state.scores
    finally:
        handle.uninstall()
    eager = make_vlm(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions
    assert len(maps) == model.config.get_text_config().num_hidden_layers
    reference = maps[layer][:, :, -1, :].mean(dim=1)  # the last token's row, mean over heads
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert bool((scores[inputs["attention_mask"] == 0] == 0).all())  # padding gets no attention


def test_uninstall_restores_exactly(llava):
    inputs, _, _ = vlm_batch(llava, "llava")
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
    inputs, _, n = vlm_batch(llava, "llava")
    handle = install_fastv(llava, tb.FastV(tokens=n + 1, layer=2))
    try:
        with pytest.raises(ValueError, match="larger than"):
            llava(**inputs)
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


def test_image_tokens_found_from_inputs_embeds_too(llava):
    inputs, _, _ = vlm_batch(llava, "llava")
    embeds = llava.get_input_embeddings()(inputs["input_ids"])
    handle = install_fastv(llava, tb.FastV(tokens=3, layer=2))
    try:
        with torch.no_grad():
            from_ids = llava(**inputs).logits
            keep = handle.state.keep
            from_embeds = llava(
                inputs_embeds=embeds,
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
            ).logits
        assert torch.equal(handle.state.keep, keep) and handle.state.visual_tokens == [3, 3]
    finally:
        handle.uninstall()
    assert torch.equal(from_ids, from_embeds)


def test_a_static_cache_is_refused_clearly(llava):
    inputs, _, _ = vlm_batch(llava, "llava")
    handle = install_fastv(llava, tb.FastV(tokens=3, layer=2))
    try:
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            llava.generate(**inputs, max_new_tokens=2, cache_implementation="static", pad_token_id=PAD)
    finally:
        handle.uninstall()


def test_rope_and_head_repeat_match_transformers():
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ref_q, ref_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), ref_q) and torch.equal(apply_rope(k, cos, sin), ref_k)
    assert torch.equal(repeat_kv_heads(k, 2), modeling_llama.repeat_kv(k, 2))


@pytest.mark.parametrize("allocation", ["fixed", "adaptive"])
def test_two_adjacent_images_in_one_prompt_are_two_images(llava, allocation):
    inputs, _, n = vlm_batch(llava, "llava")
    token = llava.config.image_token_id
    ids = torch.tensor([[5, *([token] * (2 * n)), 7, 8]])  # no text between the images
    two = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"]}
    handle = install_fastv(llava, tb.FastV(tokens=4, layer=2, allocation=allocation))
    try:
        with torch.no_grad():
            llava(**two)
        state = handle.state
    finally:
        handle.uninstall()
    assert state.available == [n, n] and sum(state.visual_tokens) == 8
    if allocation == "fixed":
        assert state.visual_tokens == [4, 4]
    else:  # spread by the attention mass each image receives from the last token
        mass = [float(state.scores[0, 1 + i * n : 1 + (i + 1) * n].sum()) for i in range(2)]
        assert state.visual_tokens == visual_token_counts(4, [n, n], allocation="adaptive", scores=mass)


def test_adaptive_allocation_spreads_within_each_row_of_a_batch(llava):
    inputs, _, n = vlm_batch(llava, "llava")
    handle = install_fastv(llava, tb.FastV(tokens=4, layer=2, allocation="adaptive"))
    try:
        out = generate(llava, inputs, steps=3)  # rows keep equal counts: the batch stays rectangular
        assert handle.state.visual_tokens == [4, 4] and handle.state.kv_visual_tokens == [4, 4]
    finally:
        handle.uninstall()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_prompt_without_images_passes_through(llava):
    inputs, _, _ = vlm_batch(llava, "llava")
    text = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = llava(input_ids=text).logits
        handle = install_fastv(llava, tb.FastV(tokens=2, layer=1))
        try:
            llava(**inputs)
            assert handle.state.visual_tokens == [2, 2]
            out = llava(input_ids=text).logits
            assert handle.state.visual_tokens == [] and handle.state.available == []
        finally:
            handle.uninstall()
    assert torch.equal(out, ref)
