"""tb.token_entropy: definition and properties."""

from __future__ import annotations

import math

import pytest
import torch

import tokenbudget as tb


def orthonormal(batch: int, n: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, c, c, generator=g, dtype=torch.float64))
    return q[:, :, :n].transpose(1, 2)  # [B, n, c] orthonormal rows


def test_identical_tokens_have_zero_entropy() -> None:
    x = torch.randn(2, 1, 16).expand(2, 9, 16) * torch.rand(2, 9, 1) * 3  # same direction, any scale
    assert torch.equal(tb.token_entropy(x), torch.zeros(2))


def test_orthogonal_tokens_have_maximal_entropy() -> None:
    x = orthonormal(3, 5, 16) * torch.tensor([1.0, 2.0, 3.0, 0.5, 7.0], dtype=torch.float64)[:, None]
    assert torch.allclose(tb.token_entropy(x), torch.ones(3, dtype=torch.float64), atol=1e-9)


def test_more_tokens_than_channels_max_is_log_c() -> None:
    # +e_i and -e_i: rho = I / C, the most spread any set of 2C tokens in C dimensions can be
    eye = torch.eye(8)
    x = torch.cat([eye, -eye]).unsqueeze(0)
    assert torch.allclose(tb.token_entropy(x), torch.ones(1), atol=1e-6)


def test_value_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0, 5.0, 1.0]], dtype=torch.float64)
    u = x[0] / x[0].norm(dim=-1, keepdim=True)
    w = sizes[0] / sizes[0].sum()
    rho = (u.T * w) @ u  # [C, C] sum_i w_i u_i u_i^T
    lam = torch.linalg.eigvalsh(rho)
    lam = lam[lam > 1e-12]
    expected = -(lam * lam.log()).sum() / math.log(min(6, 4))
    assert torch.allclose(tb.token_entropy(x, sizes), expected.unsqueeze(0), atol=1e-9)


def test_a_merged_token_weighs_its_size() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 8, generator=g)
    repeated = torch.cat([x, x[:, :1], x[:, :1]], dim=1)  # token 0 three times
    sizes = torch.tensor([[3.0, 1, 1, 1, 1]])
    plain = tb.token_entropy(repeated)  # 7 tokens, max log 7
    weighted = tb.token_entropy(x, sizes)  # 5 tokens, max log 5: same spectrum
    assert torch.allclose(weighted * math.log(5), plain * math.log(7), atol=1e-5)


def test_size_zero_tokens_are_ignored() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, generator=g)
    padded = torch.cat([x, torch.randn(2, 3, 8, generator=g)], dim=1)
    sizes = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1)
    assert torch.allclose(tb.token_entropy(padded, sizes), tb.token_entropy(x), atol=1e-6)


def test_monotone_under_added_diversity() -> None:
    # tokens mixing a shared direction with their own orthogonal one: the more of their own, the higher
    basis = orthonormal(1, 7, 16)[0]  # [7, 16]
    shared, own = basis[0], basis[1:]
    values = [
        tb.token_entropy((shared + t * own).unsqueeze(0)).item() for t in (0.0, 0.1, 0.3, 1.0, 3.0, 100.0)
    ]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > 0.999


def test_permutation_invariant_and_batch_independent() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 20, 12, generator=g)
    sizes = torch.rand(4, 20, generator=g) + 0.5
    perm = torch.randperm(20, generator=g)
    together = tb.token_entropy(x, sizes)
    assert torch.allclose(tb.token_entropy(x[:, perm], sizes[:, perm]), together, atol=1e-5)
    for i in range(4):
        assert torch.allclose(
            tb.token_entropy(x[i : i + 1], sizes[i : i + 1]), together[i : i + 1], atol=1e-6
        )
    assert ((together >= 0) & (together <= 1)).all()


def test_fewer_than_two_tokens_give_zero() -> None:
    assert tb.token_entropy(torch.randn(2, 1, 8)).tolist() == [0.0, 0.0]
    sizes = torch.tensor([[1.0, 0.0, 0.0]])
    assert tb.token_entropy(torch.randn(1, 3, 8), sizes).item() == 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        tb.token_entropy(torch.randn(4, 8))
    with pytest.raises(ValueError, match="sizes must be"):
        tb.token_entropy(torch.randn(1, 4, 8), torch.ones(1, 5))
    with pytest.raises(ValueError, match="non-negative"):
        tb.token_entropy(torch.randn(1, 4, 8), -torch.ones(1, 4))
