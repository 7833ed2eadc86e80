"""Group advantages against the float64 oracle of tests/oracles.py, written group by group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import ref_group_advantages

import alignkit

IDS = {
    "ints": [3, 1, 3, 7, 1, 3, 9],  # unordered, one group of one (7) and (9)
    "strings": np.array(["b", "a", "b", "c", "a", "b", "d"], dtype=object),
}


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo", "reinforce++-baseline"])
@pytest.mark.parametrize("ids", ["ints", "strings"])
def test_group_advantages_match_oracle(method, ids):
    index = IDS[ids]
    scores = torch.randn(7, dtype=torch.float64)
    expected = ref_group_advantages(scores, list(index), method, 1e-6)
    torch.testing.assert_close(alignkit.group_advantages(scores, index, method=method), expected)
    if ids == "ints":  # the same with a tensor of ids and fp32 scores
        got = alignkit.group_advantages(scores.float(), torch.tensor(index), method=method)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo", "reinforce++-baseline"])
def test_group_advantages_broadcast_over_mask_match_oracle(method):
    scores = torch.randn(7, dtype=torch.float64)
    mask = torch.rand(7, 11) > 0.3
    mask[2] = False  # an empty response
    mask[0, :2] = True
    expected = ref_group_advantages(scores, IDS["ints"], method, 1e-6, mask=mask)
    got = alignkit.group_advantages(scores, IDS["ints"], method=method, mask=mask)
    assert got.shape == (7, 11)
    torch.testing.assert_close(got, expected)
    assert (got[~mask] == 0).all()


def test_group_of_one_conventions():
    s = torch.tensor([2.5], dtype=torch.float64)
    assert alignkit.group_advantages(s, [0], method="grpo", eps=0.0).item() == 2.5
    assert alignkit.group_advantages(s, [0], method="dr_grpo").item() == 2.5
    assert alignkit.group_advantages(s, [0], method="rloo").item() == 2.5


def test_rloo_is_score_minus_mean_of_others():
    s = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(
        alignkit.group_advantages(s, [0, 0, 0], method="rloo"),
        torch.tensor([-3.0, -1.5, 4.5], dtype=torch.float64),
    )


def test_broadcast_over_mask_and_gradients():
    s = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])
    out = alignkit.group_advantages(s, [0, 0, 1, 1], method="grpo", mask=mask)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, alignkit.group_advantages(s, [0, 0, 1, 1], method="grpo")[:, None] * mask)
    assert torch.autograd.gradcheck(lambda x: alignkit.group_advantages(x, [0, 0, 1, 1], method="grpo"), (s,))


def test_reinforce_pp_baseline_whitens_over_masked_tokens_like_verl():
    s = torch.randn(4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    centred = s - torch.tensor([s[:2].mean(), s[:2].mean(), s[2:].mean(), s[2:].mean()])
    tokens = centred[:, None] * mask
    n = mask.sum()
    mean = (tokens * mask).sum() / n
    var = (mask * (tokens - mean) ** 2).sum() / (n - 1)
    expected = (tokens - mean) * torch.rsqrt(var + 1e-8) * mask  # verl's formula, written out
    torch.testing.assert_close(
        ref_group_advantages(s, [5, 5, 2, 2], "reinforce++-baseline", mask=mask), expected
    )
    got = alignkit.group_advantages(s, [5, 5, 2, 2], method="reinforce++-baseline", mask=mask)
    torch.testing.assert_close(got, expected)


def test_groups_of_equal_scores_have_finite_gradients():
    """All-correct / all-wrong prompt groups: advantage 0 and gradients 0, never NaN."""
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0], dtype=torch.float64, requires_grad=True)
    for eps in (1e-6, 0.0):
        adv = alignkit.group_advantages(s, [0, 0, 1, 2, 2], method="grpo", eps=eps)
        assert adv[3].item() == adv[4].item() == 0.0
        (grad,) = torch.autograd.grad(adv.sum(), s)
        assert torch.isfinite(grad).all() and grad[3].item() == grad[4].item() == 0.0
    # (No gradcheck here: the std is not differentiable at a group of equal scores.)


def test_group_advantages_bad_input():
    s = torch.randn(3)
    with pytest.raises(ValueError, match="method must be one of grpo, dr_grpo, rloo, reinforce"):
        alignkit.group_advantages(s, [0, 0, 1], method="ppo")
    with pytest.raises(ValueError, match="index must hold 3 group ids"):
        alignkit.group_advantages(s, [0, 1], method="grpo")
    with pytest.raises(TypeError, match="index must hold integer group ids"):
        alignkit.group_advantages(s, torch.tensor([0.0, 1.0, 1.0]), method="grpo")
    with pytest.raises(ValueError, match="scores must have 1 dimensions"):
        alignkit.group_advantages(torch.randn(3, 1), [0, 1, 2])
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        alignkit.group_advantages(s, [0, 1, 2], eps=-1.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, T\)"):
        alignkit.group_advantages(s, [0, 1, 2], mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        alignkit.group_advantages(s, [0, 1, 2], mask=torch.full((3, 4), 0.5))
    with pytest.raises(TypeError, match="eps must be a non-negative float, got str"):
        alignkit.group_advantages(s, [0, 1, 2], eps="1e-6")
    with pytest.raises(ValueError, match="scores must hold at least 2 sequences"):
        alignkit.group_advantages(s[:1], [0], method="reinforce++-baseline")
    with pytest.raises(TypeError):  # every option is keyword-only
        alignkit.group_advantages(s, [0, 1, 2], "grpo")
