"""GAE, packed GAE and discounted returns against float64 Python-loop oracles, on both backends."""

from __future__ import annotations

import pytest
import torch

import alignkit
from alignkit.kernels import gae as gae_kernels


def gae_oracle(r, v, m, gamma, lam):
    """verl's compute_gae_advantage_return loop (without whitening), in float64."""
    r, v, m = r.double(), v.double(), m.double()
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        nv = last = 0.0
        for t in reversed(range(r.shape[1])):
            delta = r[b, t] + gamma * nv - v[b, t]
            step = delta + gamma * lam * last
            nv = m[b, t] * v[b, t] + (1 - m[b, t]) * nv
            last = m[b, t] * step + (1 - m[b, t]) * last
            adv[b, t] = last
    return adv, adv + v


def returns_oracle(r, m, gamma):
    r, m = r.double(), m.double()
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        g = 0.0
        for t in reversed(range(r.shape[1])):
            g = r[b, t] + gamma * g
            out[b, t] = g
            g = g * m[b, t]
    return out


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
    ref_adv, ref_ret = gae_oracle(r, v, m, gamma, lam)
    d = backend_device
    adv, ret = alignkit.gae(r.to(d), v.to(d), m.to(d), gamma, lam, backend=backend)
    adv, ret = adv.cpu(), ret.cpu()
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)
    # fp32 inputs: fp32 outputs, no worse than fp32 rounding of a sum of T terms
    adv32, ret32 = alignkit.gae(r.float().to(d), v.float().to(d), m.bool().to(d), gamma, lam, backend=backend)
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
    ref_adv, ref_ret = gae_oracle(r, v, m, 0.99, 0.95)
    adv, ret = alignkit.gae(r, v, m, 0.99, 0.95, backend="cpu")
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gae_half_inputs_accumulate_in_fp32(backend, backend_device, dtype):
    r, v = torch.randn(4, 100).to(dtype), torch.randn(4, 100).to(dtype)
    m = random_mask(4, 100)
    ref_adv, ref_ret = gae_oracle(r.double(), v.double(), m, 0.99, 0.95)
    d = backend_device
    adv, ret = (
        x.cpu() for x in alignkit.gae(r.to(d), v.to(d), m.to(dtype).to(d), 0.99, 0.95, backend=backend)
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
    ref_adv, ref_ret = gae_oracle(r, v, m, *gamma_lam)
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
    ref_adv, ref_ret = gae_oracle(r, v, m, 1.0, 0.95)
    # verl: masked_whiten(advantages, response_mask) with unbiased masked variance; returns unwhitened
    n = m.sum()
    mean = (ref_adv * m).sum() / n
    var = (m * (ref_adv - mean) ** 2).sum() / n * n / (n - 1)
    expected = (ref_adv - mean) * torch.rsqrt(var + 1e-8)
    d = backend_device
    adv, ret = (
        x.cpu() for x in alignkit.gae(r.to(d), v.to(d), m.to(d), 1.0, 0.95, whiten=True, backend=backend)
    )
    torch.testing.assert_close(adv, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [[1], [5, 1, 17], [40, 0, 3, 90]])
def test_gae_packed_equals_padded(backend, backend_device, lengths):
    rows, width = len(lengths), max(lengths)
    r, v = torch.randn(rows, width, dtype=torch.float64), torch.randn(rows, width, dtype=torch.float64)
    m = random_mask(rows, width)
    for b, n in enumerate(lengths):
        m[b, n:] = 0
        r[b, n:] = 0
        v[b, n:] = 0
    ref_adv, ref_ret = gae_oracle(r, v, m, 0.97, 0.9)
    pack = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths)])  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    d = backend_device
    adv, ret = (
        x.cpu()
        for x in alignkit.gae_packed(
            pack(r).to(d), pack(v).to(d), pack(m).to(d), cu, 0.97, 0.9, backend=backend
        )
    )
    torch.testing.assert_close(adv, pack(ref_adv), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, pack(ref_ret), rtol=1e-10, atol=1e-10)


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
        ref_adv, ref_ret = gae_oracle(r[:, sl], v[:, sl], m[:, sl], 0.99, 0.95)
        torch.testing.assert_close(adv[:, sl], ref_adv, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ret[:, sl], ref_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (4, 130)])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_matches_oracle(backend, backend_device, shape, gamma):
    r = torch.randn(*shape, dtype=torch.float64)
    m = random_mask(*shape)
    d = backend_device
    out = alignkit.discounted_returns(r.to(d), m.to(d), gamma, backend=backend).cpu()
    torch.testing.assert_close(out, returns_oracle(r, m, gamma), rtol=1e-10, atol=1e-10)
    out32 = alignkit.discounted_returns(r.float().to(d), m.float().to(d), gamma, backend=backend).cpu()
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), returns_oracle(r, m, gamma), rtol=1e-4, atol=1e-4)


def test_empty_batch(backend, backend_device):
    r = torch.zeros(0, 5, device=backend_device)
    adv, ret = alignkit.gae(r, r, r, backend=backend)
    assert adv.shape == ret.shape == (0, 5)


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
    with pytest.raises(ValueError, match="not differentiable"):
        alignkit.gae(r, v.requires_grad_(), m)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cpu"):
        alignkit.gae(r, r, m, backend="cuda")
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        alignkit.discounted_returns(r, m, gamma=2.0)


def test_device_mismatch_is_an_error():
    r = torch.randn(2, 4)
    with pytest.raises(ValueError, match="must be on the device of rewards"):
        alignkit.gae(r, torch.randn(2, 4, device="meta"), torch.ones(2, 4))


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        ([0, 3, 2, 6], "non-decreasing"),
        ([0, 3, 5], "end at the packed length 6"),
        ([1, 6], "start at 0"),
        ([0], "at least 2"),
    ],
)
def test_gae_packed_rejects_bad_cu_seqlens(cu, message):
    x = torch.randn(6)
    with pytest.raises(ValueError, match=message):
        alignkit.gae_packed(x, x, torch.ones(6), torch.tensor(cu), 1.0, 1.0)


def test_gae_packed_rejects_float_cu_seqlens():
    x = torch.randn(6)
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32/int64 tensor"):
        alignkit.gae_packed(x, x, torch.ones(6), torch.tensor([0.0, 6.0]), 1.0, 1.0)


# ---- compiled on the GPU (bench/gpu.sh) --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), [(4, 32768), (256, 1024), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_gpu_large_against_float64(batch, length, dtype):
    """Few long rows split across programs, many short rows; the float64 numba path is the
    reference (itself checked against the loop oracle above)."""
    r, v = torch.randn(batch, length), torch.randn(batch, length)
    m = random_mask(batch, length, kind="padded")
    ref_adv, ref_ret = alignkit.gae(r.to(dtype).double(), v.to(dtype).double(), m, 0.99, 0.95, backend="cpu")
    adv, ret = alignkit.gae(r.to(dtype).cuda(), v.to(dtype).cuda(), m.cuda(), 0.99, 0.95)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, rtol=1e-4, atol=1e-3)
    rets = alignkit.discounted_returns(r.to(dtype).cuda(), m.cuda(), 0.99).cpu().double()
    torch.testing.assert_close(
        rets, alignkit.discounted_returns(r.to(dtype).double(), m, 0.99, backend="cpu"), rtol=1e-4, atol=1e-3
    )
