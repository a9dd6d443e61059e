"""One contract over the three frameworks (timm, Hugging Face, OpenCLIP): the adapter protocol, and
bench, eval, plan, visualize and the FLOPs bisection end to end, from Python and from the command
line, on tiny models of each."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny, write_two_class_folder
from hf_models import make_hf
from openclip_models import make_openclip
from tokenbudget.adapters import find_adapter
from tokenbudget.bench import bench
from tokenbudget.data.eval_sets import load_eval_data
from tokenbudget.evaluate import evaluate, keep_for_flops_speedup
from tokenbudget.evaluate.plan import plan
from tokenbudget.flops import BlockDims, ideal_speedup
from tokenbudget.models import load_model, register_model
from tokenbudget.viz import render_merges

FRAMEWORKS: dict[str, Callable[[], torch.nn.Module]] = {
    "timm": lambda: make_tiny("dinov2_layerscale"),
    "hf": lambda: make_hf("dinov2"),
    "openclip": lambda: make_openclip("tok", 0.5),
}

for _name, _make in FRAMEWORKS.items():  # --model tiny-timm / tiny-hf / tiny-openclip on the CLI
    register_model(f"tiny-{_name}", lambda pretrained=False, img_size=None, make=_make: make())


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(framework: str) -> torch.nn.Module:
    return FRAMEWORKS[framework]()


def test_adapter_states_the_models_structure(model: torch.nn.Module, framework: str) -> None:
    adapter = find_adapter(model)
    assert adapter.name == framework
    # Every tiny model: 4 blocks of width 48, 3 heads, 32 px input in 4 px patches, one class token.
    assert (adapter.num_layers, adapter.embed_dim, adapter.num_heads) == (4, 48, 3)
    assert adapter.image_size == (32, 32) and adapter.grid == (8, 8) and adapter.patch_size == (4, 4)
    assert adapter.num_prefix == 1 and adapter.has_class_token
    assert adapter.default_num_tokens == 65
    dims = adapter.block_dims()
    assert len(dims) == 4 and all(d.dim == 48 and d.attn_dim == 48 for d in dims)
    assert all(d.mlp_hidden in (96, 192) for d in dims)  # mlp ratio 2 (HF DINOv2) or 4
    assert adapter.embedding_flops() == 2 * 64 * 48 * 3 * 4 * 4
    mean, std = adapter.normalization()
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)


def test_block_by_block_equals_the_feature_forward(model: torch.nn.Module, images: torch.Tensor) -> None:
    """embed -> the blocks -> final norm is exactly the model's own feature forward, and embed gives
    exactly what the first block receives."""
    adapter = find_adapter(model)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"] = args[0] if args else next(iter(kwargs.values()))

    handle = adapter.blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        features = adapter.features(images)
        handle.remove()
        x = adapter.embed(images)
        assert torch.equal(x, seen["x"])
        for block in adapter.blocks:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
        assert torch.allclose(adapter.final_norm(x), features, atol=1e-5)
    assert features.shape == (3, 65, 48)
    assert adapter.patch_embeddings(images).shape == (3, 64, 48)


def test_zero_budget_apply_remove_and_state_dict(model: torch.nn.Module, images: torch.Tensor) -> None:
    adapter = find_adapter(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = adapter.features(images)
        tb.apply(model, tb.ToMe(r=0))
        assert torch.equal(adapter.features(images), before)
        tb.apply(model, tb.ToMe(r=4))
        reduced = adapter.features(images)
        assert reduced.shape[1] == 65 - 4 * 4
        assert list(model.state_dict()) == keys
        tb.remove(model)
        assert torch.equal(adapter.features(images), before)


def test_bench_takes_the_model_object(model: torch.nn.Module) -> None:
    rows = bench(model, [tb.ToMe(r=4)], batch_sizes=(2,), samples=2, warmup=1, measure_memory=False)
    (row,) = rows
    assert row.input_tokens == 65 and row.final_tokens == 65 - 16
    assert row.ideal_speedup > 1.0 and row.speedup > 0
    assert not tb.is_patched(model)  # bench patches copies


def test_flops_bisection_reaches_the_speedup(model: torch.nn.Module) -> None:
    keep = keep_for_flops_speedup(model, 1.5)
    assert 0.0 < keep < 1.0
    adapter = find_adapter(model)
    tb.apply(model, tb.ToMe(keep=keep))
    with torch.no_grad():
        adapter.features(torch.randn(1, 3, 32, 32))
    state = tb.last_state(model)
    tb.remove(model)
    achieved = ideal_speedup(state.input_tokens, state.tokens_per_layer, adapter.block_dims())
    assert achieved == pytest.approx(1.5, abs=0.05)


def _tiny_data(tmp_path, model: torch.nn.Module):  # noqa: ANN202 - EvalData
    folder = write_two_class_folder(tmp_path / "data", splits=("train", "test"), spread=30)
    mean, std = find_adapter(model).normalization()
    return load_eval_data(str(folder), 32, mean, std)


def test_evaluate_and_plan_take_the_model_object(model: torch.nn.Module, tmp_path) -> None:
    data = _tiny_data(tmp_path, model)
    rows = evaluate(
        model, data, ["tome", "random"], [1.0, 0.5], batch_size=4, speed_batch_size=2, speed_samples=1
    )
    assert [r.method for r in rows] == ["full", "tome", "random"]
    assert rows[1].final_tokens < rows[0].final_tokens and 0.0 < rows[1].flops_ratio < 1.0
    assert all(0.0 <= r.knn_acc <= 1.0 and -1.0 <= r.cosine <= 1.0 for r in rows)
    result = plan(model, data, target_flops=0.8, speed_batch_size=2, speed_samples=1, keeps=(0.9, 0.5))
    assert result.choice is not None and result.choice.flops_ratio <= 0.8


def test_visualize_draws_merge_groups(model: torch.nn.Module) -> None:
    from PIL import Image

    image = Image.fromarray((torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy())
    picture, summary = render_merges(model, image, tb.ToMe(r=4))
    assert summary["tokens_per_layer"][-1] == 65 - 16
    assert picture.shape[0] == 32 and picture.shape[1] >= 64  # original | merge groups, 32 px each


def test_registered_names_load_through_load_model(framework: str) -> None:
    model = load_model(f"tiny-{framework}")
    assert find_adapter(model).name == framework and not model.training


def test_cli_commands_run_on_every_framework(framework: str, tmp_path, capsys) -> None:
    from tokenbudget.cli import main

    name = f"tiny-{framework}"
    folder = write_two_class_folder(tmp_path / "data", splits=("train", "test"), spread=30)
    common = ["--model", name, "--threads", "1"]
    assert (
        main(["bench", *common, "--r", "4", "--batch-size", "2", "--samples", "2", "--no-memory", "--quiet"])
        == 0
    )
    assert "tome(r=4)" in capsys.readouterr().out
    assert main(["eval", *common, "--data", str(folder), "--methods", "tome", "--flops-speedup", "1.5",
                 "--speed-samples", "1", "--speed-batch-size", "2", "--json"]) == 0  # fmt: skip
    assert '"method": "tome"' in capsys.readouterr().out
    out = tmp_path / "plan.json"
    assert main(["plan", *common, "--data", str(folder), "--target-flops", "0.8", "--keep", "0.9,0.5",
                 "--speed-samples", "1", "--speed-batch-size", "2", "--out", str(out)]) == 0  # fmt: skip
    assert tb.config_from_json(out.read_text()).method == "tome"
    image = folder / "train" / "dark" / "0.png"
    picture = tmp_path / "merges.png"
    assert main(["visualize", str(image), *common[:2], "--r", "4", "-o", str(picture)]) == 0
    assert picture.stat().st_size > 0
    capsys.readouterr()


@pytest.mark.slow
def test_embedded_hf_model_from_the_cli(tmp_path, capsys) -> None:
    """``--model dinov2_small_hf``: the embedded DINOv2 in its Hugging Face form, end to end."""
    from tokenbudget.cli import main

    assert main(["bench", "--model", "dinov2_small_hf", "--r", "8", "--batch-size", "1", "--samples", "2",
                 "--no-memory", "--no-ceiling", "--quiet"]) == 0  # fmt: skip
    assert "257->161" in capsys.readouterr().out
    picture = tmp_path / "m.png"
    assert (
        main(["visualize", "skimage:astronaut", "--model", "dinov2_small_hf", "--r", "8", "-o", str(picture)])
        == 0
    )
    assert picture.stat().st_size > 0


def test_block_dims_are_what_the_flops_model_counts() -> None:
    """The FLOPs model of a ViT-S/16 block (C = 384, MLP 4C) from its adapter's widths."""
    import timm

    dims = find_adapter(timm.create_model("vit_small_patch16_224")).block_dims()
    assert dims[0] == BlockDims(384, 384, 1536)


def test_load_image_uses_the_models_own_preprocessing(model: torch.nn.Module, tmp_path) -> None:
    """``tb.data.load_image(path, model)``: a batch of one at the model's input size, normalised as
    the model expects; for timm exactly timm's own eval transform."""
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray((torch.rand(50, 70, 3) * 255).to(torch.uint8).numpy()).save(path)
    x = tb.data.load_image(path, model)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    adapter = find_adapter(model)
    if adapter.name == "timm":
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config(model=model)
        config["input_size"] = (3, 32, 32)
        assert torch.equal(x[0], create_transform(**config)(Image.open(path).convert("RGB")))
    mean = torch.tensor(adapter.normalization()[0])
    assert (
        x.mean() < 3
        and (x * torch.tensor(adapter.normalization()[1])[:, None, None] + mean[:, None, None]).min() > -0.01
    )
    with torch.no_grad():
        assert adapter.features(x).shape == (1, 65, 48)
