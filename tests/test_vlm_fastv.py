"""FastV inside the LLM (tb.FastV, adapters.hf_vlm_llm.install_fastv) on tiny random VLMs of every family
(tests/vlm_models.py's make_vlm, with a 4-layer language model so that K=2 has layers on both sides).

The contract over every family: identity at tokens=1.0, per-row KV cache of layers >= K holding the row's
text + k per image (rows with images of different sizes left-padded, the padding slots masked), the padded
batch generating what each row does alone, the prompt kept, exact remove; then the recomputed attention
row against eager attention maps, the default layer, and the errors for bad layers, budgets and models.
"""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from tokenbudget.adapters.hf_vlm_llm import install_fastv
from tokenbudget.ops.llm_attention import (
    apply_rope,
    causal_allowed,
    image_spans,
    keep_positions,
    left_pack,
    mask_padding_slots,
    query_row_attention,
    repeat_kv_heads,
)
from tokenbudget.ops.visual_budget import visual_token_counts

transformers = pytest.importorskip("transformers")

from vlm_models import FAMILIES, PAD, make_vlm, row_alone, text_tokens  # noqa: E402

LAYERS = 4  # decoder layers of the test LLMs: FastV's default K=2 has 2 layers before and after it
STEPS = 3

_MODELS: dict[str, tuple] = {}


def vlm(family: str) -> tuple[torch.nn.Module, object]:
    """(model, batch builder), built once per family for the whole file; any patch removed."""
    torch.set_num_threads(1)
    if family not in _MODELS:
        _MODELS[family] = make_vlm(family, text_layers=LAYERS)
    model, make_batch = _MODELS[family]
    tb.remove(model)
    return model, make_batch


def generate(model: torch.nn.Module, inputs: dict, steps: int = STEPS, **options) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD, **options)


def last_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_and_remove_restore_exactly(family):
    model, make_batch = vlm(family)
    keys, hooks = list(model.state_dict()), hook_count(model)
    with torch.no_grad():
        ref_logits = model(**make_batch()).logits
    ref_ids = generate(model, make_batch())
    tb.apply(model, tb.FastV(tokens=1.0))
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, ref_logits)
    assert torch.equal(generate(model, make_batch()), ref_ids)
    state = tb.last_state(model)
    assert state.visual_tokens == state.available == state.kv_visual_tokens and state.layer == 2
    assert model.config._attn_implementation == "sdpa"  # never forced to eager
    tb.apply(model, tb.FastV(tokens=3, layer=1))
    generate(model, make_batch())
    tb.remove(model)
    inner = model.model
    assert list(model.state_dict()) == keys and hook_count(model) == hooks
    assert "get_image_features" not in inner.__dict__
    assert all("forward" not in layer.__dict__ for layer in inner.language_model.layers)
    with torch.no_grad():
        assert torch.equal(model(**make_batch()).logits, ref_logits)
    assert torch.equal(generate(model, make_batch()), ref_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_cut_cache_per_row_and_padded_batch_equal_each_row_alone(family):
    model, make_batch = vlm(family)
    batch, k = make_batch(), 4
    with torch.no_grad():
        ref = model(**make_batch()).logits[:, -1]
    tb.apply(model, tb.FastV(tokens=k))
    out = generate(model, make_batch(), return_dict_in_generate=True, output_logits=True)
    state = tb.last_state(model)
    cut = last_logits(model, make_batch())
    assert state.layer == 2 and state.visual_tokens == [k, k] and state.kv_visual_tokens == [k, k]
    assert not torch.allclose(cut, ref)  # the cut changed what layers >= K saw
    # layers >= K: per row its real text tokens + k (padding slots, keep == -1, not counted)
    prompt = batch["input_ids"].shape[1]
    per_row = [t + k for t in text_tokens(model, batch)]
    assert (state.keep >= 0).sum(1).tolist() == per_row and state.keep.shape[1] == max(per_row)
    held = [layer.get_seq_length() for layer in out.past_key_values.layers]
    assert held == [prompt + STEPS - 1] * 2 + [max(per_row) + STEPS - 1] * (LAYERS - 2)
    image = batch["input_ids"] == model.config.image_token_id
    for row in range(2):
        kept = state.keep[row][state.keep[row] >= 0]
        assert int(image[row, kept].sum()) == k and bool((kept.diff() > 0).all())
    assert torch.equal(out.sequences[:, :prompt], batch["input_ids"])  # the prompt is kept
    for row in range(2):
        alone = row_alone(batch, row)
        single = generate(model, alone, return_dict_in_generate=True, output_logits=True)
        torch.testing.assert_close(last_logits(model, alone)[0], cut[row], atol=1e-5, rtol=1e-5)
        assert torch.equal(single.sequences[0, -STEPS:], out.sequences[row, -STEPS:])
        for step, logits in enumerate(single.logits):  # prefill and every decode step
            torch.testing.assert_close(logits[0], out.logits[step][row], atol=1e-5, rtol=1e-5)
        # the same kept tokens at the same (original) rope positions: equal keys in a cut layer
        slots = state.keep[row] >= 0
        keys = out.past_key_values.layers[LAYERS - 1].keys[row][:, : slots.numel()][:, slots]
        torch.testing.assert_close(keys, single.past_key_values.layers[LAYERS - 1].keys[0][:, : per_row[row]])


@pytest.mark.parametrize(("family", "attn"), [("qwen2_vl", "sdpa"), ("llava_next", "eager")])
def test_rows_without_padding_and_eager_masks(family, attn):
    """A batch without padding (SDPA then gets no mask) whose rows keep different counts, and the
    additive float masks of eager attention."""
    model, make_batch = vlm(family)
    batch = make_batch()
    if attn == "sdpa":  # fill row 0's padding with text: no padding, the rows still keep 11 and 7
        batch["input_ids"][batch["attention_mask"] == 0] = 20
        batch["attention_mask"][:] = 1
        batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    model.model.language_model.set_attn_implementation(attn)
    try:
        tb.apply(model, tb.FastV(tokens=3, layer=1))
        options = {"return_dict_in_generate": True, "output_logits": True}
        out = generate(model, batch, **options)
        assert bool((tb.last_state(model).keep < 0).any())  # rows were padded
        for row in range(2):
            single = generate(model, row_alone(batch, row), **options)
            assert torch.equal(single.sequences[0, -STEPS:], out.sequences[row, -STEPS:])
            for step, logits in enumerate(single.logits):  # prefill and every decode step
                torch.testing.assert_close(logits[0], out.logits[step][row], atol=1e-5, rtol=1e-5)
    finally:
        tb.remove(model)
        model.model.language_model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_score_row_equals_eager_attention(family):
    model, make_batch = vlm(family)
    batch = make_batch()
    handle = install_fastv(model, tb.FastV(tokens=4))
    try:
        with torch.no_grad():
            model(**batch)  # SDPA: the row is recomputed, never read from attention maps
        scores = handle.state.scores
    finally:
        handle.uninstall()
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():  # PaliGemma's prefix is bidirectional: its last row still sees every token
            maps = model(**batch, output_attentions=True).attentions
    finally:
        language_model.set_attn_implementation("sdpa")
    assert len(maps) == LAYERS
    reference = maps[2][:, :, -1, :].mean(dim=1)  # the last token's row at K=2, mean over heads
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert bool((scores[batch["attention_mask"] == 0] == 0).all())  # padding gets no attention


def test_default_layer_resolves_from_the_language_model():
    model, make_batch = make_vlm("llava")  # a 2-layer language model: K = 1
    config = tb.vlm_config("fastv", 4)
    assert config == tb.FastV(tokens=4) and config.layer is None
    tb.apply(model, config)
    out = generate(model, make_batch())
    assert tb.last_state(model).layer == 1 and tb.last_state(model).kv_visual_tokens == [4, 4]
    assert out.shape[1] == make_batch()["input_ids"].shape[1] + STEPS
    tb.remove(model)
    with pytest.raises(ValueError, match=r"2 decoder layers; give a layer in 1..1"):
        tb.apply(model, tb.FastV(tokens=4, layer=2))
    assert not tb.is_patched(model)
    model.model.language_model.layers = model.model.language_model.layers[:1]
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        install_fastv(model, tb.FastV(tokens=4))


def test_fraction_budget_and_fastv_changes_the_output():
    model, make_batch = vlm("llava")
    batch = make_batch()
    ref = last_logits(model, batch)
    tb.apply(model, tb.FastV(tokens=0.25, layer=1))
    out = generate(model, batch, steps=4)
    state = tb.last_state(model)
    assert state.visual_tokens == [round(0.25 * n) for n in state.available]
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    tb.apply(model, tb.FastV(tokens=1, layer=1))
    assert not torch.allclose(last_logits(model, batch), ref)


def test_bad_layers_budgets_and_models():
    model, make_batch = vlm("llava")
    for layer in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="layer"):
            tb.FastV(tokens=4, layer=layer)
    with pytest.raises(ValueError, match="layer"):
        install_fastv(model, tb.FastV(tokens=4, layer=LAYERS))
    for tokens in (0, 1.5, -2):
        with pytest.raises(ValueError, match="tokens|count|fraction"):
            tb.FastV(tokens=tokens)
    n = int((make_batch()["input_ids"][0] == model.config.image_token_id).sum())
    tb.apply(model, tb.FastV(tokens=n + 1))
    with pytest.raises(ValueError, match="larger than"), torch.no_grad():
        model(**make_batch())
    tb.remove(model)
    with pytest.raises(ValueError, match="vision-language"):
        install_fastv(torch.nn.Linear(2, 2), tb.FastV(tokens=4))
    other = type("OtherVLM", (transformers.LlavaForConditionalGeneration,), {})
    model.__class__ = other
    try:
        with pytest.raises(NotImplementedError, match="supported"):
            install_fastv(model, tb.FastV(tokens=4))
    finally:
        model.__class__ = transformers.LlavaForConditionalGeneration


def test_config_round_trips_json():
    for config in (tb.FastV(tokens=64, layer=3), tb.FastV(tokens=0.25)):
        assert tb.config_from_json(config.to_json()) == config and config.method == "fastv"
    assert tb.FastV(tokens=1.0).is_identity


def test_ops_keep_pack_and_mask():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.4, 0.1, 0.8, 0.6, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]]).bool()
    spans = image_spans(mask, [2, 3, 5])  # row 0's run holds two images
    assert spans == [[(1, 3), (3, 6)], [(1, 6)]]
    assert image_spans(mask, [4, 4]) == [[(1, 6)], [(1, 6)]]  # lengths that do not tile: runs
    keep = keep_positions(scores, spans, [1, 1, 2])
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 1, 3, 6]
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]).bool()  # row 1: 2 padding
    spans = [[(1, 6)], [(2, 6)]]
    keep = keep_positions(scores, spans, [2, 1], real)
    assert keep.tolist() == [[i in (0, 1, 3, 6) for i in range(7)], [i in (4, 6) for i in range(7)]]
    index, valid = left_pack(keep)  # row 1 keeps 2 of 4: two padding slots repeating its first position
    assert index.tolist() == [[0, 1, 3, 6], [4, 4, 4, 6]]
    assert valid.tolist() == [[True] * 4, [False, False, True, True]]
    allowed = causal_allowed(valid, 4)
    assert allowed[1, 0].tolist() == [
        [False] * 4,
        [False] * 4,
        [False, False, True, False],
        [False, False, True, True],
    ]
    masked = mask_padding_slots(allowed, valid, rows=valid)  # padding-slot queries see themselves only
    assert masked[1, 0, 0].tolist() == [True, False, False, False] and masked[1, 0, 3].tolist() == [
        False,
        False,
        True,
        True,
    ]
    floats = torch.zeros(2, 1, 1, 4)
    assert torch.equal(mask_padding_slots(floats, valid)[1, 0, 0] < 0, ~valid[1])
    assert mask_padding_slots(torch.ones(2, 4, dtype=torch.long), valid).tolist()[1] == [0, 0, 1, 1]


def test_rope_head_repeat_and_softcap_match_transformers():
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ref_q, ref_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), ref_q) and torch.equal(apply_rope(k, cos, sin), ref_k)
    keys = repeat_kv_heads(k, 2)
    assert torch.equal(keys, modeling_llama.repeat_kv(k, 2))
    logits = torch.einsum("bhd,bhld->bhl", q[:, :, -1], keys) * 0.5
    capped = torch.softmax(torch.tanh(logits / 2.0) * 2.0, dim=-1).mean(1)  # Gemma-2's soft-capping
    assert torch.allclose(query_row_attention(q[:, :, -1], keys, 0.5, softcap=2.0), capped)
    assert not torch.allclose(query_row_attention(q[:, :, -1], keys, 0.5), capped)


def test_image_tokens_found_from_inputs_embeds_too():
    model, make_batch = vlm("llava")
    batch = make_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    handle = install_fastv(model, tb.FastV(tokens=3))
    try:
        with torch.no_grad():
            from_ids = model(**batch).logits
            keep = handle.state.keep
            from_embeds = model(
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
        assert torch.equal(handle.state.keep, keep) and handle.state.visual_tokens == [3, 3]
    finally:
        handle.uninstall()
    assert torch.equal(from_ids, from_embeds)


def test_a_static_cache_is_refused_clearly():
    model, make_batch = vlm("llava")
    tb.apply(model, tb.FastV(tokens=3))
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        generate(model, make_batch(), steps=2, cache_implementation="static")


@pytest.mark.parametrize("allocation", ["fixed", "adaptive"])
def test_two_adjacent_images_in_one_prompt_are_two_images(allocation):
    model, make_batch = vlm("llava")
    batch = make_batch()
    token = model.config.image_token_id
    n = int((batch["input_ids"][0] == token).sum())
    ids = torch.tensor([[5, *([token] * (2 * n)), 7, 8]])  # no text between the images
    two = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": batch["pixel_values"]}
    tb.apply(model, tb.FastV(tokens=4, allocation=allocation))
    with torch.no_grad():
        model(**two)
    state = tb.last_state(model)
    assert state.available == [n, n] and sum(state.visual_tokens) == 8
    if allocation == "fixed":
        assert state.visual_tokens == [4, 4]
    else:  # spread by the attention mass each image receives from the last token
        mass = [float(state.scores[0, 1 + i * n : 1 + (i + 1) * n].sum()) for i in range(2)]
        assert state.visual_tokens == visual_token_counts(4, [n, n], allocation="adaptive", scores=mass)


def test_adaptive_allocation_on_a_padded_batch():
    model, make_batch = vlm("llava_next")  # images of different sizes
    tb.apply(model, tb.FastV(tokens=4, allocation="adaptive"))
    out = generate(model, make_batch())
    state = tb.last_state(model)
    assert state.visual_tokens == [4, 4] and state.kv_visual_tokens == [4, 4]  # one image per prompt
    assert out.shape[1] == make_batch()["input_ids"].shape[1] + STEPS


def test_a_prompt_without_images_passes_through():
    model, make_batch = vlm("llava")
    text = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = model(input_ids=text).logits
        handle = install_fastv(model, tb.FastV(tokens=2, layer=1))
        try:
            model(**make_batch())
            assert handle.state.visual_tokens == [2, 2]
            out = model(input_ids=text).logits
            assert handle.state.visual_tokens == [] and handle.state.available == []
        finally:
            handle.uninstall()
    assert torch.equal(out, ref)
