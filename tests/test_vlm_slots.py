"""Object slots, per-slot budgets (tb.vlm.allocate), within-slot merging and saccades (issue 7)."""

import json

import pytest
import torch

import tokenbudget as tb
from tokenbudget.cli import main
from tokenbudget.data.scenes import generate_scenes
from tokenbudget.ops.apportion import apportion
from tokenbudget.ops.kmeans import kmeans
from tokenbudget.vlm import (
    KnnClassifier,
    Saccade,
    SlotAttention,
    Slots,
    allocate,
    cluster_slots,
    compress_slots,
    learned_slots,
    load_slot_attention,
    merge_slots,
    save_slot_attention,
    train_slot_attention,
)
from tokenbudget.vlm.slots import adjusted_rand_index, best_match_iou


def planted_tokens(seed: int = 0, batch: int = 2, width: int = 24, noise: float = 0.05):
    """Tokens [B, 1 + 64, C] on an 8 x 8 grid: four 4 x 4 quadrants, each its own random direction plus
    noise (quadrant 0 of image 0 is made 'detailed': its tokens alternate between two directions)."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    truth = ((ys // 4) * 2 + xs // 4).flatten()  # [64] quadrant id
    bases = torch.randn(batch, 4, width, generator=gen)
    patches = bases.gather(1, truth[None, :, None].expand(batch, -1, width)).clone()
    detail = torch.randn(width, generator=gen)
    patches[0, (truth == 0) & (torch.arange(64) % 2 == 0)] += 2 * detail
    patches += noise * torch.randn(patches.shape, generator=gen)
    tokens = torch.cat([torch.randn(batch, 1, width, generator=gen), patches], dim=1)
    return tokens, truth.expand(batch, -1)


# --------------------------------------------------------------------------------------- allocate


@pytest.mark.parametrize("seed", range(20))
def test_allocate_sums_exactly_and_respects_bounds(seed):
    gen = torch.Generator().manual_seed(seed)
    slots = int(torch.randint(1, 9, (1,), generator=gen))
    complexity = torch.rand(3, slots, generator=gen) * (torch.rand(3, slots, generator=gen) > 0.2)
    lo = torch.randint(0, 3, (3, slots), generator=gen)
    hi = lo + torch.randint(0, 6, (3, slots), generator=gen)
    need = int(lo.sum(1).max())
    hi[:, 0] += (need - hi.sum(1)).clamp_min(0)  # every row can take at least the largest minimum
    total = int(torch.randint(need, int(hi.sum(1).min()) + 1, (1,), generator=gen))
    budgets = allocate(complexity, total, lo, hi)
    assert budgets.shape == complexity.shape and budgets.dtype == torch.int64
    assert (budgets.sum(1) == total).all()
    assert (budgets >= lo).all() and (budgets <= hi).all()


def test_allocate_is_proportional():
    assert allocate(torch.tensor([1.0, 2.0, 3.0, 4.0]), 10, min_per_slot=0).tolist() == [1, 2, 3, 4]
    assert allocate(torch.tensor([1.0, 2.0, 3.0, 4.0]), 20, min_per_slot=0).tolist() == [2, 4, 6, 8]
    # largest remainder: 10 * [0.5, 0.25, 0.25] -> exact; 7 * (...) = 3.5, 1.75, 1.75 -> 4, 2, 1 or 3, 2, 2
    out = allocate(torch.tensor([2.0, 1.0, 1.0]), 7, min_per_slot=0)
    assert out.sum() == 7 and out[0] >= 3 and (out[1:] >= 1).all()
    # a [B, S] batch: each row on its own
    batch = allocate(torch.tensor([[1.0, 1.0], [3.0, 1.0]]), 8)
    assert batch.tolist() == [[4, 4], [6, 2]]


def test_allocate_relevance_multiplies_complexity():
    complexity = torch.tensor([1.0, 1.0, 4.0])
    relevance = torch.tensor([4.0, 1.0, 1.0])
    assert allocate(complexity, 12, min_per_slot=0, relevance=relevance).tolist() == [6, 1, 5] or allocate(
        complexity, 12, min_per_slot=0, relevance=relevance
    ).tolist() == [5, 2, 5]
    # zero relevance leaves a slot at its minimum
    assert allocate(torch.tensor([5.0, 1.0]), 10, relevance=torch.tensor([0.0, 1.0])).tolist() == [1, 9]


def test_allocate_clamps_to_max_and_redistributes():
    out = allocate(
        torch.tensor([100.0, 1.0, 1.0]), 12, min_per_slot=1, max_per_slot=torch.tensor([4, 10, 10])
    )
    assert out.tolist() == [4, 4, 4]
    assert allocate(torch.zeros(3), 7).sum() == 7  # no information: a uniform split


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(complexity=torch.ones(4), total=3), "minimum"),
        (dict(complexity=torch.ones(2), total=9, max_per_slot=4), "maximums"),
        (dict(complexity=torch.tensor([1.0, -1.0]), total=4), ">= 0"),
        (dict(complexity=torch.tensor([1.0, float("nan")]), total=4), "finite"),
        (dict(complexity=torch.ones(2, 2, 2), total=4), r"\[S\] or \[B, S\]"),
        (dict(complexity=torch.ones(3), total=4, relevance=torch.ones(2)), "relevance"),
        (dict(complexity=torch.ones(2), total=4, min_per_slot=3, max_per_slot=2), "below"),
    ],
)
def test_allocate_refuses_impossible_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate(**kwargs)


def test_apportion_matches_largest_remainder_without_bounds():
    w = torch.tensor([[0.45, 0.35, 0.2]])
    out = apportion(w, torch.tensor([10]), torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), 10))
    assert out.tolist() == [[5, 3, 2]] or out.tolist() == [[4, 4, 2]]  # 4.5, 3.5, 2: the ties
    assert out.sum() == 10


# ------------------------------------------------------------------------------------------ slots


def test_kmeans_finds_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=gen) * 5
    truth = torch.arange(60) % 3
    x = centers[truth] + 0.1 * torch.randn(60, 5, generator=gen)
    assignment, _ = kmeans(x[None], 3, seed=1)
    assert adjusted_rand_index(truth, assignment[0]) == pytest.approx(1.0)
    again, _ = kmeans(x[None], 3, seed=1)
    assert torch.equal(assignment, again)  # seeded: deterministic


@pytest.mark.parametrize("num_slots", [4, None])
def test_cluster_slots_recover_planted_objects(num_slots):
    tokens, truth = planted_tokens()
    slots = cluster_slots(tokens, num_slots, num_prefix=1, max_slots=8, merge_threshold=0.8)
    assert isinstance(slots, Slots) and slots.masks.shape[0] == 2 and slots.masks.shape[2:] == (8, 8)
    assert torch.equal(slots.masks.flatten(2).float().sum(1), torch.ones(2, 64))  # a partition
    iou = best_match_iou(slots, truth, 4)
    if num_slots is None:  # over-segmented by the position term, then joined back by similarity
        assert int(slots.num_slots[1]) == 4  # (image 0's detailed quadrant may stay split in two)
    assert iou[1].min() > 0.95 and iou[0, 1:].min() > 0.95


def test_cluster_slots_bad_input():
    tokens, _ = planted_tokens()
    with pytest.raises(ValueError, match="slot count"):
        cluster_slots(tokens, 0, num_prefix=1)
    with pytest.raises(ValueError, match="grid"):
        cluster_slots(tokens[:, :-1], 4, num_prefix=1)


# ------------------------------------------------------------------------------- within-slot merge


def test_merge_slots_never_mixes_slots_and_hits_budgets():
    tokens, truth = planted_tokens()
    slots = Slots.from_assignment(truth.clone(), (8, 8))
    budgets = torch.tensor([[5, 1, 3, 16], [2, 2, 2, 2]])
    out = merge_slots(tokens, slots, budgets, num_prefix=1)
    assert out.budgets == [25, 8]
    assert torch.equal(out.slot_budgets, budgets)
    for b in range(2):
        ids, sizes, assign = out.slot_ids[b], out.sizes[b], out.assignment[b, 1:] - 1
        assert torch.equal(torch.bincount(ids, minlength=4), budgets[b])  # tokens per slot = budget
        assert torch.equal(ids, ids.sort().values)  # grouped by slot id
        assert torch.equal(ids[assign], slots.assignment[b])  # each patch's output is in its own slot
        assert torch.equal(torch.bincount(assign, minlength=len(ids)).float(), sizes)
        # size-weighted merging keeps every slot's mean
        tok = out.token_list()[b][1:]
        for s in range(4):
            mean_out = (tok[ids == s] * sizes[ids == s, None]).sum(0) / sizes[ids == s].sum()
            torch.testing.assert_close(mean_out, tokens[b, 1:][truth[b] == s].mean(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.token_list()[0][0], tokens[0, 0])  # prefix passed through
    with pytest.raises(ValueError, match="budget"):
        merge_slots(tokens, slots, torch.tensor([[17, 1, 1, 1], [1, 1, 1, 1]]), num_prefix=1)


def test_compress_slots_gives_the_detailed_object_more_tokens():
    tokens, truth = planted_tokens()
    slots = Slots.from_assignment(truth.clone(), (8, 8))
    out = compress_slots(tokens, slots, 16, num_prefix=1)
    assert (out.slot_budgets.sum(1) == 16).all()
    assert int(out.slot_budgets[0, 0]) > int(
        out.slot_budgets[0, 1:].max()
    )  # quadrant 0 of image 0 is detailed
    # a query pointing at quadrant 2 pulls the budget there
    query = tokens[1, 1:][truth[1] == 2].mean(0)
    focused = compress_slots(
        tokens[1:], Slots.from_assignment(truth[1:].clone(), (8, 8)), 16, num_prefix=1, query=query
    )
    assert int(focused.slot_budgets[0].argmax()) == 2


# -------------------------------------------------------------------------------- Slot Attention


def test_slot_attention_slot_count_is_free_at_inference():
    torch.manual_seed(0)
    model = SlotAttention(24, grid=(8, 8), slot_dim=16, hidden=32, num_slots=4).eval()
    tokens, _ = planted_tokens()
    for count in (2, 4, 7):
        reconstruction, alpha, slots = model(tokens[:, 1:], count)
        assert slots.shape == (2, count, 16) and alpha.shape == (2, count, 64)
        assert reconstruction.shape == (2, 64, 24 + 2)  # tokens and (y, x)
        torch.testing.assert_close(alpha.sum(1), torch.ones(2, 64))
    result = learned_slots(model, tokens, 3, num_prefix=1)
    assert result.assignment.shape == (2, 64) and int(result.num_slots.max()) <= 3


def test_slot_attention_training_lowers_the_loss_and_round_trips(tmp_path):
    tokens, truth = planted_tokens(batch=16, noise=0.1)
    model, report = train_slot_attention(
        tokens, num_slots=4, steps=30, batch_size=4, slot_dim=16, hidden=16, lr=3e-3
    )
    first, last = sum(report.loss[:5]) / 5, sum(report.loss[-5:]) / 5
    assert last < 0.7 * first
    weights, config = save_slot_attention(model, tmp_path / "sa")
    assert weights.exists() and json.loads(config.read_text())["num_slots"] == 4
    loaded = load_slot_attention(tmp_path / "sa.json")
    a = learned_slots(model, tokens, num_prefix=1, seed=3)
    b = learned_slots(loaded, tokens, num_prefix=1, seed=3)
    assert torch.equal(a.assignment, b.assignment)
    with pytest.raises(FileNotFoundError, match="train-slots"):
        load_slot_attention(tmp_path / "missing")


# ------------------------------------------------------------------------------------- saccades


def _classifier(tokens, truth):
    """A k-NN over the planted objects' means (class = quadrant id)."""
    bank = torch.stack(
        [tokens[b, 1:][truth[b] == q].mean(0) for b in range(tokens.shape[0]) for q in range(4)]
    )
    return KnnClassifier(bank, torch.arange(4).repeat(tokens.shape[0]), k=1)


def test_saccade_trace_is_monotone_and_stops_at_the_budget():
    tokens, truth = planted_tokens()
    slots = Slots.from_assignment(truth.clone(), (8, 8))
    one = Slots(slots.assignment[:1], slots.masks[:1], slots.num_slots[:1], slots.grid)
    result = Saccade(12, coarse_per_slot=1, step=3, threshold=None)(tokens[:1], one, num_prefix=1)
    spent = result.trace.tokens
    assert spent[0] == 4 and spent[-1] == 12 and result.trace.stopped == "budget"
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))
    assert result.tokens.shape == (1 + 12, 24) and torch.equal(
        torch.bincount(result.slot_ids), result.budgets
    )
    # without a classifier the residual leads: the detailed quadrant 0 is refined first
    assert result.trace.steps[1].slot == 0
    assert "stopped: budget" in str(result.trace)


def test_saccade_stops_at_the_confidence_threshold_and_follows_the_query():
    tokens, truth = planted_tokens()
    slots = Slots.from_assignment(truth.clone(), (8, 8))
    one = Slots(slots.assignment[1:], slots.masks[1:], slots.num_slots[1:], slots.grid)
    classifier = _classifier(tokens, truth)
    confident = Saccade(40, threshold=0.5, classifier=classifier)(tokens[1:], one, num_prefix=1)
    assert confident.trace.stopped == "threshold" and confident.trace.tokens == [4]
    query = tokens[1, 1:][truth[1] == 3].mean(0)
    looking = Saccade(20, step=2, threshold=None, classifier=classifier)(
        tokens[1:], one, num_prefix=1, query=query
    )
    assert looking.target == 3 and looking.trace.steps[1].slot == 3
    assert looking.trace.stopped in ("budget", "full") and looking.trace.tokens[-1] <= 20
    with pytest.raises(ValueError, match="coarse pass"):
        Saccade(3)(tokens[1:], one, num_prefix=1)


def test_saccade_trace_plots(tmp_path):
    pytest.importorskip("matplotlib")
    tokens, truth = planted_tokens()
    one = Slots.from_assignment(truth[:1].clone(), (8, 8))
    result = Saccade(10, classifier=_classifier(tokens, truth), threshold=None)(tokens[:1], one, num_prefix=1)
    assert result.trace.plot(tmp_path / "trace.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- CLI


def _fake_scene_tokens(num_scenes, split="test", seed=0, *, first=None, progress=None):
    """Planted tokens for real scene layouts: each item's patches share its class direction
    (six scenes whatever is asked; ``first`` takes the first of them, as the real cache does)."""
    scenes = generate_scenes(6, split, seed=1)
    owner = torch.from_numpy(scenes.patch_owner(14)).flatten(1)  # [6, 256]
    gen = torch.Generator().manual_seed(0)
    classes = torch.randn(11, 32, generator=gen)  # 10 classes + background
    labels = torch.from_numpy(scenes.labels)
    cls = torch.where(owner >= 0, labels.gather(1, owner.clamp_min(0)), torch.full_like(owner, 10))
    patches = classes[cls] + 0.05 * torch.randn(6, 256, 32, generator=gen)
    tokens = torch.cat([torch.zeros(6, 1, 32), patches], dim=1)
    if first is not None:
        return scenes.first(first), tokens[:first]
    return scenes, tokens


def test_cli_train_slots_and_eval_on_tiny_settings(tmp_path, monkeypatch, capsys):
    import tokenbudget.data.token_cache as token_cache
    import tokenbudget.evaluate.slot_benchmark as bench

    monkeypatch.setattr(token_cache, "dinov2_scene_tokens", _fake_scene_tokens)
    monkeypatch.setattr(bench, "dinov2_scene_tokens", _fake_scene_tokens)
    scenes, tokens = _fake_scene_tokens(6)
    owner = torch.from_numpy(scenes.patch_owner(14)).flatten(1)
    bank = torch.stack([tokens[b, 1:][owner[b] == i].mean(0) for b in range(6) for i in range(4)])
    monkeypatch.setattr(
        bench, "item_reference_bank", lambda: (bank, torch.from_numpy(scenes.labels).flatten())
    )

    stem = tmp_path / "sa"
    assert main(["train-slots", "--steps", "3", "--n-train", "4", "--out", str(stem), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "sa.safetensors").exists()
    out = tmp_path / "r.json"
    argv = ["vlm-slots-eval", "--n-scenes", "4", "--tokens", "16", "--saccade-tokens", "12", "--quiet"]
    assert main([*argv, "--slot-attention", str(stem), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["complexity"]["sums_exact_gt_slots"] and results["complexity"]["sums_exact_clustered"]
    assert set(results["accuracy"]["16"]) == {"pool", "slots_uniform", "slots_complexity"}
    assert results["slots"]["cluster"]["best_match_iou"] > 0.5 and "slot_attention" in results["slots"]
    assert "12" in results["saccade"]
    assert main(["vlm-slots-eval", "--n-scenes", "999"]) == 2
    assert "--n-scenes must be in [1, 300]" in capsys.readouterr().err


def test_public_api():
    assert tb.vlm.allocate is allocate and tb.vlm.Saccade is Saccade


def test_benchmark_queries_saccades_by_class_vectors(monkeypatch):
    import tokenbudget.evaluate.slot_benchmark as bench

    monkeypatch.setattr(bench, "dinov2_scene_tokens", _fake_scene_tokens)
    scenes, tokens = _fake_scene_tokens(6)
    owner = torch.from_numpy(scenes.patch_owner(14)).flatten(1)
    bank = torch.stack([tokens[b, 1:][owner[b] == i].mean(0) for b in range(6) for i in range(4)])
    monkeypatch.setattr(
        bench, "item_reference_bank", lambda: (bank, torch.from_numpy(scenes.labels).flatten())
    )
    gen = torch.Generator().manual_seed(0)
    class_means = torch.randn(11, 32, generator=gen)[:10]  # the fake scenes' class directions
    kwargs = dict(num_scenes=4, totals=(16,), saccade_totals=(12,), log=lambda _m: None)
    results = bench.run_slot_benchmark(**kwargs, class_queries=class_means)
    assert results["saccade_query"] == "class text" and "12" in results["saccade"]
    with pytest.raises(ValueError, match="one vector per class"):
        bench.run_slot_benchmark(**kwargs, class_queries=class_means[:, :8])


@pytest.mark.slow
def test_slots_budgets_and_saccades_on_real_dinov2_scene_tokens(tmp_path):
    """vlm-slots-eval end to end on the embedded DINOv2's tokens of the real multi-object scenes."""
    out = tmp_path / "slots.json"
    argv = ["vlm-slots-eval", "--n-scenes", "12", "--tokens", "16", "--saccade-tokens", "12", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["complexity"]["sums_exact_gt_slots"] and results["complexity"]["sums_exact_clustered"]
    # k-means slots on real features find the items (0.65 IoU over 150 scenes; chance is far lower).
    assert results["slots"]["cluster"]["best_match_iou"] > 0.4
    # At 16 tokens per scene, slot budgets keep the items recognisable where uniform pooling does not.
    accuracy = results["accuracy"]["16"]
    assert accuracy["slots_complexity"]["weighted"] > accuracy["pool"]["plain"] + 0.15
    assert results["saccade"]["12"]["saccade"]["mean_tokens_spent"] <= 12
