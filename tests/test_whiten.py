"""masked_mean / masked_var / masked_whiten (alignkit/ops/whiten.py) against the float64 oracles of
tests/oracles.py: values, gradients, the errors of too-small masks, huge fp32 inputs and garbage
in the masked positions."""

from __future__ import annotations

import pytest
import torch
from oracles import ref_masked_mean, ref_masked_var, ref_masked_whiten

import alignkit
from alignkit import masked_mean, masked_var, masked_whiten


def make_mask(shape, dtype=torch.bool):
    m = torch.rand(shape) > 0.4
    m.view(-1)[:2] = True  # at least two selected elements
    return m.to(dtype)


SHAPES = [(2,), (7,), (3, 9), (1, 257), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64, torch.int64])
def test_masked_stats_match_oracle(shape, mask_dtype):
    x = torch.randn(shape, dtype=torch.float64)
    m = make_mask(shape, mask_dtype)
    torch.testing.assert_close(masked_mean(x, m), ref_masked_mean(x, m))
    torch.testing.assert_close(masked_var(x, m), ref_masked_var(x, m))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), ref_masked_var(x, m, unbiased=False))
    torch.testing.assert_close(masked_whiten(x, m), ref_masked_whiten(x, m))
    torch.testing.assert_close(
        masked_whiten(x, m, shift_mean=False), ref_masked_whiten(x, m, shift_mean=False)
    )
    # the oracle itself is the plain selection statistics
    sel = x[m != 0]
    torch.testing.assert_close(ref_masked_mean(x, m), sel.mean())
    torch.testing.assert_close(ref_masked_var(x, m), sel.var())


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_masked_mean_along_dim(dim):
    x = torch.randn(5, 6, dtype=torch.float64)
    m = torch.rand(5, 6) > 0.3
    m[0, :] = m[:, 0] = True  # every slice along either dim selects something
    got = masked_mean(x, m, dim=dim)
    torch.testing.assert_close(got, ref_masked_mean(x, m, dim=dim))
    first = x[0][m[0]].mean() if dim in (1, -1) else x[:, 0][m[:, 0]].mean()
    torch.testing.assert_close(got[0], first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_accumulate_in_fp32(dtype):
    x = torch.randn(4, 300).to(dtype)
    m = make_mask((4, 300))
    for got, exp in (
        (masked_mean(x, m), ref_masked_mean(x, m)),
        (masked_var(x, m), ref_masked_var(x, m)),
        (masked_whiten(x, m), ref_masked_whiten(x, m)),
    ):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


def test_gradients_match_oracle_and_gradcheck():
    """Gradients of every statistic, and of the whitened values at the selected positions (the
    values written at unselected positions are unspecified: alignkit computes them from detached
    statistics, so they carry no gradient)."""
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    m = make_mask((3, 9), torch.float64)
    m[:, 0] = 1  # every row non-empty for dim=1
    keep = m.bool()
    g = torch.randn(int(keep.sum()), dtype=torch.float64)
    cases = [
        (lambda y: masked_mean(y, m), lambda y: ref_masked_mean(y, m)),
        (lambda y: masked_mean(y, m, dim=1), lambda y: ref_masked_mean(y, m, dim=1)),
        (lambda y: masked_var(y, m), lambda y: ref_masked_var(y, m)),
        (lambda y: masked_var(y, m, unbiased=False), lambda y: ref_masked_var(y, m, unbiased=False)),
        (lambda y: masked_whiten(y, m)[keep] * g, lambda y: ref_masked_whiten(y, m)[keep] * g),
        (
            lambda y: masked_whiten(y, m, shift_mean=False)[keep] * g,
            lambda y: ref_masked_whiten(y, m, shift_mean=False)[keep] * g,
        ),
    ]
    for fast, ref in cases:
        (got,) = torch.autograd.grad(fast(x).sum(), x)
        (exp,) = torch.autograd.grad(ref(x).sum(), x)
        torch.testing.assert_close(got, exp)
        assert torch.autograd.gradcheck(fast, (x,))


# ----------------------------------------------------------------------------- too few elements


def test_empty_mask_is_an_error_naming_mask():
    x = torch.randn(2, 3)
    empty = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask must select at least 1 element for a mean, got 0"):
        masked_mean(x, empty)
    with pytest.raises(ValueError, match="mask must select at least 1 element"):
        masked_mean(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="mask must select at least 1 element for a variance"):
        masked_var(x, empty, unbiased=False)
    with pytest.raises(ValueError, match="mask must select at least 2 elements for a variance"):
        masked_var(x, empty)


def test_empty_slice_along_dim_is_an_error():
    x = torch.randn(3, 4)
    m = torch.ones(3, 4)
    m[1] = 0
    masked_mean(x, m, dim=0)  # every column still selects two elements
    with pytest.raises(ValueError, match=r"mask must select at least 1 element for a mean in every slice"):
        masked_mean(x, m, dim=1)
    with pytest.raises(ValueError, match=r"\(1 slices have 0\)"):
        masked_mean(x, m, dim=-1)


@pytest.mark.parametrize("selected", [0, 1])
def test_whitening_needs_two_masked_elements(selected):
    x = torch.randn(2, 3)
    m = torch.zeros(2, 3)
    m.view(-1)[:selected] = 1
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        masked_whiten(x, m)
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        masked_var(x, m)
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        alignkit.gae(x, x, m, whiten=True)
    if selected:  # one element: a biased variance (0) and a mean exist
        assert float(masked_var(x, m, unbiased=False)) == 0.0
        torch.testing.assert_close(masked_mean(x, m), x.view(-1)[0])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dim", [2, -3, 10])
def test_dim_out_of_range_is_an_error(dim):
    with pytest.raises(ValueError, match=rf"dim must lie in \[-2, 2\) for x of shape \(3, 4\), got {dim}"):
        masked_mean(torch.randn(3, 4), torch.ones(3, 4), dim=dim)


def test_masked_stats_bad_input():
    x, m = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="mask must have the shape of x"):
        masked_mean(torch.randn(2, 3), torch.ones(3, 2))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        masked_whiten(torch.ones(2, 3, dtype=torch.int32), m)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        masked_var(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="dim must be an int"):
        masked_mean(x, m, dim=1.0)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        masked_var(x, m, unbiased=1)
    with pytest.raises(TypeError, match="shift_mean must be a bool"):
        masked_whiten(x, m, shift_mean=0)
    with pytest.raises(TypeError):  # options are keyword-only
        masked_mean(x, m, 1)
    with pytest.raises(TypeError):
        masked_var(x, m, False)


# ----------------------------------------------------------------------------- numerics, garbage


def test_fp32_inputs_near_1e20_do_not_overflow():
    """Squares of fp32 values near 1e20 overflow (1e40 > 3.4e38): the statistics must not form them.
    Every result here is representable in fp32 and must match the fp64 oracle."""
    m = make_mask((4, 50))
    x = (1e20 * torch.randn(4, 50)).float()
    mean, whitened = masked_mean(x, m), masked_whiten(x, m)
    assert torch.isfinite(mean) and torch.isfinite(whitened).all()
    torch.testing.assert_close(mean.double(), ref_masked_mean(x, m), rtol=1e-5, atol=0)
    torch.testing.assert_close(whitened.double(), ref_masked_whiten(x, m), rtol=1e-5, atol=1e-5)
    # values ~1e20 with a spread of ~1e18 (variance ~1e36): whitening cancels the large mean
    near = (1e20 * (1 + 1e-2 * torch.randn(4, 50))).float()
    whitened = masked_whiten(near, m)
    assert torch.isfinite(whitened).all()
    torch.testing.assert_close(whitened.double(), ref_masked_whiten(near, m), rtol=1e-3, atol=1e-3)


def test_fp32_variance_of_inputs_near_1e20_does_not_overflow():
    """Values ~1e20 with a spread of ~1e18: the variance (~1e36) is representable in fp32 although
    the square of the values' magnitude (1e40) is not."""
    m = make_mask((4, 50))
    near = (1e20 * (1 + 1e-2 * torch.randn(4, 50))).float()
    var = masked_var(near, m)
    assert torch.isfinite(var), var
    torch.testing.assert_close(var.double(), ref_masked_var(near, m), rtol=1e-4, atol=0)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_garbage_at_masked_positions_does_not_change_live_outputs(fill):
    x = torch.randn(3, 9, dtype=torch.float64)
    m = make_mask((3, 9))
    m[:, 0] = True
    poisoned = x.masked_fill(~m, fill)
    weights = torch.randn(3, 9, dtype=torch.float64)
    results = []
    for data in (x, poisoned):
        leaf = data.clone().requires_grad_()
        outs = [
            masked_mean(leaf, m),
            masked_mean(leaf, m, dim=1),
            masked_var(leaf, m),
            masked_var(leaf, m, unbiased=False),
            masked_whiten(leaf, m)[m],  # live positions only: the masked ones are transformed too
            masked_whiten(leaf, m, shift_mean=False)[m],
        ]
        loss = sum((o * weights[m][: o.numel()].reshape(o.shape)).sum() for o in outs)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((outs, grad))
    (clean, clean_grad), (dirty, dirty_grad) = results
    for a, b in zip(clean, dirty, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad[m], clean_grad[m], rtol=0, atol=0)
    assert (dirty_grad[~m] == 0).all()


def test_nan_at_a_live_position_stays_visible():
    x = torch.randn(2, 5)
    x[1, 3] = float("nan")
    m = torch.ones(2, 5)
    assert torch.isnan(masked_mean(x, m)) and torch.isnan(masked_var(x, m))
    assert torch.isnan(masked_whiten(x, m)).all()
    rows = masked_mean(x, m, dim=1)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1])
