"""The VLM compression contract, the group ops and grid pooling."""

import numpy as np
import pytest
import torch

from tokenbudget.data.scenes import generate_scenes
from tokenbudget.ops.group import group_counts, group_max, group_mean
from tokenbudget.vlm import CompressedTokens, pool
from tokenbudget.vlm.pooling import output_grid


def test_group_mean_and_max_match_a_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3)
    assignment = torch.tensor([[0, 0, 1, 1, 2, -1, 2, 0, 1, 2], [2, 2, 2, 2, 2, 2, 2, 2, 2, 0]])
    mean, mx, counts = group_mean(x, assignment, 4), group_max(x, assignment, 4), group_counts(assignment, 4)
    for b in range(2):
        for g in range(4):
            members = x[b, assignment[b] == g]
            assert counts[b, g] == len(members)
            if len(members):
                torch.testing.assert_close(mean[b, g], members.mean(0))
                torch.testing.assert_close(mx[b, g], members.max(0).values)
            else:  # an empty group is zero, never NaN or -inf
                assert torch.equal(mean[b, g], torch.zeros(3)) and torch.equal(mx[b, g], torch.zeros(3))


def test_output_grid_picks_the_closest_aspect():
    assert output_grid(64, (16, 16)) == (8, 8)
    assert output_grid(16, (16, 16)) == (4, 4)
    assert output_grid(144, (16, 16)) == (12, 12)
    assert output_grid(8, (16, 16)) == (4, 2)
    assert output_grid(6, (4, 12)) == (1, 6)
    with pytest.raises(ValueError, match="grid"):
        output_grid(17, (16, 16))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_matches_torch_pooling_on_divisible_grids(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 64, 5)  # a class token and an 8 x 8 grid
    out = pool(x, 16, num_prefix=1, mode=mode)
    assert isinstance(out, CompressedTokens) and out.tokens.shape == (2, 17, 5) and out.budgets == [16, 16]
    grid = x[:, 1:].transpose(1, 2).reshape(2, 5, 8, 8)
    ref = (
        torch.nn.functional.avg_pool2d(grid, 2) if mode == "avg" else torch.nn.functional.max_pool2d(grid, 2)
    )
    torch.testing.assert_close(out.tokens[:, 1:], ref.flatten(2).transpose(1, 2))
    assert torch.equal(out.tokens[:, 0], x[:, 0])  # prefix passed through
    assert out.assignment.shape == (2, 65) and out.assignment[0, 0] == 0
    assert all(torch.equal(c, torch.tensor([1] + [4] * 16)) for c in out.counts())


def test_pool_per_image_budgets_give_a_list():
    x = torch.randn(3, 36, 4)
    out = pool(x, [4, 9, 36])
    assert isinstance(out.tokens, list) and [t.shape[0] for t in out.tokens] == [4, 9, 36]
    assert torch.equal(out.tokens[2], x[2])  # k = N is the identity
    assert (out.assignment >= 0).all() and int(out.assignment[0].max()) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "outside"),
        ({"k": 65}, "outside"),
        ({"k": [4, 4, 4]}, "per image"),
        ({"k": 16, "grid": (4, 8)}, "does not match"),
        ({"k": 16, "mode": "median"}, "unknown pooling mode"),
    ],
)
def test_pool_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pool(torch.randn(2, 64, 3), **kwargs)


def test_pool_needs_a_grid_for_non_square_counts():
    with pytest.raises(ValueError, match="square"):
        pool(torch.randn(1, 50, 3), 5)
    assert pool(torch.randn(1, 50, 3), 5, grid=(5, 10)).tokens.shape == (1, 5, 3)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        pool(torch.randn(64, 3), 4)


def test_scenes_are_deterministic_and_items_own_their_patches():
    a = generate_scenes(6, "test", seed=3)
    b = generate_scenes(6, "test", seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert all(len(set(row)) == 4 for row in a.labels.tolist())  # distinct classes per scene
    owner = a.patch_owner(14)
    assert owner.shape == (6, 16, 16)
    for s in range(6):
        for i in range(4):
            top, left, bottom, right = a.boxes[s, i]
            ys, xs = np.nonzero(owner[s] == i)
            assert len(ys) > 0  # every item covers patches
            # patches owned by an item lie inside its box
            assert (ys * 14 + 14 > top).all() and (ys * 14 < bottom).all()
            assert (xs * 14 + 14 > left).all() and (xs * 14 < right).all()
        # pixels outside every box are background and black
        assert (a.images[s][a.owner[s] < 0] <= 16).all()


def test_knn_predict_and_item_features():
    from tokenbudget.evaluate.scene_metrics import item_features, knn_predict, on_item_share, pooled_feature

    bank = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1
    )
    labels = torch.tensor([0, 0, 1, 1])
    queries = pooled_feature(torch.tensor([[[1.0, 0.2], [0.8, 0.0]], [[0.0, 3.0], [0.2, 1.0]]]))
    assert knn_predict(bank, labels, queries, k=2).tolist() == [0, 1]
    # ties go to the nearer neighbour
    assert knn_predict(bank, labels, pooled_feature(torch.tensor([[[0.2, 1.0]]])), k=2).tolist() == [1]
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # a class token, then 3 patches
    feats = item_features(tokens, torch.tensor([[0, 1, 0]]), num_items=2)
    torch.testing.assert_close(feats[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert on_item_share(torch.tensor([0, 0, 1, -1]), 0) == 0.5
