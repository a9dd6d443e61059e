"""Learned VLM compressors: the Perceiver-style resampler and the token autoencoder (issue 6, part B)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import tokenbudget as tb
from tokenbudget.cli import main
from tokenbudget.evaluate.compressors import (
    assignment_reconstruction,
    evaluate_compressors,
    random_select,
    unexplained_variance,
)
from tokenbudget.vlm import (
    CompressedTokens,
    Resampler,
    TokenAutoencoder,
    load_compressor,
    pool,
    save_compressor,
    train_compressor,
)
from tokenbudget.vlm.compressor_io import build_compressor
from tokenbudget.vlm.train import compressor_losses

KINDS = {"resampler": Resampler, "autoencoder": TokenAutoencoder}
DIM, GRID, K_MAX = 16, (4, 4), 8


def make(kind: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return KINDS[kind](DIM, GRID, K_MAX, width=16, heads=2, **kwargs).eval()


def structured_tokens(count: int, seed: int = 0) -> torch.Tensor:
    """[count, 1 + 16, DIM] tokens with structure to learn: a per-image code times a per-position one."""
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(count, 1, 4, generator=g)
    position = torch.randn(1, 17, 4, generator=g)
    mix = torch.randn(4, DIM, generator=g)
    return (code * position) @ mix + 0.05 * torch.randn(count, 17, DIM, generator=g)


# These models are tiny: one thread avoids the thread hand-off cost that dominates on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tokens() -> torch.Tensor:
    return structured_tokens(3)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("k", [1, 5, K_MAX])
def test_contract_shapes_prefix_and_assignment(kind, k, tokens):
    out = make(kind).compress(tokens, k, num_prefix=1)
    assert isinstance(out, CompressedTokens) and out.num_prefix == 1
    assert out.tokens.shape == (3, 1 + k, DIM) and out.budgets == [k] * 3
    assert torch.equal(out.tokens[:, 0], tokens[:, 0])  # the class token passes through
    assert out.assignment.shape == (3, 17) and out.assignment.dtype == torch.int64
    assert (out.assignment[:, 0] == 0).all()
    patch = out.assignment[:, 1:]
    assert ((patch >= 1) & (patch < 1 + k)).all()  # every patch token goes to an existing output
    assert all(int(c.sum()) == 17 for c in out.counts())
    assert out.scores.shape == (3, 17) and torch.isfinite(out.scores).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_assignment_is_the_argmax_of_last_layer_attention(kind, tokens):
    model = make(kind)
    _, weights = model.encode(tokens[:, 1:], 5)  # [B, 5, P]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    out = model.compress(tokens, 5, num_prefix=1)
    assert torch.equal(out.assignment[:, 1:], weights.argmax(1) + 1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_nested_budgets_first_outputs_are_the_smaller_budget(kind, tokens):
    model = make(kind)
    full = model.compress(tokens, K_MAX, num_prefix=1)
    for small in (1, 3, 6):
        out = model.compress(tokens, small, num_prefix=1)
        torch.testing.assert_close(out.tokens, full.tokens[:, : 1 + small], rtol=1e-5, atol=1e-5)
    # One pass for several budgets (what the benchmark uses) gives each budget's own result.
    for small, out in model.compress_nested(tokens, [2, 5, K_MAX], num_prefix=1).items():
        alone = model.compress(tokens, small, num_prefix=1)
        torch.testing.assert_close(out.tokens, alone.tokens, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.assignment, alone.assignment)
    # Changing a later query leaves the earlier outputs alone (queries attend only to earlier ones).
    with torch.no_grad():
        model.queries[5:] += 1.0
    moved = model.compress(tokens, K_MAX, num_prefix=1)
    torch.testing.assert_close(moved.tokens[:, :6], full.tokens[:, :6], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved.tokens[:, 6:], full.tokens[:, 6:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_per_image_budgets_give_each_image_its_own_budget(kind, tokens):
    model = make(kind)
    out = model.compress(tokens, [2, 8, 5], num_prefix=1)
    assert isinstance(out.tokens, list) and out.budgets == [2, 8, 5]
    for b, k in enumerate([2, 8, 5]):
        alone = model.compress(tokens[b : b + 1], k, num_prefix=1)
        torch.testing.assert_close(out.tokens[b], alone.tokens[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.assignment[b], alone.assignment[0])
        assert int(out.assignment[b].max()) < 1 + k


def test_no_prefix_and_reconstruct_shape(tokens):
    model = make("autoencoder")
    out = model.compress(tokens[:, 1:], 4)
    assert out.tokens.shape == (3, 4, DIM) and out.assignment.max() < 4
    rebuilt = model.reconstruct(tokens, [4, 2, 8], num_prefix=1)
    assert rebuilt.shape == (3, 16, DIM)
    alone = model.reconstruct(tokens[1:2], 2, num_prefix=1)
    torch.testing.assert_close(rebuilt[1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.decode_tokens(model.compress(tokens[1:2], 2, num_prefix=1).tokens[:, 1:]), alone
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_training_reduces_the_loss(kind):
    data = structured_tokens(64)
    model, report = train_compressor(
        kind, data, k_max=K_MAX, width=16, heads=2, steps=60, batch_size=16, lr=3e-3, seed=0
    )
    assert report.steps == 60 and model.kind == kind and not model.training
    patches = data[:, 1:]
    torch.manual_seed(0)
    untrained = build_compressor(model.config())
    untrained.set_token_statistics(patches)
    with torch.no_grad():
        before = compressor_losses(untrained, patches, [K_MAX, 2], feature_weight=1.0, recon_weight=1.0)
        after = compressor_losses(model, patches, [K_MAX, 2], feature_weight=1.0, recon_weight=1.0)
    assert after[0] < 0.85 * before[0]
    assert after[2] < before[2]  # reconstruction improves for both kinds
    if kind == "resampler":
        assert after[1] < before[1]  # and the pooled feature for the resampler
    else:
        assert float(after[1]) == 0.0 or float(after[0]) == pytest.approx(float(after[2]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_is_exact(kind, tokens, tmp_path):
    model = make(kind)
    model.set_token_statistics(tokens[:, 1:] * 2 + 1)
    weights, config = save_compressor(model, tmp_path / "c")
    assert weights.name == "c.safetensors" and json.loads(config.read_text())["kind"] == kind
    for path in (tmp_path / "c", weights, config):
        loaded = load_compressor(path)
        assert type(loaded) is type(model) and loaded.config() == model.config()
        a, b = model.compress(tokens, 5, num_prefix=1), loaded.compress(tokens, 5, num_prefix=1)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.assignment, b.assignment)


def test_load_refuses_other_kind_format_and_mismatched_weights(tokens, tmp_path):
    save_compressor(make("resampler"), tmp_path / "r")
    with pytest.raises(ValueError, match="holds a resampler, not a autoencoder"):
        load_compressor(tmp_path / "r", kind="autoencoder")
    with pytest.raises(FileNotFoundError, match="train-compressor"):
        load_compressor(tmp_path / "missing")
    config = tmp_path / "r.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "k_max": K_MAX + 1}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_compressor(tmp_path / "r")
    config.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a tokenbudget VLM compressor"):
        load_compressor(tmp_path / "r")


@pytest.mark.parametrize("kind", list(KINDS))
def test_refuses_tokens_it_was_not_trained_for_and_bad_budgets(kind, tokens):
    model = make(kind)
    with pytest.raises(ValueError, match="trained for 16-d tokens, got 8-d"):
        model.compress(torch.randn(2, 17, 8), 4, num_prefix=1)
    with pytest.raises(ValueError, match="trained for 16 patch tokens"):
        model.compress(torch.randn(2, 1 + 25, DIM), 4, num_prefix=1)
    with pytest.raises(ValueError, match="trained for grid"):
        model.compress(tokens, 4, num_prefix=1, grid=(2, 8))
    with pytest.raises(ValueError, match="learned queries"):
        model.compress(tokens, K_MAX + 1, num_prefix=1)
    with pytest.raises(ValueError, match="outside"):
        model.compress(tokens, 0, num_prefix=1)
    with pytest.raises(ValueError, match="outside"):
        model.compress(tokens, [2, 17, 3], num_prefix=1)
    with pytest.raises(ValueError, match="budgets for a batch"):
        model.compress(tokens, [2, 3], num_prefix=1)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        model.compress(tokens[0], 4, num_prefix=1)
    with pytest.raises(ValueError, match="num_prefix"):
        model.compress(tokens, 4, num_prefix=17)


def test_bad_construction_and_training_arguments():
    with pytest.raises(ValueError, match="k_max"):
        Resampler(DIM, GRID, 17)
    with pytest.raises(ValueError, match="divisible"):
        Resampler(DIM, GRID, 4, width=16, heads=3)
    with pytest.raises(ValueError, match="kind"):
        train_compressor("perceiver", structured_tokens(4))
    with pytest.raises(ValueError, match="steps"):
        train_compressor("resampler", structured_tokens(4), k_max=4, width=16, steps=0)


def test_random_select_and_assignment_reconstruction():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 16, 4)
    out = random_select(x, 5, num_prefix=1, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 6, 4) and ((out.assignment[:, 1:] >= 0).sum(1) == 5).all()
    for b in range(2):  # each kept output is the input token assigned to it
        kept = (out.assignment[b] >= 1).nonzero().flatten()
        assert torch.equal(out.tokens[b, out.assignment[b, kept]], x[b, kept])
    # Pooling: every patch is rebuilt as its cell's mean; a k = N "compression" rebuilds exactly.
    pooled = pool(x, 4, num_prefix=1)
    rebuilt = assignment_reconstruction(pooled, (4, 4))
    assert torch.equal(rebuilt[:, 0], pooled.tokens[:, 1]) and torch.equal(rebuilt[:, 5], pooled.tokens[:, 1])
    identity = pool(x, 16, num_prefix=1)
    assert unexplained_variance(assignment_reconstruction(identity, (4, 4)), x[:, 1:]) == 0.0
    assert unexplained_variance(x[:, 1:].mean((0, 1)).expand(2, 16, 4), x[:, 1:]) == pytest.approx(1.0)


def test_evaluate_compressors_rows_and_pooling_keeps_the_mean():
    train, test = structured_tokens(40, seed=1), structured_tokens(20, seed=2)
    labels_train, labels_test = torch.arange(40) % 4, torch.arange(20) % 4
    rows = evaluate_compressors(
        train, labels_train, test, labels_test, [4, 8], compressors={"resampler": make("resampler")}, knn_k=3
    )
    assert [(r.method, r.k) for r in rows] == [("full", 16)] + [
        (m, k) for m in ("avg", "max", "random", "resampler") for k in (4, 8)
    ]
    avg = [r for r in rows if r.method == "avg"]
    assert all(r.fidelity == pytest.approx(1.0, abs=1e-5) for r in avg)  # equal cells keep the mean
    assert avg[0].recon_assign > avg[1].recon_assign > 0  # finer cells rebuild better
    learned = rows[-1]
    assert learned.recon_decoder == learned.recon_decoder and all(
        r.recon_decoder != r.recon_decoder for r in rows[1:-2]
    )


def test_cli_train_and_eval_on_tiny_token_files(tmp_path, capsys):
    torch.save(structured_tokens(24), tmp_path / "train.pt")
    stem = {}
    for kind in KINDS:
        stem[kind] = str(tmp_path / kind)
        code = main(
            ["train-compressor", "--kind", kind, "--token-file", str(tmp_path / "train.pt"), "--k-max", "8"]
            + ["--width", "16", "--heads", "2", "--steps", "3", "--batch-size", "8", "--quiet"]
            + ["--out", stem[kind]]
        )
        assert code == 0 and (tmp_path / f"{kind}.safetensors").exists()
        assert load_compressor(stem[kind]).kind == kind
    assert "tb.vlm.load_compressor" in capsys.readouterr().out
    data = {
        "train_tokens": structured_tokens(24, seed=1),
        "train_labels": torch.arange(24) % 3,
        "test_tokens": structured_tokens(9, seed=2),
        "test_labels": torch.arange(9) % 3,
    }
    torch.save(data, tmp_path / "eval.pt")
    out_csv = tmp_path / "rows.csv"
    code = main(
        ["vlm-compress-eval", "--token-file", str(tmp_path / "eval.pt"), "--tokens", "2,8", "--knn", "3"]
        + ["--resampler", stem["resampler"], "--autoencoder", stem["autoencoder"], "--quiet"]
        + ["--csv", str(out_csv), "--json"]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 + 5 * 2 and {r["method"] for r in rows} >= {"resampler", "autoencoder", "random"}
    assert len(list(csv.DictReader(out_csv.open()))) == len(rows)
    # Wrong kind, bad baseline name, and a budget above k_max: a clear error and exit code 2.
    assert (
        main(
            [
                "vlm-compress-eval",
                "--token-file",
                str(tmp_path / "eval.pt"),
                "--autoencoder",
                stem["resampler"],
            ]
        )
        == 2
    )
    assert main(["vlm-compress-eval", "--token-file", str(tmp_path / "eval.pt"), "--methods", "median"]) == 2
    assert (
        main(
            [
                "vlm-compress-eval",
                "--token-file",
                str(tmp_path / "eval.pt"),
                "--tokens",
                "12",
                "--resampler",
                stem["resampler"],
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not a autoencoder" in err and "median" in err and "learned queries" in err


def test_public_api():
    assert tb.vlm.Resampler is Resampler and tb.vlm.load_compressor is load_compressor


@pytest.mark.slow
def test_real_dinov2_tokens_end_to_end(tmp_path):
    """A small resampler trained on real DINOv2-S tokens keeps the pooled feature better than it did
    untrained, saves and loads, and compresses a fresh forward of the embedded model."""
    from tokenbudget.data.token_cache import dinov2_fashion_mnist_tokens
    from tokenbudget.evaluate.scene_metrics import pooled_feature

    tokens, _ = dinov2_fashion_mnist_tokens("test", 50)  # [500, 257, 384], cached
    train, held_out = tokens[:400], tokens[400:]
    model, report = train_compressor(
        "resampler", train, k_max=64, width=64, heads=4, steps=40, batch_size=16, lr=3e-3, feature_weight=5.0
    )
    torch.manual_seed(0)
    untrained = build_compressor(model.config())
    untrained.set_token_statistics(train[:, 1:])
    full = pooled_feature(held_out[:, 1:])

    def fidelity(compressor) -> float:
        with torch.no_grad():
            out = compressor.compress(held_out, 16, num_prefix=1)
        return float((pooled_feature(out.tokens[:, 1:]) * full).sum(-1).mean())

    assert fidelity(model) > fidelity(untrained)
    save_compressor(model, tmp_path / "rs")
    loaded = load_compressor(tmp_path / "rs", kind="resampler")
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(image, size=224, mode="bilinear", antialias=True)
    backbone = tb.models.dinov2_small().eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        fresh = backbone.forward_features((image - mean[:, None, None]) / std[:, None, None])  # [1, 257, 384]
        out = loaded.compress(fresh, [16], num_prefix=1)
    assert out.tokens.shape == (1, 17, 384) and out.assignment.shape == (1, 257)
    assert torch.isfinite(out.tokens).all() and (out.assignment[0, 1:] >= 1).all()
