"""token_logprobs / fused_linear_logprobs against the float64 oracle of tests/oracles.py
(docs/formulas.md, "Log-probs and entropy"), on both backends (Triton under the interpreter without
CUDA: small sizes, fp32 for the tl.dot kernels, whose bf16 products the interpreter does not
emulate)."""

from __future__ import annotations

import pytest
import torch
from oracles import IGNORE, ref_logprobs
from torch.utils._python_dispatch import TorchDispatchMode

import alignkit
from alignkit.kernels import fused_logprobs as fused_kernels
from alignkit.kernels import logprobs as kernels


def make_labels(shape, vocab, ignored=0.2):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignored] = IGNORE
    return labels


def grads_of(fn, inputs, g_logp, g_ent):
    """Gradients of sum(g_logp logp + g_ent H) w.r.t. ``inputs`` (fn returns (logp, H))."""
    logp, ent = fn()
    loss = (logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()
    return torch.autograd.grad(loss, inputs), (logp, ent)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_no_worse(fast, plain, exact, tol, what):
    """The fast path's error against fp64 is at most plain PyTorch's (same dtype) plus tol."""
    e_fast, e_plain = max_err(fast, exact), max_err(plain, exact)
    assert e_fast <= e_plain + tol, f"{what}: error {e_fast:.3g} vs plain torch {e_plain:.3g} (+{tol})"


def check_invariants(logp, ent):
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all(), logp.max()
    assert (ent >= 0).all(), ent.min()


# ------------------------------------------------------------------ token_logprobs

TOKEN_SHAPES = {
    "cpu": [(1, 1), (7, 3), (257, 3), (7, 50257), (2, 3, 1000)],
    "triton": [(1, 1), (7, 3), (33, 300), (2, 3, 70), (5, 257)],
}


@pytest.mark.parametrize("case", range(5))
def test_token_logprobs_matches_fp64(backend, case):
    *lead, vocab = TOKEN_SHAPES[backend][case]
    logits = (3 * torch.randn(*lead, vocab)).requires_grad_()
    labels = make_labels(lead, vocab)
    temperature = 0.7
    g_logp, g_ent = torch.randn(lead, dtype=torch.float64), torch.randn(lead, dtype=torch.float64)

    (d_fast,), (logp, ent) = grads_of(
        lambda: alignkit.token_logprobs(
            logits, labels, temperature=temperature, return_entropy=True, backend=backend
        ),
        [logits], g_logp, g_ent,
    )  # fmt: skip
    (d_plain,), (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(logits, labels, temperature, dtype=torch.float32), [logits], g_logp, g_ent
    )
    exact64 = logits.detach().double().requires_grad_()
    (d_exact,), (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact64, labels, temperature), [exact64], g_logp, g_ent
    )
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_no_worse(logp, lp_plain, lp_exact, 1e-5, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-5, "entropy")
    assert_no_worse(d_fast, d_plain, d_exact, 5e-4, "d logits")
    check_invariants(logp, ent)
    # ignored positions: 0 and no gradient
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (d_fast[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_half_precision(backend, dtype):
    logits = (4 * torch.randn(9, 130)).to(dtype).requires_grad_()
    labels = make_labels((9,), 130)
    g_logp, g_ent = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    (d_fast,), (logp, ent) = grads_of(
        lambda: alignkit.token_logprobs(logits, labels, return_entropy=True, backend=backend),
        [logits], g_logp, g_ent,
    )  # fmt: skip
    (d_plain,), (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(logits, labels, dtype=dtype), [logits], g_logp, g_ent
    )
    exact64 = logits.detach().double().requires_grad_()
    (d_exact,), (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact64, labels), [exact64], g_logp, g_ent
    )
    assert logp.dtype == torch.float32 and d_fast.dtype == dtype
    assert_no_worse(logp, lp_plain, lp_exact, 1e-2, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-2, "entropy")
    assert_no_worse(d_fast, d_plain, d_exact, 1e-2, "d logits")
    check_invariants(logp, ent)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_token_logprobs_extremes(backend, temperature, scale):
    vocab = 50 if backend == "triton" else 5000
    logits = (scale * torch.randn(6, vocab)).requires_grad_()
    logits.data[0, :] = scale  # a flat row: maximal entropy log V
    labels = make_labels((6,), vocab, ignored=0.0)
    logp, ent = alignkit.token_logprobs(
        logits, labels, temperature=temperature, return_entropy=True, backend=backend
    )
    check_invariants(logp, ent)
    lp_exact, ent_exact = ref_logprobs(logits.detach(), labels, temperature)
    lp_plain, ent_plain = ref_logprobs(logits.detach(), labels, temperature, dtype=torch.float32)
    # logp reaches -3e5 here: allow two fp32 ulps of the result on top of plain torch's error
    tol = 1e-5 + 2.4e-7 * lp_exact.abs().max().item()
    assert_no_worse(logp, lp_plain, lp_exact, tol, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, tol, "entropy")
    assert ent[0].item() == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), abs=1e-4)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_token_logprobs_vocab_of_one(backend):
    logits = torch.randn(4, 1, requires_grad=True)
    labels = torch.tensor([0, 0, IGNORE, 0])
    logp, ent = alignkit.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (logits.grad == 0).all()


def test_token_logprobs_inplace_backward(backend):
    base = torch.randn(12, 40, requires_grad=True)
    labels = make_labels((12,), 40)
    g = torch.randn(12)
    expected = torch.autograd.grad(
        (alignkit.token_logprobs(base * 2, labels, backend=backend) * g).sum(), base
    )[0]
    logits = base * 2  # an intermediate, as an lm_head output would be
    ptr = logits.data_ptr()
    captured = {}

    def remember(grad):
        captured["ptr"] = grad.data_ptr()

    logits.register_hook(remember)
    logp = alignkit.token_logprobs(logits, labels, inplace_backward=True, backend=backend)
    (got,) = torch.autograd.grad((logp * g).sum(), base)
    assert captured["ptr"] == ptr  # d logits was written over the logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_token_logprobs_masked_vocabulary(backend):
    """Logits of -inf (a masked vocabulary, top-k/top-p processing) contribute 0 log 0 = 0: finite
    entropy and gradients equal to the oracle on the finite columns, 0 on the masked ones."""
    vocab, live = 40, 11
    x = torch.randn(6, vocab, dtype=torch.float32)
    x[:, live:] = float("-inf")
    x[2, 5] = float("-inf")  # a masked column inside the live block too
    labels = torch.randint(0, 5, (6,))
    g_logp, g_ent = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    xf = x.clone().requires_grad_()
    (grad,), (logp, ent) = grads_of(
        lambda: alignkit.token_logprobs(xf, labels, temperature=0.7, return_entropy=True, backend=backend),
        [xf], g_logp, g_ent,
    )  # fmt: skip
    check_invariants(logp, ent)
    assert torch.isfinite(grad).all()
    # oracle on the live columns; row 2's masked live column is left out of its row by a large negative
    ref = x[:, :live].double().clone()
    ref[2, 5] = -1e4
    ref.requires_grad_()
    (ref_grad,), (ref_logp, ref_ent) = grads_of(lambda: ref_logprobs(ref, labels, 0.7), [ref], g_logp, g_ent)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, :live].double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert (grad[:, live:] == 0).all() and grad[2, 5] == 0


def test_fused_linear_logprobs_masked_vocabulary(backend):
    """A bias of -inf masks vocabulary entries: same values and gradients as the materialised path."""
    n, hdim, vocab = 9, 16, 50
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = torch.randn(vocab, hdim, requires_grad=True)
    bias = torch.zeros(vocab)
    bias[20:] = float("-inf")
    labels = torch.randint(0, 20, (n,))
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    fused_grads, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=4, backend=backend
        ),
        [hidden, weight], g_logp, g_ent,
    )  # fmt: skip
    check_invariants(logp, ent)
    ref_grads, (ref_logp, ref_ent) = grads_of(
        lambda: alignkit.token_logprobs(hidden @ weight.T + bias, labels, return_entropy=True, backend="cpu"),
        [hidden, weight], g_logp, g_ent,
    )  # fmt: skip
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_token_logprobs_gradcheck_fp64():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 2])

    def fn(x):
        return alignkit.token_logprobs(x, labels, temperature=0.6, return_entropy=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, (logits,))


# ------------------------------------------------------------------ fused_linear_logprobs

FUSED_SHAPES = {  # (N, H, V)
    "cpu": [(1, 24, 1), (7, 40, 3), (257, 40, 333), (7, 24, 50257)],
    "triton": [(1, 24, 1), (7, 40, 3), (37, 40, 150), (64, 48, 300)],
}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", range(4))
def test_fused_linear_logprobs_matches_fp64(backend, case, with_bias):
    n, hdim, vocab = FUSED_SHAPES[backend][case]
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = (torch.randn(vocab, hdim) / hdim**0.5 * 3).requires_grad_()
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    labels = make_labels((n,), vocab)
    temperature = 0.8
    params = [hidden, weight] + ([bias] if with_bias else [])
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    def logits_of(ps):
        z = ps[0] @ ps[1].T
        return z + ps[2] if with_bias else z

    fast_grads, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True, chunk_size=100,
            backend=backend,
        ),
        params, g_logp, g_ent,
    )  # fmt: skip
    plain_grads, (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(logits_of(params), labels, temperature, dtype=torch.float32),
        params,
        g_logp,
        g_ent,
    )
    exact = [p.detach().double().requires_grad_() for p in params]
    exact_grads, (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(logits_of(exact), labels, temperature), exact, g_logp, g_ent
    )
    assert_no_worse(logp, lp_plain, lp_exact, 1e-5, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-5, "entropy")
    for name, f, p, e in zip(
        ["d hidden", "d weight", "d bias"][: len(params)], fast_grads, plain_grads, exact_grads, strict=True
    ):
        assert f.dtype == torch.float32
        assert_no_worse(f, p, e, 5e-4, name)
    check_invariants(logp, ent)
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (fast_grads[0][ignored] == 0).all()


def test_fused_linear_logprobs_leading_dims_and_chunks(backend):
    hidden = torch.randn(2, 5, 24)
    weight = torch.randn(70, 24) / 5
    labels = make_labels((2, 5), 70)
    whole = alignkit.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    expected = ref_logprobs(hidden @ weight.T, labels)
    for got, exp in zip(whole, expected, strict=True):
        assert got.shape == (2, 5)
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-5)
    # chunking of the backward (1, 3 rows) changes nothing
    grads = []
    for chunk in (None, 1, 3):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, ent = alignkit.fused_linear_logprobs(
            h, w, labels, return_entropy=True, chunk_size=chunk, backend=backend
        )
        (logp.sum() - 0.1 * ent.sum()).backward()
        grads.append((h.grad, w.grad))
    for h_grad, w_grad in grads[1:]:
        torch.testing.assert_close(h_grad, grads[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w_grad, grads[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [2, 3, 100])
def test_fused_kernel_vocabulary_splits(device, splits):
    """Split-vocabulary programs (partial statistics combined on the host) match one split."""
    hidden, weight, bias = torch.randn(20, 40), torch.randn(250, 40) / 4, torch.randn(250)
    labels = make_labels((20,), 250)
    hidden, weight, bias, labels = (t.to(device) for t in (hidden, weight, bias, labels))
    one = fused_kernels.fused_linear_logprobs_fwd(hidden, weight, bias, labels, 1.3, IGNORE, splits=1)
    many = fused_kernels.fused_linear_logprobs_fwd(hidden, weight, bias, labels, 1.3, IGNORE, splits=splits)
    exact = ref_logprobs(hidden @ weight.T + bias, labels, 1.3)
    for a, b, e in zip(one[:2], many[:2], exact, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        torch.testing.assert_close(b.double(), e, rtol=0, atol=1e-5)
    assert all(t.device == hidden.device for t in many)


def _launch_time(n_rows, vocab, block_n, block_v, sm_count, splits):
    """Tile-times of a forward launch with ``splits`` splits, one resident program per SM (the
    model of forward_splits, written plainly): whole waves x tiles of the longest program."""
    row_blocks = -(-n_rows // block_n)
    tiles = -(-vocab // block_v)
    waves = -(-(row_blocks * splits) // sm_count)
    return waves * -(-tiles // splits)


@pytest.mark.parametrize(
    "shape",
    [
        (4096, 152064, 128, 128, 132),  # Qwen vocabulary, N = 4096: the case of issue 15
        (4096, 151936, 64, 256, 132),
        (16384, 152064, 128, 128, 132),
        (300, 50257, 128, 128, 132),  # GPT-2 vocabulary, a partial row block
        (1, 32000, 128, 64, 114),  # one row, H100 PCIe SM count
        (2048, 129280, 128, 128, 78),
        (37, 150, 16, 32, 132),  # the interpreter tests' shapes
        (5, 1, 16, 32, 132),  # vocab of one
    ],
)
def test_forward_splits_fill_whole_waves(shape):
    """forward_splits picks the least launch time of all split counts (fewest on ties), never an
    empty split, and beats the former choice (enough programs for two waves)."""
    n, vocab, block_n, block_v, sms = shape
    tiles = -(-vocab // block_v)
    splits = fused_kernels.forward_splits(n, vocab, block_n, block_v, sms)
    assert 1 <= splits <= tiles
    assert -(-tiles // -(-tiles // splits)) == splits  # every split gets at least one tile
    times = {s: _launch_time(n, vocab, block_n, block_v, sms, s) for s in range(1, tiles + 1)}
    best = min(times.values())
    assert times[splits] == best and splits == min(s for s, t in times.items() if t == best)
    former = min(-(-2 * sms // -(-n // 128)), tiles)
    assert times[splits] <= times[former]


def test_forward_splits_no_partial_last_wave_at_n4096():
    """N = 4096, V = 152k, 128 x 128 tiles on 132 SMs: formerly 9 splits, 288 programs = 2.2 waves
    run as 3; now a whole number of waves at the ideal time (N V / (tiles x SMs))."""
    splits = fused_kernels.forward_splits(4096, 152064, 128, 128, 132)
    programs = 32 * splits
    assert programs != 288 and programs % 132 == 0, programs
    assert _launch_time(4096, 152064, 128, 128, 132, splits) == 32 * 1188 // 132
    assert _launch_time(4096, 152064, 128, 128, 132, 9) == 3 * 132  # the former split: 37.5% slower
    assert fused_kernels.forward_splits(0, 10, 16, 32, 132) == 1
    with pytest.raises(ValueError, match="sm_count"):
        fused_kernels.forward_splits(4, 10, 16, 32, 0)
    assert fused_kernels.sm_count(torch.device("cpu")) == fused_kernels.DEFAULT_SM_COUNT == 132


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("splits", [None, 2, 3])
def test_fused_forward_swizzle_does_not_change_results(backend, backend_device, splits):
    """The GROUP_N swizzle is a bijection of program ids onto (row block, split): bit-identical
    results for every GROUP_N (1 = no swizzle; 2 leaves a partial last group of row blocks), at odd
    sizes (37 rows: a partial row block; V = 150 and H = 40: partial vocabulary and H tiles), and
    all of them on the fp64 oracle."""
    n, hdim, vocab = 37, 40, 150
    dev = backend_device
    hidden, weight = torch.randn(n, hdim, device=dev), torch.randn(vocab, hdim, device=dev) / 4
    bias = torch.randn(vocab, device=dev)
    labels = make_labels((n,), vocab).to(dev)
    floor = torch.full((n,), -3.0, device=dev)
    floor[::4] = -float("inf")
    exact = ref_logprobs(hidden @ weight.T + bias, labels, 0.9)
    results = [
        fused_kernels.fused_linear_logprobs_fwd(
            hidden, weight, bias, labels, 0.9, IGNORE, splits=splits, group_n=group_n, logit_floor=floor
        )
        for group_n in (1, 2, 8)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    unfloored = fused_kernels.fused_linear_logprobs_fwd(
        hidden, weight, bias, labels, 0.9, IGNORE, splits=splits
    )
    for got, want in zip(unfloored[:2], exact, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(("group_n", "sms"), [(2, 1), (1, 132), (8, 132)])
def test_fused_linear_logprobs_split_grid_matches_fp64(monkeypatch, backend, backend_device, group_n, sms):
    """The op through the new forward grid (one split on 1 SM; five, one per vocabulary tile, on
    132; with and without the swizzle): logp, entropy and every gradient against the fp64 oracle."""
    monkeypatch.setattr(fused_kernels, "GROUP_N", group_n)
    monkeypatch.setattr(fused_kernels, "DEFAULT_SM_COUNT", sms)  # the interpreter's SM count
    n, hdim, vocab = 37, 40, 150
    dev = backend_device
    hidden = torch.randn(n, hdim, device=dev, requires_grad=True)
    weight = (torch.randn(vocab, hdim, device=dev) / hdim**0.5 * 3).requires_grad_()
    bias = torch.randn(vocab, device=dev, requires_grad=True)
    labels = make_labels((n,), vocab).to(dev)
    params = [hidden, weight, bias]
    g_logp, g_ent = (torch.randn(n, dtype=torch.float64, device=dev) for _ in range(2))
    fast, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=0.8, return_entropy=True, chunk_size=16,
            backend=backend,
        ),
        params, g_logp, g_ent,
    )  # fmt: skip
    plain, (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(hidden @ weight.T + bias, labels, 0.8, dtype=torch.float32),
        params, g_logp, g_ent,
    )  # fmt: skip
    exact = [p.detach().double().requires_grad_() for p in params]
    ref, (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact[0] @ exact[1].T + exact[2], labels, 0.8), exact, g_logp, g_ent
    )
    assert_no_worse(logp, lp_plain, lp_exact, 1e-5, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-5, "entropy")
    for name, f, p, e in zip(["d hidden", "d weight", "d bias"], fast, plain, ref, strict=True):
        assert_no_worse(f, p, e, 5e-4, name)
    check_invariants(logp, ent)


class _SweepingTuner:
    """Stands in for triton.autotune under the interpreter: launches every config in turn into the
    same buffers, as autotuning does before it settles on one (here the last)."""

    def __init__(self, configs):
        self.configs = configs

    def __getitem__(self, grid):
        def launch(*args, **flags):
            for cfg in self.configs:
                meta = {**flags, **cfg.kwargs}
                fused_kernels._fused_linear_logprobs_fwd_kernel[grid(meta)](*args, **flags, **cfg.kwargs)

        return launch


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_autotuned_forward_configs_with_fewer_splits(monkeypatch, backend, backend_device):
    """The partial buffers are sized for the config with the most splits; a launch with fewer (a
    config of wider tiles, after autotuning ran another into the same buffers) fills the rows it
    does not own with neutral statistics, so no stale split is counted twice."""
    import triton

    configs = [  # 10 splits of 16 columns, then 5 of 32 (V = 150, one wave of programs)
        triton.Config({"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_H": 16}),
        triton.Config({"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_H": 16}),
    ]
    n, hdim, vocab = 37, 24, 150
    dev = backend_device
    hidden, weight = torch.randn(n, hdim, device=dev), torch.randn(vocab, hdim, device=dev) / 3
    labels = make_labels((n,), vocab).to(dev)
    expected = fused_kernels.fused_linear_logprobs_fwd(hidden, weight, None, labels, 1.0, IGNORE)
    assert fused_kernels.forward_splits(n, vocab, 16, 16, 132) == 10
    assert fused_kernels.forward_splits(n, vocab, 32, 32, 132) == 5
    monkeypatch.setattr(fused_kernels, "_blocks", lambda blocks: {})
    monkeypatch.setattr(fused_kernels, "_autotuned", lambda *args: _SweepingTuner(configs))
    got = fused_kernels.fused_linear_logprobs_fwd(hidden, weight, None, labels, 1.0, IGNORE)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("temperature", [0.1, 10.0])
def test_fused_linear_logprobs_extremes(backend, temperature):
    n, hdim, vocab = 9, 24, 90
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = (torch.randn(vocab, hdim) * 2e3).requires_grad_()  # logits of magnitude ~1e4
    labels = make_labels((n,), vocab, ignored=0.0)
    logp, ent = alignkit.fused_linear_logprobs(
        hidden, weight, labels, temperature=temperature, return_entropy=True, backend=backend
    )
    check_invariants(logp, ent)
    lp_exact, ent_exact = ref_logprobs(
        hidden.detach().double() @ weight.detach().double().T, labels, temperature
    )
    # logits ~1e4 formed in fp32 carry absolute error ~1e-3 before division by T
    tol = 2e-2 / temperature
    assert max_err(logp, lp_exact) <= tol and max_err(ent, ent_exact) <= tol
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_fused_linear_logprobs_vocab_of_one_and_all_ignored(backend):
    hidden = torch.randn(3, 24, requires_grad=True)
    weight = torch.randn(1, 24, requires_grad=True)
    logp, ent = alignkit.fused_linear_logprobs(
        hidden, weight, torch.zeros(3, dtype=torch.long), return_entropy=True, backend=backend
    )
    assert (logp == 0).all() and (ent == 0).all()
    weight2 = torch.randn(20, 24, requires_grad=True)
    labels = torch.full((3,), IGNORE)
    logp2 = alignkit.fused_linear_logprobs(hidden, weight2, labels, backend=backend)
    (logp.sum() + ent.sum() + logp2.sum()).backward()
    assert (logp2 == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (weight2.grad == 0).all()


def test_fused_linear_logprobs_gradcheck_fp64():
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 2, 2])

    def fn(h, w, b):
        return alignkit.fused_linear_logprobs(
            h, w, labels, bias=b, temperature=1.7, return_entropy=True, chunk_size=4, backend="cpu"
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_linear_logprobs_bf16_cpu():
    hidden = torch.randn(33, 40).bfloat16().requires_grad_()
    weight = (torch.randn(500, 40) / 3).bfloat16().requires_grad_()
    labels = make_labels((33,), 500)
    g_logp, g_ent = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    fast, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend="cpu"),
        [hidden, weight], g_logp, g_ent,
    )  # fmt: skip
    plain, (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(hidden @ weight.T, labels, dtype=torch.bfloat16), [hidden, weight], g_logp, g_ent
    )
    exact = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref, (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact[0] @ exact[1].T, labels), exact, g_logp, g_ent
    )
    assert_no_worse(logp, lp_plain, lp_exact, 1e-2, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-2, "entropy")
    for f, p, e in zip(fast, plain, ref, strict=True):
        assert f.dtype == torch.bfloat16
        assert_no_worse(f, p, e, 1e-2, "grad")


class _LargestAllocation(TorchDispatchMode):
    """Records the largest floating-point tensor (in elements) any torch op produces while active
    (the Triton interpreter's byte-storage copies of its arguments are uint8 and not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_linear_logprobs_never_forms_the_logits(backend):
    n, hdim, vocab, chunk = 64, 16, 300, 8
    hidden = torch.randn(n, hdim, requires_grad=True)
    weight = torch.randn(vocab, hdim, requires_grad=True)
    labels = make_labels((n,), vocab)
    with _LargestAllocation() as probe:
        logp, ent = alignkit.fused_linear_logprobs(
            hidden, weight, labels, return_entropy=True, chunk_size=chunk, backend=backend
        )
        (logp.sum() + ent.sum()).backward()
    assert probe.largest <= max(chunk * vocab, vocab * hdim), probe.largest
    assert probe.largest < n * vocab


# The Triton interpreter computes with NumPy, which warns on the NaN/inf arithmetic of rows that are
# selected away afterwards (compiled kernels compute those dead lanes silently).
ignore_dead_lane_warnings = pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero|All-NaN slice) encountered:RuntimeWarning"
)


@ignore_dead_lane_warnings
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_token_logprobs_garbage_at_ignored_positions_does_not_leak(backend, fill, inplace_backward):
    """Logits rows whose label is ignore_index (padding) may hold NaN/inf: every live output and
    gradient is that of clean inputs, and the ignored rows get logp = H = 0 and d logits = 0."""
    logits = 3 * torch.randn(8, 40)
    labels = make_labels((8,), 40, ignored=0.4)
    labels[:2] = torch.tensor([IGNORE, 3])
    ignored = labels == IGNORE
    g_logp, g_ent = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    results = []
    for data in (logits, logits.masked_fill(ignored[:, None], fill)):
        leaf = data.clone().requires_grad_()
        x = leaf * 1.0 if inplace_backward else leaf  # inplace_backward needs a non-leaf
        (grad,), (logp, ent) = grads_of(
            lambda x=x: alignkit.token_logprobs(
                x, labels, temperature=0.8, return_entropy=True, inplace_backward=inplace_backward,
                backend=backend,
            ),
            [leaf], g_logp, g_ent,
        )  # fmt: skip
        results.append((logp, ent, grad))
    (logp, ent, grad), (dirty_logp, dirty_ent, dirty_grad) = results
    assert torch.equal(dirty_logp, logp) and torch.equal(dirty_ent, ent)
    assert torch.equal(dirty_grad[~ignored], grad[~ignored])
    assert (dirty_grad[ignored] == 0).all()
    check_invariants(dirty_logp, dirty_ent)


@ignore_dead_lane_warnings
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_linear_logprobs_garbage_at_ignored_positions_does_not_leak(backend, fill, chunk_size):
    """Hidden states whose label is ignore_index may hold NaN/inf: logp, entropy, d hidden at live
    rows, d weight and d bias are those of clean inputs; ignored rows get 0 and no gradient."""
    n, hdim, vocab = 11, 16, 50
    hidden, weight, bias = torch.randn(n, hdim), torch.randn(vocab, hdim) / 3, torch.randn(vocab)
    labels = make_labels((n,), vocab, ignored=0.4)
    labels[:2] = torch.tensor([IGNORE, 3])
    ignored = labels == IGNORE
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    results = []
    for data in (hidden, hidden.masked_fill(ignored[:, None], fill)):
        params = [
            data.clone().requires_grad_(),
            weight.clone().requires_grad_(),
            bias.clone().requires_grad_(),
        ]
        grads, (logp, ent) = grads_of(
            lambda p=params: alignkit.fused_linear_logprobs(
                p[0], p[1], labels, bias=p[2], return_entropy=True, chunk_size=chunk_size, backend=backend
            ),
            params, g_logp, g_ent,
        )  # fmt: skip
        results.append((logp, ent, grads))
    (logp, ent, grads), (dirty_logp, dirty_ent, dirty_grads) = results
    assert torch.equal(dirty_logp, logp) and torch.equal(dirty_ent, ent)
    assert torch.equal(dirty_grads[0][~ignored], grads[0][~ignored]), "d hidden"
    assert (dirty_grads[0][ignored] == 0).all()
    for name, clean, dirty in zip(("d weight", "d bias"), grads[1:], dirty_grads[1:], strict=True):
        assert torch.isfinite(dirty).all(), name
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument():
    h, w, lab = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    f = alignkit.fused_linear_logprobs
    with pytest.raises(ValueError, match="weight"):
        f(h, torch.randn(10, 9), lab)
    with pytest.raises(ValueError, match="labels"):
        f(h, w, torch.randint(0, 10, (5,)))
    with pytest.raises(ValueError, match="labels"):
        f(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="labels"):
        f(h, w, torch.tensor([0, 1, -5, 2]))
    with pytest.raises(TypeError, match="labels"):
        f(h, w, lab.float())
    with pytest.raises(TypeError, match="hidden"):
        f(torch.randint(0, 3, (4, 8)), w, lab)
    with pytest.raises(TypeError, match="weight"):
        f(h, w.double(), lab)
    with pytest.raises(ValueError, match="bias"):
        f(h, w, lab, bias=torch.randn(11))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            f(h, w, lab, temperature=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        f(h, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        f(h, w, lab, backend="cuda")
    t = alignkit.token_logprobs
    with pytest.raises(ValueError, match="labels"):
        t(torch.randn(4, 10), torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        t(torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        t(torch.zeros(4, 10, dtype=torch.long), lab)
    with pytest.raises(ValueError, match="logits"):
        t(torch.randn(4, 0), lab)
    with pytest.raises(ValueError, match="temperature"):
        t(torch.randn(4, 10), lab, temperature=0)
    with pytest.raises(TypeError, match="ignore_index"):
        t(torch.randn(4, 10), lab, ignore_index=1.5)


def test_unchecked_out_of_range_labels_give_nan(backend):
    """With the range check off (the CUDA default), a bad label is NaN, never a plausible number."""
    labels = torch.tensor([0, 12, -3, IGNORE])
    logp = alignkit.token_logprobs(torch.randn(4, 12), labels, check_labels=False, backend=backend)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()
    logp = alignkit.fused_linear_logprobs(
        torch.randn(4, 16), torch.randn(12, 16), labels, check_labels=False, backend=backend
    )
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()


# ------------------------------------------------------------------ GPU (compiled kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 1), (257, 200, 50257), (1000, 512, 4099)])
def test_fused_linear_logprobs_gpu(dtype, shape):
    n, hdim, vocab = shape
    hidden = torch.randn(n, hdim, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, device="cuda") / hdim**0.5 * 3).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device="cuda").to(dtype).requires_grad_()
    labels = make_labels((n,), vocab).cuda()
    params = [hidden, weight, bias]
    g_logp, g_ent = (torch.randn(n, dtype=torch.float64, device="cuda") for _ in range(2))
    fast, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True
        ),
        params, g_logp, g_ent,
    )  # fmt: skip
    plain, (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(hidden @ weight.T + bias, labels, 0.9, dtype=dtype), params, g_logp, g_ent
    )
    exact = [p.detach().double().requires_grad_() for p in params]
    ref, (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact[0] @ exact[1].T + exact[2], labels, 0.9), exact, g_logp, g_ent
    )
    tol_f, tol_g = (1e-5, 5e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    assert_no_worse(logp, lp_plain, lp_exact, tol_f, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, tol_f, "entropy")
    for name, f, p, e in zip(["d hidden", "d weight", "d bias"], fast, plain, ref, strict=True):
        assert_no_worse(f, p, e, tol_g, name)
    check_invariants(logp, ent)


@pytest.mark.gpu
def test_token_logprobs_gpu_and_opt_in_label_check():
    logits = torch.randn(300, 50257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = make_labels((300,), 50257).cuda()
    logp, ent = alignkit.token_logprobs(logits, labels, return_entropy=True)
    lp_exact, ent_exact = ref_logprobs(logits.detach(), labels)
    assert max_err(logp, lp_exact) <= 1e-3 and max_err(ent, ent_exact) <= 1e-3
    check_invariants(logp, ent)
    bad = labels.clone()
    bad[5] = 50257
    with pytest.raises(ValueError, match="labels"):
        alignkit.token_logprobs(logits, bad, check_labels=True)
    assert torch.isnan(alignkit.token_logprobs(logits, bad)[5])


def test_logp_only_path_matches_fp64(backend):
    """Without return_entropy the CPU path skips the entropy passes; logp and its gradients agree."""
    hidden = torch.randn(19, 24, requires_grad=True)
    weight = torch.randn(60, 24, requires_grad=True)
    labels = make_labels((19,), 60)
    g = torch.randn(19, dtype=torch.float64)
    logp = alignkit.fused_linear_logprobs(hidden, weight, labels, temperature=1.5, backend=backend)
    d_h, d_w = torch.autograd.grad((logp.double() * g).sum(), [hidden, weight])
    logits = (hidden @ weight.T).detach().requires_grad_()
    logp2 = alignkit.token_logprobs(logits, labels, temperature=1.5, backend=backend)
    (d_logits,) = torch.autograd.grad((logp2.double() * g).sum(), [logits])
    exact = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    lp_exact, _ = ref_logprobs(exact[0] @ exact[1].T, labels, 1.5)
    e_h, e_w = torch.autograd.grad((lp_exact * g).sum(), exact)
    logits64 = logits.detach().double().requires_grad_()
    (e_logits,) = torch.autograd.grad((ref_logprobs(logits64, labels, 1.5)[0] * g).sum(), [logits64])
    for got, exp in [(logp, lp_exact), (logp2, lp_exact), (d_h, e_h), (d_w, e_w), (d_logits, e_logits)]:
        assert max_err(got, exp) <= 1e-5 * max(1.0, exp.abs().max().item())


def test_fused_linear_logprobs_half_precision_both_backends(backend):
    """bf16 through either backend (the interpreter gets fp32 dot operands) vs the fp64 oracle."""
    hidden = torch.randn(21, 40).bfloat16().requires_grad_()
    weight = (torch.randn(120, 40) / 3).bfloat16().requires_grad_()
    bias = torch.randn(120).bfloat16().requires_grad_()
    labels = make_labels((21,), 120)
    params = [hidden, weight, bias]
    g_logp, g_ent = torch.randn(21, dtype=torch.float64), torch.randn(21, dtype=torch.float64)
    fast, (logp, ent) = grads_of(
        lambda: alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=8, backend=backend
        ),
        params, g_logp, g_ent,
    )  # fmt: skip
    exact = [p.detach().double().requires_grad_() for p in params]
    ref, (lp_exact, ent_exact) = grads_of(
        lambda: ref_logprobs(exact[0] @ exact[1].T + exact[2], labels), exact, g_logp, g_ent
    )
    plain, (lp_plain, ent_plain) = grads_of(
        lambda: ref_logprobs(hidden @ weight.T + bias, labels, dtype=torch.bfloat16), params, g_logp, g_ent
    )
    assert_no_worse(logp, lp_plain, lp_exact, 1e-2, "logp")
    assert_no_worse(ent, ent_plain, ent_exact, 1e-2, "entropy")
    for f, p, e in zip(fast, plain, ref, strict=True):
        assert f.dtype == torch.bfloat16
        assert_no_worse(f, p, e, 1e-2, "grad")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_fp64_on_the_triton_backend_takes_the_exact_path(backend, backend_device):
    hidden = torch.randn(5, 8, dtype=torch.float64, device=backend_device)
    weight = torch.randn(11, 8, dtype=torch.float64, device=backend_device)
    labels = torch.randint(0, 11, (5,), device=backend_device)
    got = alignkit.fused_linear_logprobs(hidden, weight, labels, backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_logprobs(hidden @ weight.T, labels)[0], rtol=0, atol=1e-12)


def test_matmul_configs_fit_sm90_shared_memory():
    """Pipelined operand tiles take (stages - 1) (BLOCK_N + BLOCK_V) BLOCK_H itemsize bytes of shared
    memory; every autotune config fits sm_90's 232,448. fp32 has its own list of smaller tiles (ieee
    and tf32 fp32 dots spill and compile slowly at the bf16 sizes)."""
    for dtype, itemsize in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
        configs = fused_kernels._matmul_configs(dtype)
        assert configs
        for cfg in configs:
            kw = cfg.kwargs
            smem = (cfg.num_stages - 1) * (kw["BLOCK_N"] + kw["BLOCK_V"]) * kw["BLOCK_H"] * itemsize
            assert smem <= 232_448, (dtype, cfg)
    volume = [
        [
            c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] * c.kwargs["BLOCK_H"]
            for c in fused_kernels._matmul_configs(d)
        ]
        for d in (torch.float32, torch.bfloat16)
    ]
    assert max(volume[0]) < volume[1][0]  # every fp32 tile smaller than the pinned bf16 one
    assert all(c.kwargs["BLOCK_H"] <= 32 for c in fused_kernels._matmul_configs(torch.float32))


@pytest.fixture
def matmul_precision():
    """Set torch's fp32 matmul precision for one test, restored afterwards."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_dot_precision_follows_torch_setting(matmul_precision):
    """fp32 dots: "highest" -> ieee, "high" / "medium" -> tf32 (tensor cores); 16-bit: tf32 (no
    effect: their products are exact in fp32)."""
    for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        matmul_precision(setting)
        assert fused_kernels.dot_precision(torch.float32) == expected
        assert fused_kernels.dot_precision(torch.float32, setting) == expected
        assert (
            fused_kernels.dot_precision(torch.bfloat16)
            == fused_kernels.dot_precision(torch.float16)
            == "tf32"
        )
    matmul_precision("high")
    assert fused_kernels.dot_precision(torch.float32, "highest") == "ieee"  # an explicit setting wins
    with pytest.raises(ValueError, match="matmul_precision"):
        fused_kernels.dot_precision(torch.float32, "fast")
    hidden, weight = torch.randn(3, 16), torch.randn(20, 16)
    labels = torch.randint(0, 20, (3,))
    with pytest.raises(ValueError, match="input_precision"):
        fused_kernels.fused_linear_logprobs_fwd(
            hidden, weight, None, labels, 1.0, IGNORE, input_precision="x"
        )


@pytest.mark.parametrize("setting", ["high", "highest"])
def test_fused_precision_resolved_at_forward(monkeypatch, matmul_precision, setting):
    """The op picks the precision once, in the forward, and the backward reuses it even when the
    setting has changed in between (autograd may run backward outside the caller's context)."""
    seen = []
    for name in ("fused_linear_logprobs_fwd", "fused_linear_logprobs_bwd"):
        real = getattr(fused_kernels, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["input_precision"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(fused_kernels, name, spy)
    hidden = torch.randn(9, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    labels = make_labels((9,), 50)
    matmul_precision(setting)
    logp = alignkit.fused_linear_logprobs(hidden, weight, labels, backend="triton")
    matmul_precision("medium" if setting == "highest" else "highest")
    logp.sum().backward()
    expected = fused_kernels.dot_precision(torch.float32, setting)
    assert seen == [expected, expected]
    # under the interpreter both precisions compute exact fp32 products: the oracle still holds
    lp_exact, _ = ref_logprobs(hidden.detach().double() @ weight.detach().double().T, labels)
    assert max_err(logp, lp_exact) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_accumulates_in_fp32(dtype):
    """d weight sums its row chunks in fp32 and rounds once: over many chunks its error stays at
    one rounding of the total, where a 16-bit running sum rounds at every chunk."""
    vocab, hdim, chunks, rows = 12, 8, 64, 16
    dz = [torch.randn(rows, vocab).to(dtype) for _ in range(chunks)]
    h = [torch.randn(rows, hdim).to(dtype) for _ in range(chunks)]
    acc = torch.zeros(vocab, hdim)
    for a, b in zip(dz, h, strict=True):
        fused_kernels.accumulate_weight_grad(acc, a, b)
    exact = sum(a.double().T @ b.double() for a, b in zip(dz, h, strict=True))
    running = torch.zeros(vocab, hdim, dtype=dtype)  # the former scheme: a 16-bit running sum
    for a, b in zip(dz, h, strict=True):
        running.addmm_(a.T, b)
    assert acc.dtype == torch.float32
    err, err_running = max_err(acc, exact), max_err(running, exact)
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale
    else:
        assert err <= 1e-2 * scale and err < err_running / 2, (err, err_running)


def test_autotune_rows_bucket():
    """The autotuned choice is keyed on the rows bucketed to a power of two (bounded: no re-tuning
    per exact N, and a config tuned on a tiny first call is not reused for large N)."""
    assert fused_kernels._n_bucket(1) == fused_kernels._n_bucket(64) == 64
    assert fused_kernels._n_bucket(65) == fused_kernels._n_bucket(128) == 128
    assert fused_kernels._n_bucket(3000) == 4096
    assert fused_kernels._n_bucket(10**7) == fused_kernels._n_bucket(16384) == 16384


def test_kernel_launches_are_device_guarded(monkeypatch, device):
    """Every launch runs inside device_guard(<an input>): Triton launches on the current CUDA device."""
    import contextlib

    guarded = []

    def guard(tensor):
        guarded.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(kernels, "device_guard", guard)
    monkeypatch.setattr(fused_kernels, "device_guard", guard)
    logits = torch.randn(3, 7, device=device)
    labels = torch.randint(0, 7, (3,), device=device)
    ones = torch.ones(3, device=device)
    _, ent, lse = kernels.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    kernels.token_logprobs_bwd(logits, labels, lse, ent, ones, ones, 1.0, IGNORE)
    assert len(guarded) == 2
    hidden, weight = torch.randn(5, 16, device=device), torch.randn(40, 16, device=device)
    labels = torch.randint(0, 40, (5,), device=device)
    ones = torch.ones(5, device=device)
    _, ent, lse = fused_kernels.fused_linear_logprobs_fwd(hidden, weight, None, labels, 1.0, IGNORE)
    fused_kernels.fused_linear_logprobs_bwd(
        hidden, weight, None, labels, lse, ent, ones, ones, 1.0, IGNORE, chunk_rows=2
    )
    assert len(guarded) == 2 + 1 + 3  # one per backward chunk
    assert all(d == device for d in guarded)
