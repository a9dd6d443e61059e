"""Patched models outside the happy path: pickling and torch.save, wrappers (DataParallel, DDP,
torch.compile), and tb.apply / tb.remove while other threads run forwards."""

from __future__ import annotations

import copy
import io
import pickle
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import tokenbudget as tb
from conftest import make_tiny


def _round_trip(model: nn.Module, how: str) -> nn.Module:
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _check_loaded(model: nn.Module, loaded: nn.Module, run, x: torch.Tensor) -> None:
    """``loaded`` is patched with ``model``'s config, gives its outputs and state, and removes cleanly."""
    expected = run(model, x)
    keys = list(model.state_dict())
    assert tb.is_patched(loaded)
    assert tb.patched_config(loaded) == tb.patched_config(model)
    assert list(loaded.state_dict()) == keys
    with pytest.raises(ValueError, match="not run a forward"):
        tb.last_state(loaded)  # the loaded model starts without the saved model's forwards
    torch.testing.assert_close(run(loaded, x), expected, rtol=0, atol=0)
    assert tb.last_state(loaded).tokens_per_layer == tb.last_state(model).tokens_per_layer
    tb.remove(loaded)
    tb.remove(model)
    assert _hooks(loaded) == _hooks(model) == 0
    assert not any("forward" in m.__dict__ for m in loaded.modules())
    torch.testing.assert_close(run(loaded, x), run(model, x), rtol=0, atol=0)


def _timm_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize(
    "config",
    [
        tb.ToMe(r=8, trace_source=True),
        tb.Prune(keep=0.5, layers=(1, 2)),
        tb.ToMeGuard(r=12),
        tb.RandomDrop(r=4),
    ],
    ids=["tome", "prune", "guard", "random"],
)
def test_patched_timm_model_saves_and_loads(how: str, config: tb.ReductionConfig, images) -> None:
    model = tb.apply(make_tiny("avgpool_cls"), config)
    _check_loaded(model, _round_trip(model, how), _timm_run, images)


def test_loaded_model_forwards_in_threads_and_copies(images) -> None:
    """The loaded context is fresh and per-thread like any other (no shared slot came along)."""
    from conftest import assert_concurrent_forwards_match

    model = tb.apply(make_tiny("dinov2_registers"), tb.ToMe(r=8))
    with torch.no_grad():
        model(images)  # a finished forward on the original does not travel
    loaded = _round_trip(model, "torch.save")
    assert_concurrent_forwards_match(loaded, lambda x: _timm_run(loaded, x))
    twice = copy.deepcopy(pickle.loads(pickle.dumps(loaded)))
    torch.testing.assert_close(_timm_run(twice, images), _timm_run(model, images), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "dinov2_registers", "siglip_vision"])
def test_patched_hf_model_saves_and_loads(family: str, images) -> None:
    pytest.importorskip("transformers")
    from hf_models import make_hf, output

    model = tb.apply(make_hf(family), tb.ToMe(r=6))
    _check_loaded(model, _round_trip(model, "torch.save"), lambda m, x: output(m, family, x), images)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_patched_openclip_model_saves_and_loads(pool_type: str, images) -> None:
    pytest.importorskip("open_clip")
    from openclip_models import make_openclip

    model = tb.apply(make_openclip(pool_type), tb.ToMe(r=6))

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m.encode_image(x)

    _check_loaded(model, _round_trip(model, "torch.save"), run, images)


def test_adaptive_patch_saves_and_loads() -> None:
    model = make_tiny("vit")
    config = tb.AdaptivePatch(thresholds=(0.3, 0.7))
    tb.apply(model, config)
    x = torch.cat(
        [torch.zeros(1, 3, 32, 32), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    )
    expected = _timm_run(model, x)
    sizes = tb.last_state(model).patch_sizes
    assert len(set(sizes.tolist())) > 1  # the batch really runs at several patch sizes
    loaded = _round_trip(model, "torch.save")
    assert tb.patched_config(loaded) == config
    torch.testing.assert_close(_timm_run(loaded, x), expected, rtol=0, atol=0)
    assert torch.equal(tb.last_state(loaded).patch_sizes, sizes)
    tb.remove(loaded)
    assert not any(
        name in m.__dict__ for m in loaded.modules() for name in ("forward", "forward_features", "_pos_embed")
    )


# -- wrappers -------------------------------------------------------------------------------------


def test_data_parallel_and_ddp_style_wrappers_patch_the_inner_model(images) -> None:
    inner = make_tiny("vit")
    plain = _timm_run(inner, images)
    wrapped = nn.DataParallel(inner)  # no GPU: DataParallel calls the module itself
    assert tb.apply(wrapped, tb.ToMe(r=8)) is wrapped
    assert tb.is_patched(wrapped) and tb.is_patched(inner)
    reduced = _timm_run(wrapped, images)
    assert tb.last_state(wrapped).tokens_per_layer == [57, 49, 41, 33]
    assert tb.patched_config(wrapped) == tb.ToMe(r=8)
    assert not torch.allclose(reduced, plain)
    tb.remove(wrapped)
    assert not tb.is_patched(inner)
    torch.testing.assert_close(_timm_run(wrapped, images), plain, rtol=0, atol=0)


def test_data_parallel_over_several_devices_is_refused() -> None:
    wrapped = nn.DataParallel(make_tiny("vit"))
    wrapped.device_ids = [0, 1]  # what DataParallel keeps for two GPUs; it copies modules per forward
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        tb.apply(wrapped, tb.ToMe(r=8))
    assert not tb.is_patched(wrapped.module)


def test_compiled_module_wrapper_patches_the_inner_model(images) -> None:
    inner = make_tiny("vit")
    compiled = torch.compile(inner)  # not run: compiling is the slow part, the wrapper is what matters
    tb.apply(compiled, tb.ToMe(r=8))
    assert tb.is_patched(compiled) and tb.is_patched(inner)
    _timm_run(inner, images)
    assert tb.last_state(compiled).tokens_per_layer == [57, 49, 41, 33]
    tb.remove(compiled)
    assert not tb.is_patched(inner)


@pytest.mark.slow
def test_compiled_model_picks_up_apply_and_remove(images) -> None:
    """Patching through (or under) a compiled wrapper that already ran: it recompiles."""
    inner = make_tiny("vit")
    torch._dynamo.reset()
    compiled = torch.compile(inner, dynamic=False)
    plain = _timm_run(compiled, images)
    tb.apply(compiled, tb.ToMe(r=8))
    reduced = _timm_run(compiled, images)
    torch.testing.assert_close(reduced, _timm_run(inner, images), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reduced, plain, atol=1e-3)
    tb.remove(compiled)
    torch.testing.assert_close(_timm_run(compiled, images), plain, atol=1e-4, rtol=1e-4)


def test_unsupported_model_holding_a_supported_one_names_the_path() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = make_tiny("vit")
            self.head = nn.Linear(10, 2)

    with pytest.raises(ValueError, match=r"tb\.apply\(model\.encoder, config\)"):
        tb.apply(Classifier(), tb.ToMe(r=8))


# -- apply / remove while other threads run forwards ---------------------------------------------


class _SlowBlock:
    """Forward pre-hook on one block that holds the forward there until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if threading.current_thread().name == "runner":
            self.reached.set()
            assert self.release.wait(20)


def _run_in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as err:  # noqa: BLE001 - the test reads it
            box["error"] = err

    thread = threading.Thread(target=target, name="runner")
    thread.start()
    return thread, box


@pytest.mark.parametrize("entry", ["call", "forward_features"])
@pytest.mark.parametrize("change", ["remove", "reapply"])
def test_apply_and_remove_wait_for_a_forward_in_another_thread(entry: str, change: str, images) -> None:
    """A forward that is half-way through when another thread changes the patch finishes under the
    config it started with; the change happens after it."""
    model = tb.apply(make_tiny("avgpool_cls"), tb.ToMe(r=8))
    features = entry == "forward_features"

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(images) if features else model(images)

    expected = run()
    slow = _SlowBlock()
    handle = model.blocks[2].register_forward_pre_hook(slow)
    thread, box = _run_in_thread(run)
    assert slow.reached.wait(20)
    changer, changed = _run_in_thread_named(
        lambda: tb.remove(model) if change == "remove" else tb.apply(model, tb.ToMe(r=2))
    )
    time.sleep(0.2)
    assert changer.is_alive()  # waiting for the forward
    assert tb.patched_config(model) == tb.ToMe(r=8)
    slow.release.set()
    thread.join(20)
    changer.join(20)
    handle.remove()
    assert "error" not in box and "error" not in changed, (box, changed)
    torch.testing.assert_close(box["out"], expected, rtol=0, atol=0)
    assert tb.is_patched(model) == (change == "reapply")


def _run_in_thread_named(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as err:  # noqa: BLE001 - the test reads it
            box["error"] = err

    thread = threading.Thread(target=target, name="changer")
    thread.start()
    return thread, box


def test_remove_waits_for_openclip_encode_image_through_its_pooling(images) -> None:
    """encode_image calls model.visual (not the model): its blocks and its size-weighted pooling
    finish under the patch they started with."""
    pytest.importorskip("open_clip")
    from openclip_models import make_openclip

    model = tb.apply(make_openclip("avg"), tb.ToMe(r=6))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(images)

    expected = run()
    slow = _SlowBlock()
    handle = model.visual.transformer.resblocks[3].register_forward_hook(
        lambda module, args, out: slow(module, args)
    )  # held after the last block, before the pooling
    thread, box = _run_in_thread(run)
    assert slow.reached.wait(20)
    changer, changed = _run_in_thread_named(lambda: tb.remove(model))
    time.sleep(0.2)
    assert changer.is_alive()
    slow.release.set()
    thread.join(20)
    changer.join(20)
    handle.remove()
    assert "error" not in box and "error" not in changed, (box, changed)
    torch.testing.assert_close(box["out"], expected, rtol=0, atol=0)
    assert not tb.is_patched(model)


def test_remove_gives_up_after_the_timeout_and_leaves_the_patch(images) -> None:
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=8))
    slow = _SlowBlock()
    handle = model.blocks[1].register_forward_pre_hook(slow)
    thread, box = _run_in_thread(lambda: _timm_run(model, images))
    assert slow.reached.wait(20)
    with pytest.raises(RuntimeError, match="still running in thread"):
        tb.remove(model, timeout=0.2)
    assert tb.is_patched(model)
    slow.release.set()
    thread.join(20)
    handle.remove()
    assert "error" not in box
    tb.remove(model)  # idle now: no wait
    assert not tb.is_patched(model)


def test_forward_that_began_before_apply_runs_unreduced(images) -> None:
    """A forward already inside an unpatched model when another thread patches it cannot have its
    first blocks reduced: it finishes as the unpatched model would (and says so)."""
    model = make_tiny("vit")
    plain = _timm_run(model, images)
    slow = _SlowBlock()
    handle = model.blocks[1].register_forward_pre_hook(slow)

    def run() -> torch.Tensor:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _timm_run(model, images)
        assert any("runs unreduced" in str(w.message) for w in caught)
        return out

    thread, box = _run_in_thread(run)
    assert slow.reached.wait(20)
    tb.apply(model, tb.ToMe(r=8))
    slow.release.set()
    thread.join(20)
    handle.remove()
    assert "error" not in box, box
    torch.testing.assert_close(box["out"], plain, rtol=0, atol=0)
    assert not torch.allclose(_timm_run(model, images), plain)  # later forwards are reduced


def test_many_threads_forwarding_while_the_config_changes(images) -> None:
    """Every output equals the output of one of the configs (never a mix), with no error."""
    model = make_tiny("vit")
    configs = [tb.ToMe(r=8), tb.ToMe(r=2), None]
    expected = []
    for config in configs:
        tb.remove(model) if config is None else tb.apply(model, config)
        expected.append(_timm_run(model, images))
    tb.apply(model, configs[0])
    outputs: list[torch.Tensor] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def forwards() -> None:
        try:
            while not stop.is_set():
                outputs.append(_timm_run(model, images))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=forwards) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(12):
        config = configs[i % 3]
        tb.remove(model) if config is None else tb.apply(model, config)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert outputs
    for out in outputs:
        assert any(torch.equal(out, e) for e in expected)


def test_apply_from_inside_a_forward_is_refused(images) -> None:
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=8))
    seen: list[BaseException] = []

    def hook(module: nn.Module, args: tuple) -> None:
        try:
            tb.remove(model)
        except RuntimeError as err:
            seen.append(err)

    handle = model.blocks[1].register_forward_pre_hook(hook)
    _timm_run(model, images)
    handle.remove()
    assert seen and "inside a forward" in str(seen[0])
    assert tb.is_patched(model)
