"""Training-free attention pruning (EViT): ops, a literal reference, counts, contract, validation."""

from __future__ import annotations

import math

import pytest
import torch

import tokenbudget as tb
from conftest import VARIANTS, make_tiny
from tokenbudget.ops.prune import fuse_tokens, select_tokens, top_k_split
from tokenbudget.ops.scores import class_attention
from tokenbudget.strategies.stages import stage_keep_count, stage_removals


def test_class_attention_is_the_class_row_of_the_full_matrix() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bias = torch.randn(2, 1, 1, 7)
    full = ((q @ k.transpose(-2, -1)) * 8**-0.5 + bias).softmax(dim=-1)  # [B, H, N, N]
    got = class_attention(q[:, :, :1], k, 8**-0.5, bias)
    assert got.shape == (2, 7)
    assert torch.allclose(got, full[:, :, 0].mean(dim=1), atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(2))


def test_top_k_split_partitions_in_input_order() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8], [0.7, 0.1, 0.2, 0.6, 0.0]])
    keep, drop = top_k_split(scores, 2, num_prefix=2)
    assert keep.tolist() == [[0, 1, 3, 6], [0, 1, 2, 5]]  # prefix, then the 2 best in input order
    assert drop.tolist() == [[2, 4, 5], [3, 4, 6]]
    with pytest.raises(ValueError, match="cannot keep 6 of 5"):
        top_k_split(scores, 6, 0)


def test_fuse_tokens_is_the_weighted_average_with_summed_size() -> None:
    torch.manual_seed(0)
    x, size = torch.randn(2, 6, 4), torch.rand(2, 6, 1) + 1
    drop = torch.tensor([[1, 4], [2, 3]])
    weights = torch.rand(2, 6)
    token, token_size = fuse_tokens(x, size, drop, weights)
    for b in range(2):
        w = weights[b, drop[b]]
        expected = (x[b, drop[b]] * (w / w.sum())[:, None]).sum(0)
        assert torch.allclose(token[b, 0], expected, atol=1e-6)
        assert torch.allclose(token_size[b, 0, 0], size[b, drop[b]].sum())
    _, ones = fuse_tokens(x, None, drop, weights)
    assert ones.flatten().tolist() == [2.0, 2.0]
    zero, _ = fuse_tokens(x, None, drop, torch.zeros(2, 6))  # no weight at all: plain average
    assert torch.allclose(zero[:, 0], select_tokens(x, drop).mean(1))


def test_stage_counts_follow_evit() -> None:
    assert stage_keep_count(10, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    assert stage_keep_count(64, 0.7) == 45 and stage_keep_count(5, 0.01) == 1
    # 64 patches, keep 0.7 at blocks 1 and 2: 64 -> 45 (+1 fused) -> ceil(0.7 * 46) = 33 (+1)
    assert stage_removals(65, 1, 4, (1, 2), 0.7, extra_token=True) == [0, 18, 12, 0]
    assert stage_removals(65, 1, 4, (1, 2), 0.7, extra_token=False) == [0, 19, 13, 0]


def _reference_evit(model: torch.nn.Module, images: torch.Tensor, keep: float, layers, fuse: bool):
    """EViT written out with the full attention matrix (timm's non-fused formula), block by block."""
    x = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(model.patch_prefix_tokens(x) if hasattr(model, "patch_prefix_tokens") else x)
    prefix = model.num_prefix_tokens
    size = torch.ones(x.shape[0], x.shape[1])
    for i, block in enumerate(model.blocks):
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :]
        weights = logits.softmax(dim=-1)  # [B, H, N, N]
        out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(b, n, c)))
        x = x + block.ls1(out)
        if i in layers:
            cls_attn = weights[:, :, 0].mean(dim=1)  # [B, N]
            m = n - prefix
            kept = math.ceil(round(keep * m, 9))
            rows, sizes = [], []
            for j in range(b):
                order = cls_attn[j, prefix:].argsort(descending=True) + prefix
                top, rest = order[:kept].sort().values, order[kept:].sort().values
                idx = torch.cat([torch.arange(prefix), top])
                row, s = x[j, idx], size[j, idx]
                if fuse and len(rest):
                    w = cls_attn[j, rest] / cls_attn[j, rest].sum()
                    row = torch.cat([row, (x[j, rest] * w[:, None]).sum(0, keepdim=True)])
                    s = torch.cat([s, size[j, rest].sum().view(1)])
                rows.append(row)
                sizes.append(s)
            x, size = torch.stack(rows), torch.stack(sizes)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.norm(x)


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers", "qk_norm", "deit_distilled"])
@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference_evit(variant, fuse, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = _reference_evit(model, images, 0.6, (1, 2), fuse)
        tb.apply(model, tb.Prune(keep=0.6, layers=(1, 2), fuse=fuse))
        got = model.forward_features(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers", "avgpool_cls", "clip_prenorm"])
def test_counts_sizes_and_prefix(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        tb.apply(model, tb.Prune(keep=0.7, layers=(1, 2)))
        logits = model(images)
    state = tb.last_state(model)
    p, n0 = model.num_prefix_tokens, state.input_tokens
    first = stage_keep_count(n0 - p, 0.7) + 1  # kept + the fused token
    second = stage_keep_count(first, 0.7) + 1
    assert state.tokens_per_layer == [n0, p + first, p + second, p + second]
    assert torch.isfinite(logits).all()
    # sizes: prefix 1, the fused token (last) stands for every dropped patch, the total is kept
    assert bool((state.sizes[:, :p] == 1).all()) and bool((state.sizes[:, -1] > 1).all())
    assert bool((state.sizes.sum(dim=1) == n0).all())


# Models without a class token are refused: test_model_without_class_token_is_refused.
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "avgpool_no_cls"])
def test_identity_remove_and_repeat(variant, images) -> None:
    tiny_model = make_tiny(variant)
    with torch.no_grad():
        expected = tiny_model(images)
        keys = list(tiny_model.state_dict())
        tb.apply(tiny_model, tb.Prune(keep=1.0, layers=(0, 1, 2, 3)))
        assert torch.equal(tiny_model(images), expected)
        tb.apply(tiny_model, tb.Prune(keep=0.5, layers=(1,)))
        once = tiny_model(images)
        assert list(tiny_model.state_dict()) == keys
        assert (once - expected).abs().max() > 1e-4
        tb.apply(tiny_model, tb.Prune(keep=0.5, layers=(1,)))
        assert torch.equal(tiny_model(images), once)
        tb.remove(tiny_model)
        assert torch.equal(tiny_model(images), expected)


def test_model_without_class_token_is_refused(images) -> None:
    model = make_tiny("avgpool_no_cls")
    tb.apply(model, tb.ToMe(r=4))
    with pytest.raises(ValueError, match="no class token"):
        tb.apply(model, tb.Prune(keep=0.5, layers=(1,)))
    assert tb.patched_config(model) == tb.ToMe(r=4)  # the failed apply left the previous patch


def test_threads_give_the_same_result(images) -> None:
    import threading

    model = tb.apply(make_tiny("vit"), tb.Prune(keep=0.5, layers=(1, 2)))
    with torch.no_grad():
        expected = [model(images[i : i + 1]) for i in range(3)]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i] = model(images[i : i + 1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert torch.equal(results[i], expected[i])


def test_config_validation_and_json() -> None:
    cfg = tb.Prune(keep=0.5, layers=[6, 3], fuse=False)
    assert cfg.layers == (3, 6)
    assert tb.config_from_json(cfg.to_json()) == cfg
    assert tb.config_from_dict({"method": "prune", "keep": 0.5}) == tb.Prune(keep=0.5)
    for kwargs, message in [
        ({"keep": 0.0}, "keep is the fraction"),
        ({"keep": 1.5}, "keep is the fraction"),
        ({"layers": (1, -2)}, "layers must be block indices"),
        ({"layers": (1, 1)}, "must not repeat"),
        ({"fuse": 1}, "fuse must be True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            tb.Prune(**kwargs)
    with pytest.raises(ValueError, match=r"layers \[6, 9\] do not exist in a model with 4 blocks"):
        tb.apply(make_tiny("vit"), tb.Prune())
    assert tb.Prune(keep=1.0).is_identity and not tb.Prune().is_identity


@pytest.mark.slow
def test_bench_and_eval_reach_prune(capsys) -> None:
    from tokenbudget.cli import main
    from tokenbudget.evaluate.budgets import method_config

    assert method_config("prune", 0.5) == tb.Prune(keep=0.5)
    code = main(
        ["bench", "--model", "vit_tiny_patch16_224", "--methods", "prune", "--keep", "0.5", "--layers", "2,5",
         "--batch-size", "1", "--samples", "1", "--warmup", "1", "--no-memory", "--no-ceiling", "--json"]
    )  # fmt: skip
    assert code == 0
    import json

    row = json.loads(capsys.readouterr().out)[0]
    # 196 patches -> 98 (+1 fused) at block 2 -> ceil(0.5 * 99) = 50 (+1) at block 5
    assert row["tokens_per_layer"] == [197] * 2 + [100] * 3 + [52] * 7
    assert row["flops_ratio"] < 1


def test_cli_refuses_r_for_prune(capsys) -> None:
    from tokenbudget.cli import main

    assert main(["bench", "--methods", "prune", "--r", "8", "--samples", "1"]) == 2
    assert "takes --keep" in capsys.readouterr().err


@pytest.mark.slow
def test_prune_and_dynamicvit_on_embedded_dinov2(tmp_path) -> None:
    """Both pruning methods end to end on the real DINOv2 ViT-S/14 weights (offline)."""
    pytest.importorskip("onnx", reason="the embedded model needs: pip install 'tokenbudget[demo]'")
    from tokenbudget.data import sample_images
    from tokenbudget.learned.train import train_predictors

    model = tb.models.dinov2_small(img_size=224, cache_dir=tmp_path / "cache")
    images = sample_images(224, ("astronaut", "coffee"))
    with torch.inference_mode():
        full = model.forward_features(images)[:, 0]
        tb.apply(model, tb.Prune(keep=0.7))
        pruned = model.forward_features(images)[:, 0]
    assert tb.last_state(model).tokens_per_layer == [257] * 3 + [182] * 3 + [129] * 3 + [92] * 3
    cos = torch.nn.functional.cosine_similarity
    assert cos(pruned, full).min() > 0.8
    # class attention chooses better than chance: random drop at the same per-layer counts
    with torch.inference_mode():
        tb.apply(model, tb.Prune(keep=0.7, fuse=False))
        attentive = model.forward_features(images)[:, 0]
        counts = tb.last_state(model).merged_per_layer
        tb.apply(model, tb.RandomDrop(r=counts))
        random = model.forward_features(images)[:, 0]
    assert tb.last_state(model).tokens_per_layer[-1] == 90
    assert bool((cos(attentive, full) > cos(random, full)).all())
    tb.remove(model)
    predictors, report = train_predictors(model, images, steps=2, batch_size=2)
    from tokenbudget.learned import save_predictors

    save_predictors(predictors, tmp_path / "pred")
    tb.apply(model, tb.DynamicViT(keep=0.7, predictor=str(tmp_path / "pred")))
    with torch.inference_mode():
        out = model.forward_features(images)
    assert out.shape == (2, 1 + 89, 384)  # no fused token: 256 -> 180 -> 126 -> 89 patches
    assert torch.isfinite(out).all() and report.steps == 2


def test_other_adapters_refuse_pruning_clearly() -> None:
    pytest.importorskip("transformers")
    from hf_models import make_hf

    model = make_hf("vit")
    with pytest.raises(ValueError, match="timm models only"):
        tb.apply(model, tb.Prune(keep=0.5, layers=(1,)))
    assert not tb.is_patched(model)
