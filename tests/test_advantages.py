"""GAE, packed GAE and discounted returns (padded and packed) against the float64 Python-loop
oracles of tests/oracles.py, on both backends."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from oracles import (
    ref_discounted_returns,
    ref_discounted_returns_packed,
    ref_gae,
    ref_gae_packed,
    ref_masked_whiten,
)

import alignkit
from alignkit.kernels import gae as gae_kernels

# every CPU case through the torch twins and the numba kernels of the scans (conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_twin")


def random_mask(batch, length, kind="gaps"):
    """Masks with interior gaps (multi-turn), leading prompt padding, trailing padding, empty rows."""
    m = (torch.rand(batch, length) > 0.3).double()
    if kind == "padded":
        m = torch.zeros(batch, length, dtype=torch.float64)
        for b in range(batch):
            lo = int(torch.randint(0, max(length // 2, 1), ()))
            hi = int(torch.randint(lo, length + 1, ()))
            m[b, lo:hi] = 1
    if batch > 1:
        m[-1] = 0  # an all-masked row
    return m


SHAPES = [(1, 1), (3, 1), (2, 7), (5, 130), (1, 257)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma_lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.9, 0.0)])
@pytest.mark.parametrize("kind", ["gaps", "padded"])
def test_gae_matches_oracle(backend, backend_device, shape, gamma_lam, kind):
    gamma, lam = gamma_lam
    r, v = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    m = random_mask(*shape, kind=kind)
    ref_adv, ref_ret = ref_gae(r, v, m, gamma, lam)
    d = backend_device
    adv, ret = alignkit.gae(r.to(d), v.to(d), m.to(d), gamma=gamma, lam=lam, backend=backend)
    adv, ret = adv.cpu(), ret.cpu()
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)
    # fp32 inputs: fp32 outputs, no worse than fp32 rounding of a sum of T terms
    adv32, ret32 = alignkit.gae(
        r.float().to(d), v.float().to(d), m.bool().to(d), gamma=gamma, lam=lam, backend=backend
    )
    adv32, ret32 = adv32.cpu(), ret32.cpu()
    assert adv32.dtype == torch.float32
    torch.testing.assert_close(adv32.double(), ref_adv, rtol=1e-4, atol=1e-4 * shape[1] ** 0.5)
    torch.testing.assert_close(ret32.double(), ref_ret, rtol=1e-4, atol=1e-4 * shape[1] ** 0.5)


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["parallel", "serial"])
def test_gae_cpu_row_parallel_and_serial_kernels(monkeypatch, threshold):
    import alignkit.cpu

    monkeypatch.setattr(alignkit.cpu, "PARALLEL_MIN_ELEMENTS", threshold)
    r, v = torch.randn(9, 77, dtype=torch.float64), torch.randn(9, 77, dtype=torch.float64)
    m = random_mask(9, 77)
    ref_adv, ref_ret = ref_gae(r, v, m, 0.99, 0.95)
    adv, ret = alignkit.gae(r, v, m, gamma=0.99, lam=0.95, backend="cpu")
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gae_half_inputs_accumulate_in_fp32(backend, backend_device, dtype):
    r, v = torch.randn(4, 100).to(dtype), torch.randn(4, 100).to(dtype)
    m = random_mask(4, 100)
    ref_adv, ref_ret = ref_gae(r.double(), v.double(), m, 0.99, 0.95)
    d = backend_device
    adv, ret = (
        x.cpu()
        for x in alignkit.gae(r.to(d), v.to(d), m.to(dtype).to(d), gamma=0.99, lam=0.95, backend=backend)
    )
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [64, 128])
@pytest.mark.parametrize("gamma_lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_triton_split_across_programs(device, chunk_size, gamma_lam):
    """Long rows split into chunks (summary + carry + apply) equal the one-program scan."""
    r, v = torch.randn(3, 300, dtype=torch.float64), torch.randn(3, 300, dtype=torch.float64)
    m = random_mask(3, 300)
    m[0, 60:200] = 0  # a masked span crossing chunk boundaries
    ref_adv, ref_ret = ref_gae(r, v, m, *gamma_lam)
    out = gae_kernels.gae_fwd(
        r.to(device), v.to(device), m.to(device), *gamma_lam, torch.float64, chunk_size=chunk_size
    )
    adv, ret = (x.cpu() for x in out)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


def test_gae_whiten_reproduces_verl(backend, backend_device):
    r, v = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    m = random_mask(4, 50, kind="padded")
    m[0, 5:20] = 1
    ref_adv, ref_ret = ref_gae(r, v, m, 1.0, 0.95)
    # verl: masked_whiten(advantages, response_mask) with unbiased masked variance; returns unwhitened
    expected = ref_masked_whiten(ref_adv, m)
    d = backend_device
    adv, ret = (
        x.cpu()
        for x in alignkit.gae(r.to(d), v.to(d), m.to(d), gamma=1.0, lam=0.95, whiten=True, backend=backend)
    )
    torch.testing.assert_close(adv, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


def _packed(lengths):
    """Offsets of sequences of ``lengths`` packed end to end (int32, as a replay buffer hands them)."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# A sequence of one token between long ones, and lengths that straddle the interpreter's tiles.
PACKED_LENGTHS = [[1], [5, 1, 17], [40, 1, 3, 90], [1, 7, 257]]


@pytest.mark.parametrize("lengths", PACKED_LENGTHS)
def test_gae_packed_equals_padded(backend, backend_device, lengths):
    rows, width = len(lengths), max(lengths)
    r, v = torch.randn(rows, width, dtype=torch.float64), torch.randn(rows, width, dtype=torch.float64)
    m = random_mask(rows, width)
    for b, n in enumerate(lengths):
        m[b, n:] = 0
        r[b, n:] = 0
        v[b, n:] = 0
    ref_adv, ref_ret = ref_gae(r, v, m, 0.97, 0.9)
    pack = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths)])  # noqa: E731
    cu = _packed(lengths)
    d = backend_device
    adv, ret = (
        x.cpu()
        for x in alignkit.gae_packed(
            pack(r).to(d), pack(v).to(d), pack(m).to(d), cu, gamma=0.97, lam=0.9, backend=backend
        )
    )
    torch.testing.assert_close(adv, pack(ref_adv), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, pack(ref_ret), rtol=1e-10, atol=1e-10)
    # the packed oracle (the loop restarted at every boundary) says the same
    packed_adv, packed_ret = ref_gae_packed(pack(r), pack(v), pack(m), cu, 0.97, 0.9)
    torch.testing.assert_close(adv, packed_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, packed_ret, rtol=1e-10, atol=1e-10)


def test_gae_packed_triton_split_across_programs(device):
    lengths = [200, 3, 130]
    cu = torch.tensor([0, 200, 203, 333])
    r, v = torch.randn(1, 333, dtype=torch.float64), torch.randn(1, 333, dtype=torch.float64)
    m = (torch.rand(1, 333) > 0.2).double()
    out = gae_kernels.gae_packed_fwd(
        r.to(device), v.to(device), m.to(device), cu, 0.99, 0.95, torch.float64, chunk_size=64
    )
    adv, ret = (x.cpu() for x in out)
    for i, n in enumerate(lengths):
        sl = slice(int(cu[i]), int(cu[i]) + n)
        ref_adv, ref_ret = ref_gae(r[:, sl], v[:, sl], m[:, sl], 0.99, 0.95)
        torch.testing.assert_close(adv[:, sl], ref_adv, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ret[:, sl], ref_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (4, 130)])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_matches_oracle(backend, backend_device, shape, gamma):
    r = torch.randn(*shape, dtype=torch.float64)
    m = random_mask(*shape)
    d = backend_device
    out = alignkit.discounted_returns(r.to(d), m.to(d), gamma=gamma, backend=backend).cpu()
    torch.testing.assert_close(out, ref_discounted_returns(r, m, gamma), rtol=1e-10, atol=1e-10)
    out32 = alignkit.discounted_returns(r.float().to(d), m.float().to(d), gamma=gamma, backend=backend).cpu()
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_discounted_returns(r, m, gamma), rtol=1e-4, atol=1e-4)


def test_discounted_returns_worked_example(backend, backend_device):
    """docs/formulas.md: gamma = 0.5, r = [1, 0, 1, 2], m = [1, 1, 0, 1] gives [1, 0, 2, 2]."""
    r = torch.tensor([[1.0, 0.0, 1.0, 2.0]], dtype=torch.float64, device=backend_device)
    m = torch.tensor([[1, 1, 0, 1]], device=backend_device)
    expected = torch.tensor([[1.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(ref_discounted_returns(r, m, 0.5), expected, rtol=0, atol=0)
    out = alignkit.discounted_returns(r, m, gamma=0.5, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("lengths", PACKED_LENGTHS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_packed_matches_oracle(backend, backend_device, lengths, gamma):
    """The return restarts at every boundary: the packed op equals discounted_returns looped over the
    sequences (the oracle, and the padded op itself), in fp64 and fp32."""
    n = sum(lengths)
    r = torch.randn(n, dtype=torch.float64)
    m = (torch.rand(n) > 0.3).double()
    cu = _packed(lengths)
    expected = ref_discounted_returns_packed(r, m, cu, gamma)
    d = backend_device
    out = alignkit.discounted_returns_packed(r.to(d), m.to(d), cu, gamma=gamma, backend=backend)
    assert out.shape == (n,) and out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-10)
    for lo, hi in itertools.pairwise(cu.tolist()):
        one = alignkit.discounted_returns(
            r[None, lo:hi].to(d), m[None, lo:hi].to(d), gamma=gamma, backend=backend
        )
        torch.testing.assert_close(out[lo:hi].cpu(), one[0].cpu(), rtol=1e-12, atol=1e-12)
    # (1, N) input keeps its shape; fp32 in, fp32 out; cu_seqlens as a list
    out32 = alignkit.discounted_returns_packed(
        r.float()[None].to(d), m.bool()[None].to(d), cu.tolist(), gamma=gamma, backend=backend
    )
    assert out32.shape == (1, n) and out32.dtype == torch.float32
    torch.testing.assert_close(out32[0].cpu().double(), expected, rtol=1e-4, atol=1e-4 * n**0.5)


def test_discounted_returns_packed_does_not_flow_across_boundaries(backend, backend_device):
    """A reward at the start of a sequence never reaches the end of the one before it."""
    r = torch.zeros(10, dtype=torch.float64, device=backend_device)
    r[4] = 1.0  # first token of the second sequence
    m = torch.ones(10, device=backend_device)
    out = alignkit.discounted_returns_packed(r, m, [0, 4, 10], gamma=1.0, backend=backend).cpu()
    assert (out[:4] == 0).all() and (out[4] == 1.0).all() and (out[5:] == 0).all()
    padded = alignkit.discounted_returns(r[None], m[None], gamma=1.0, backend=backend).cpu()[0]
    assert (padded[:5] == 1.0).all()  # unpacked, the reward flows back over the whole row


def test_empty_batch(backend, backend_device):
    r = torch.zeros(0, 5, device=backend_device)
    adv, ret = alignkit.gae(r, r, r, backend=backend)
    assert adv.shape == ret.shape == (0, 5)


# ---- garbage in padding ------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_nan_at_masked_positions_does_not_leak(backend, backend_device, fill):
    """NaN/inf rewards and values at masked positions (padding, observation spans) leave every live
    advantage and return unchanged, padded and packed."""
    d = backend_device
    r, v = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    m = random_mask(3, 40, kind="gaps")
    live = m.bool()
    bad_r, bad_v = r.masked_fill(~live, fill), v.masked_fill(~live, fill)
    ref_adv, ref_ret = ref_gae(r, v, m, 0.99, 0.95)
    for dtype in (torch.float64, torch.float32):
        args = (bad_r.to(dtype).to(d), bad_v.to(dtype).to(d), m.to(d))
        adv, ret = (x.cpu().double() for x in alignkit.gae(*args, gamma=0.99, lam=0.95, backend=backend))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(adv[live], ref_adv[live], rtol=tol, atol=tol)
        torch.testing.assert_close(ret[live], ref_ret[live], rtol=tol, atol=tol)
        rets = alignkit.discounted_returns(args[0], args[2], gamma=0.9, backend=backend).cpu().double()
        torch.testing.assert_close(rets[live], ref_discounted_returns(r, m, 0.9)[live], rtol=tol, atol=tol)
    cu = _packed([40, 40, 40])
    pr, pv, pm = bad_r.reshape(-1).to(d), bad_v.reshape(-1).to(d), m.reshape(-1).to(d)
    adv, ret = (x.cpu() for x in alignkit.gae_packed(pr, pv, pm, cu, gamma=0.99, lam=0.95, backend=backend))
    flat = live.reshape(-1)
    torch.testing.assert_close(adv[flat], ref_adv.reshape(-1)[flat], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret[flat], ref_ret.reshape(-1)[flat], rtol=1e-10, atol=1e-10)
    rets = alignkit.discounted_returns_packed(pr, pm, cu, gamma=0.9, backend=backend).cpu()
    expected = ref_discounted_returns(r, m, 0.9).reshape(-1)
    torch.testing.assert_close(rets[flat], expected[flat], rtol=1e-10, atol=1e-10)


def test_nan_at_a_live_position_stays_visible(backend, backend_device):
    r, v = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    m = torch.ones(2, 9)
    r[0, 5] = float("nan")
    d = backend_device
    adv, _ = alignkit.gae(r.to(d), v.to(d), m.to(d), gamma=0.9, lam=0.9, backend=backend)
    assert torch.isnan(adv[0, :6].cpu()).all() and torch.isfinite(adv[1].cpu()).all()
    rets = alignkit.discounted_returns(r.to(d), m.to(d), gamma=0.9, backend=backend).cpu()
    assert torch.isnan(rets[0, :6]).all() and torch.isfinite(rets[1]).all()


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match="values must have the shape of rewards"):
        alignkit.gae(r, torch.randn(2, 5), m)
    with pytest.raises(ValueError, match="mask must have the shape"):
        alignkit.gae(r, v, torch.ones(2, 3))
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        alignkit.gae(torch.randn(4), torch.randn(4), torch.ones(4))
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        alignkit.gae(torch.ones(2, 4, dtype=torch.int64), v, m)
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        alignkit.gae(r, v.numpy(), m)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        alignkit.gae(r, v, torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        alignkit.gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        alignkit.gae(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        alignkit.gae(r, v, m, lam=float("nan"))
    with pytest.raises(TypeError, match="whiten must be a bool"):
        alignkit.gae(r, v, m, whiten=1)
    with pytest.raises(ValueError, match="not differentiable"):
        alignkit.gae(r, v.requires_grad_(), m)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cpu"):
        alignkit.gae(r, r, m, backend="cuda")
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        alignkit.discounted_returns(r, m, gamma=2.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        alignkit.discounted_returns_packed(r[0], m[0], [0, 4], gamma=2.0)
    with pytest.raises(ValueError, match="rewards must be packed as"):
        alignkit.discounted_returns_packed(r, m, [0, 8])
    with pytest.raises(ValueError, match="not differentiable"):
        alignkit.discounted_returns_packed(r[0].clone().requires_grad_(), m[0], [0, 4])


def test_options_are_keyword_only():
    """Tensors positional, every other argument keyword-only (issue 9)."""
    r, m = torch.randn(2, 4), torch.ones(2, 4)
    with pytest.raises(TypeError):
        alignkit.gae(r, r, m, 0.9, 0.9)
    with pytest.raises(TypeError):
        alignkit.discounted_returns(r, m, 0.9)
    with pytest.raises(TypeError):
        alignkit.gae_packed(r[0], r[0], m[0], [0, 4], 0.9, 0.9)
    with pytest.raises(TypeError):
        alignkit.discounted_returns_packed(r[0], m[0], [0, 4], 0.9)


def test_meta_tensors_are_rejected():
    r = torch.randn(2, 4)
    with pytest.raises(ValueError, match="values must hold data"):
        alignkit.gae(r, torch.randn(2, 4, device="meta"), torch.ones(2, 4))


@pytest.mark.gpu
def test_device_mismatch_is_an_error():
    r = torch.randn(2, 4)
    with pytest.raises(ValueError, match="values must be on the device of rewards"):
        alignkit.gae(r, torch.randn(2, 4, device="cuda"), torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask must be on the device of rewards"):
        alignkit.discounted_returns(r, torch.ones(2, 4, device="cuda"))


BAD_CU_SEQLENS = [
    ([0, 3, 2, 6], "strictly increasing"),
    ([0, 3, 3, 6], "strictly increasing"),  # an empty sequence
    ([0, 0, 6], "strictly increasing"),
    ([0, 3, 5], "end at the packed length 6"),
    ([1, 6], "start at 0"),
    ([0], "at least 2"),
]


@pytest.mark.parametrize(("cu", "message"), BAD_CU_SEQLENS)
@pytest.mark.parametrize("form", ["tensor", "list", "numpy"])
def test_packed_ops_reject_bad_cu_seqlens(cu, message, form):
    x = torch.randn(6)
    cu = {"tensor": torch.tensor(cu), "list": cu, "numpy": np.array(cu)}[form]
    with pytest.raises(ValueError, match=f"cu_seqlens must .*{message}"):
        alignkit.gae_packed(x, x, torch.ones(6), cu, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=f"cu_seqlens must .*{message}"):
        alignkit.discounted_returns_packed(x, torch.ones(6), cu, gamma=1.0)


def test_packed_ops_reject_non_integer_cu_seqlens():
    x = torch.randn(6)
    for bad in (torch.tensor([0.0, 6.0]), np.array([0.0, 6.0]), [0.0, 6.0]):
        with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
            alignkit.gae_packed(x, x, torch.ones(6), bad, gamma=1.0, lam=1.0)
        with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
            alignkit.discounted_returns_packed(x, torch.ones(6), bad, gamma=1.0)
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer tensor"):
        alignkit.gae_packed(x, x, torch.ones(6), None, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        alignkit.gae_packed(x, x, torch.ones(6), torch.tensor([[0, 6]]), gamma=1.0, lam=1.0)


# ---- compiled on the GPU (bench/gpu.sh) --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), [(4, 32768), (256, 1024), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_gpu_large_against_float64(batch, length, dtype):
    """Few long rows split across programs, many short rows; the float64 numba path is the
    reference (itself checked against the loop oracle above)."""
    r, v = torch.randn(batch, length), torch.randn(batch, length)
    m = random_mask(batch, length, kind="padded")
    r64, v64 = r.to(dtype).double(), v.to(dtype).double()
    ref_adv, ref_ret = alignkit.gae(r64, v64, m, gamma=0.99, lam=0.95, backend="cpu")
    adv, ret = alignkit.gae(r.to(dtype).cuda(), v.to(dtype).cuda(), m.cuda(), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, rtol=1e-4, atol=1e-3)
    rets = alignkit.discounted_returns(r.to(dtype).cuda(), m.cuda(), gamma=0.99).cpu().double()
    torch.testing.assert_close(
        rets, alignkit.discounted_returns(r64, m, gamma=0.99, backend="cpu"), rtol=1e-4, atol=1e-3
    )
    lengths = [1, 7, 257, length]
    cu = _packed(lengths)
    flat, flat_m = torch.randn(sum(lengths)).to(dtype), (torch.rand(sum(lengths)) > 0.2)
    got = alignkit.discounted_returns_packed(flat.cuda(), flat_m.cuda(), cu, gamma=0.99).cpu().double()
    expected = alignkit.discounted_returns_packed(flat.double(), flat_m, cu, gamma=0.99, backend="cpu")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
