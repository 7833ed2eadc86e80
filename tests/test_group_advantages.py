"""Group advantages and masked statistics against float64 oracles written group by group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignkit


def group_oracle(scores, ids, method, eps):
    s = scores.double().tolist()
    groups: dict = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    out = [0.0] * len(s)
    for members in groups.values():
        vals = torch.tensor([s[i] for i in members], dtype=torch.float64)
        n = len(members)
        mean = 0.0 if n == 1 else float(vals.mean())
        std = 1.0 if n == 1 else float(vals.std())  # unbiased
        for i in members:
            if method == "grpo":
                out[i] = (s[i] - mean) / (std + eps)
            elif method == "rloo":
                out[i] = s[i] if n == 1 else (s[i] - (sum(s[j] for j in members) - s[i]) / (n - 1))
            else:
                out[i] = s[i] - mean
    out = torch.tensor(out, dtype=torch.float64)
    if method == "reinforce++-baseline":
        out = (out - out.mean()) / torch.sqrt(out.var() + 1e-8)
    return out


IDS = {
    "ints": [3, 1, 3, 7, 1, 3, 9],  # unordered, one group of one (7) and (9)
    "strings": np.array(["b", "a", "b", "c", "a", "b", "d"], dtype=object),
}


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo", "reinforce++-baseline"])
@pytest.mark.parametrize("ids", ["ints", "strings"])
def test_group_advantages_match_oracle(method, ids):
    index = IDS[ids]
    scores = torch.randn(7, dtype=torch.float64)
    expected = group_oracle(scores, list(index), method, 1e-6)
    torch.testing.assert_close(alignkit.group_advantages(scores, index, method), expected)
    if ids == "ints":  # the same with a tensor of ids and fp32 scores
        got = alignkit.group_advantages(scores.float(), torch.tensor(index), method)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_of_one_conventions():
    s = torch.tensor([2.5], dtype=torch.float64)
    assert alignkit.group_advantages(s, [0], "grpo", eps=0.0).item() == 2.5
    assert alignkit.group_advantages(s, [0], "dr_grpo").item() == 2.5
    assert alignkit.group_advantages(s, [0], "rloo").item() == 2.5


def test_rloo_is_score_minus_mean_of_others():
    s = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(
        alignkit.group_advantages(s, [0, 0, 0], "rloo"), torch.tensor([-3.0, -1.5, 4.5], dtype=torch.float64)
    )


def test_broadcast_over_mask_and_gradients():
    s = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])
    out = alignkit.group_advantages(s, [0, 0, 1, 1], "grpo", mask=mask)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, alignkit.group_advantages(s, [0, 0, 1, 1], "grpo")[:, None] * mask)
    assert torch.autograd.gradcheck(lambda x: alignkit.group_advantages(x, [0, 0, 1, 1], "grpo"), (s,))


def test_reinforce_pp_baseline_whitens_over_masked_tokens_like_verl():
    s = torch.randn(4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    centred = s - torch.tensor([s[:2].mean(), s[:2].mean(), s[2:].mean(), s[2:].mean()])
    tokens = centred[:, None] * mask
    n = mask.sum()
    mean = (tokens * mask).sum() / n
    var = (mask * (tokens - mean) ** 2).sum() / (n - 1)
    expected = (tokens - mean) * torch.rsqrt(var + 1e-8) * mask
    got = alignkit.group_advantages(s, [5, 5, 2, 2], "reinforce++-baseline", mask=mask)
    torch.testing.assert_close(got, expected)


def test_groups_of_equal_scores_have_finite_gradients():
    """All-correct / all-wrong prompt groups: advantage 0 and gradients 0, never NaN."""
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0], dtype=torch.float64, requires_grad=True)
    for eps in (1e-6, 0.0):
        adv = alignkit.group_advantages(s, [0, 0, 1, 2, 2], "grpo", eps=eps)
        assert adv[3].item() == adv[4].item() == 0.0
        (grad,) = torch.autograd.grad(adv.sum(), s)
        assert torch.isfinite(grad).all() and grad[3].item() == grad[4].item() == 0.0
    # (No gradcheck here: the std is not differentiable at a group of equal scores.)


def test_group_advantages_bad_input():
    s = torch.randn(3)
    with pytest.raises(ValueError, match="method must be one of grpo, dr_grpo, rloo, reinforce"):
        alignkit.group_advantages(s, [0, 0, 1], "ppo")
    with pytest.raises(ValueError, match="index must hold 3 group ids"):
        alignkit.group_advantages(s, [0, 1], "grpo")
    with pytest.raises(TypeError, match="index must hold integer group ids"):
        alignkit.group_advantages(s, torch.tensor([0.0, 1.0, 1.0]), "grpo")
    with pytest.raises(ValueError, match="scores must have 1 dimensions"):
        alignkit.group_advantages(torch.randn(3, 1), [0, 1, 2])
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        alignkit.group_advantages(s, [0, 1, 2], eps=-1.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, T\)"):
        alignkit.group_advantages(s, [0, 1, 2], mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        alignkit.group_advantages(s, [0, 1, 2], mask=torch.full((3, 4), 0.5))


# ---- masked statistics -------------------------------------------------------------------------


def test_masked_stats_match_oracle_and_gradients():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(3, 9) > 0.4).double()
    m[0, :2] = 1
    sel = x[m.bool()]
    torch.testing.assert_close(alignkit.masked_mean(x, m), sel.mean())
    torch.testing.assert_close(alignkit.masked_var(x, m), sel.var())
    torch.testing.assert_close(alignkit.masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    expected = (x - sel.mean()) * torch.rsqrt(sel.var() + 1e-8)
    torch.testing.assert_close(alignkit.masked_whiten(x, m), expected)
    torch.testing.assert_close(alignkit.masked_whiten(x, m, shift_mean=False), expected + sel.mean())
    rows = alignkit.masked_mean(x, m, dim=1)
    torch.testing.assert_close(rows[0], x[0][m[0].bool()].mean())
    assert torch.autograd.gradcheck(lambda y: alignkit.masked_whiten(y, m), (x,))


@pytest.mark.parametrize("selected", [0, 1])
def test_whitening_needs_two_masked_elements(selected):
    x = torch.randn(2, 3)
    m = torch.zeros(2, 3)
    m.view(-1)[:selected] = 1
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        alignkit.masked_whiten(x, m)
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        alignkit.gae(x, x, m, whiten=True)


def test_masked_stats_bad_input():
    with pytest.raises(ValueError, match="mask must have the shape of x"):
        alignkit.masked_mean(torch.randn(2, 3), torch.ones(3, 2))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        alignkit.masked_whiten(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3))
