"""``cu_seqlens=``: the policy losses on sequences packed end to end in one (1, N) row equal the same
sequences padded to (S, longest), for every aggregation mode and loss type, forward and gradients
(``ppo_policy_loss`` and ``fused_linear_ppo_loss``, both backends), against the float64 oracle of
tests/oracles.py on the padded layout."""

from __future__ import annotations

import pytest
import torch
from oracles import assert_close, ref_logprobs, ref_policy

from alignkit import fused_linear_ppo_loss, ppo_policy_loss

# every CPU case through the torch twin and the numba kernels of the loss pass (conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_twin")

LENGTHS = [5, 1, 9, 3, 4]  # odd lengths, a one-token sequence; the longest (9) sets the padded width
AGGS = [
    {"agg": "token-mean"},
    {"agg": "token-mean", "agg_scale": 30.0},
    {"agg": "seq-mean-token-sum"},
    {"agg": "seq-mean-token-mean"},
    {"agg": "seq-mean-token-sum-norm"},
    {"agg": "seq-mean-token-sum-norm", "agg_scale": 16.0},
]
LOSS_TYPES = ["ppo_clip", "gspo", "cispo"]
FLOATS = ("logp", "old_logp", "advantages", "ref_logp", "is_weights", "entropy")


def _layout(lengths, device):
    lengths = torch.tensor(lengths)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    in_seq = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (S, T)
    return cu.to(device), in_seq.to(device)


def _pack(t, in_seq):
    """(S, T, ...) padded -> (1, N, ...) packed in the order of cu_seqlens."""
    return t[in_seq][None]


def make_padded(lengths=LENGTHS, device="cpu"):
    cu, in_seq = _layout(lengths, device)
    S, T = in_seq.shape
    logp = -torch.rand(S, T) * 3 - 0.1
    padded = {
        "logp": logp,
        "old_logp": logp + 0.4 * torch.randn(S, T),
        "advantages": torch.randn(S, T),
        "ref_logp": logp + 0.3 * torch.randn(S, T),
        "is_weights": 2 * torch.rand(S, T),
        "entropy": 3 * torch.rand(S, T),
    }
    mask = (torch.rand(S, T) > 0.3) & in_seq.cpu()
    mask[1, 0] = True  # the one-token sequence is live
    mask[3] = False  # a fully masked sequence: no row in the sequence means
    mask[2, 0] = True
    padded = {k: v.to(device) for k, v in padded.items()}
    padded["mask"] = mask.to(device)
    return padded, cu, in_seq


def _with_nan_padding(padded, in_seq):
    """Positions past a sequence's end hold NaN (padding): they are never read."""
    return {k: v.masked_fill(~in_seq, float("nan")) if k in FLOATS else v for k, v in padded.items()}


def _policy(inputs, backend, opts, cu_seqlens=None):
    logp = inputs["logp"].detach().clone().requires_grad_()
    entropy = inputs["entropy"].detach().clone().requires_grad_()
    loss, metrics = ppo_policy_loss(
        logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], entropy=entropy,
        ref_logp=inputs["ref_logp"], is_weights=inputs["is_weights"], kl_coef=0.1, entropy_coef=0.01,
        cu_seqlens=cu_seqlens, backend=backend, **opts,
    )  # fmt: skip
    return loss, metrics, torch.autograd.grad(loss, (logp, entropy))


def _policy_oracle(padded, opts):
    p = {k: v.double().cpu() for k, v in padded.items() if k in FLOATS}
    logp = p["logp"].clone().requires_grad_()
    entropy = p["entropy"].clone().requires_grad_()
    total, metrics, magnitude = ref_policy(
        logp, p["old_logp"], p["advantages"], padded["mask"].cpu(), entropy=entropy, ref_logp=p["ref_logp"],
        is_weights=p["is_weights"], kl_coef=0.1, entropy_coef=0.01, **opts,
    )  # fmt: skip
    return total, metrics, magnitude, torch.autograd.grad(total, (logp, entropy))


def _check_policy(backend, device, opts):
    padded, cu, in_seq = make_padded(device=device)
    packed = {k: _pack(v, in_seq) for k, v in padded.items()}
    loss, metrics, grads = _policy(packed, backend, opts, cu_seqlens=cu)
    p_loss, p_metrics, p_grads = _policy(_with_nan_padding(padded, in_seq), backend, opts)
    total, ref_metrics, magnitude, ref_grads = _policy_oracle(padded, opts)
    assert_close(loss, total, 1e-5, scale=magnitude, name="loss vs oracle")
    assert_close(loss, p_loss, 1e-6, scale=magnitude, name="loss vs padded")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], 1e-5, scale=max(float(magnitude), 1e-3), name=key)
        assert_close(metrics[key], p_metrics[key], 1e-6, scale=max(float(magnitude), 1e-3), name=key)
    for g, pg, rg, name in zip(grads, p_grads, ref_grads, ("d logp", "d entropy"), strict=True):
        assert g.shape == packed["logp"].shape
        assert_close(g, _pack(rg, in_seq.cpu()), 1e-5, name=name + " vs oracle")
        assert_close(g, _pack(pg, in_seq), 1e-6, name=name + " vs padded")


def _id(opts):
    return "-".join(str(v) for v in opts.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("opts", AGGS, ids=_id)
def test_policy_loss_packed_equals_padded_cpu(opts, loss_type):
    _check_policy("cpu", "cpu", {**opts, "loss_type": loss_type})


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "opts",
    [
        {"agg": "seq-mean-token-mean", "loss_type": "gspo"},
        {"agg": "seq-mean-token-sum-norm", "loss_type": "ppo_clip"},
        {"agg": "seq-mean-token-sum", "loss_type": "cispo"},
    ],
    ids=_id,
)
def test_policy_loss_packed_equals_padded_triton(backend, backend_device, opts):
    _check_policy(backend, backend_device, opts)


@pytest.mark.parametrize("loss_type", ["ppo_clip", "cispo"])
def test_token_mean_needs_no_offsets(backend, backend_device, loss_type):
    """Per-token ratios and a token mean do not see sequence boundaries: a packed row without
    cu_seqlens already gives the padded numbers (the seq-mean modes and GSPO need cu_seqlens)."""
    padded, _, in_seq = make_padded(device=backend_device)
    packed = {k: _pack(v, in_seq) for k, v in padded.items()}
    opts = {"agg": "token-mean", "loss_type": loss_type}
    loss, _, grads = _policy(packed, backend, opts)
    p_loss, _, p_grads = _policy(padded, backend, opts)
    assert_close(loss, p_loss, 1e-6)
    for g, pg in zip(grads, p_grads, strict=True):
        assert_close(g, _pack(pg, in_seq), 1e-6)


# ----------------------------------------------------------------------------- fused_linear_ppo_loss


def make_fused(lengths=LENGTHS, H=16, V=37, device="cpu"):
    padded, cu, in_seq = make_padded(lengths, device)
    S, T = in_seq.shape
    padded["hidden"] = torch.randn(S, T, H, device=device)
    padded["weight"] = 0.3 * torch.randn(V, H, device=device)
    padded["bias"] = 0.1 * torch.randn(V, device=device)
    padded["labels"] = torch.randint(0, V, (S, T), device=device)
    return padded, cu, in_seq


def _fused(inputs, backend, opts, cu_seqlens=None, chunk_size=None):
    p = {k: inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    loss, metrics = fused_linear_ppo_loss(
        p["hidden"], p["weight"], inputs["labels"], inputs["old_logp"], inputs["advantages"], inputs["mask"],
        bias=p["bias"], ref_logp=inputs["ref_logp"], is_weights=inputs["is_weights"], kl_coef=0.1,
        entropy_coef=0.01, logit_floor=inputs.get("logit_floor"), cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, backend=backend, **opts,
    )  # fmt: skip
    return loss, metrics, torch.autograd.grad(loss, tuple(p.values()))


def _fused_oracle(padded, opts):
    p = {k: padded[k].double().cpu().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    logits = p["hidden"] @ p["weight"].T + p["bias"]
    labels = padded["labels"].cpu().masked_fill(~padded["mask"].cpu(), -100)
    logp, ent = ref_logprobs(logits, labels)
    f = {k: padded[k].double().cpu() for k in ("old_logp", "advantages", "ref_logp", "is_weights")}
    total, _, magnitude = ref_policy(
        logp, f["old_logp"], f["advantages"], padded["mask"].cpu(), entropy=ent, ref_logp=f["ref_logp"],
        is_weights=f["is_weights"], kl_coef=0.1, entropy_coef=0.01, **opts,
    )  # fmt: skip
    return total, magnitude, torch.autograd.grad(total, tuple(p.values()))


def _check_fused(backend, device, opts, chunk_size=None, floor=False):
    padded, cu, in_seq = make_fused(device=device)
    if floor:
        # Half the positions truncated at -1.0, or just below the label's logit where that is lower:
        # a sampled token is always kept (its log-prob is finite; CISPO's loss multiplies it).
        z = padded["hidden"] @ padded["weight"].T + padded["bias"]
        label_z = z.gather(-1, padded["labels"][..., None]).squeeze(-1)
        cut = torch.minimum(torch.full_like(label_z, -1.0), label_z - 0.1)
        padded["logit_floor"] = torch.where(torch.rand(in_seq.shape, device=device) < 0.5, -torch.inf, cut)
    packed = {k: v if k in ("weight", "bias") else _pack(v, in_seq) for k, v in padded.items()}
    poisoned = dict(padded, hidden=padded["hidden"].masked_fill(~in_seq[..., None], float("nan")))
    poisoned = _with_nan_padding(poisoned, in_seq)
    loss, metrics, grads = _fused(packed, backend, opts, cu, chunk_size)
    p_loss, p_metrics, p_grads = _fused(poisoned, backend, opts, chunk_size=chunk_size)
    assert_close(loss, p_loss, 1e-5, name="loss vs padded")
    scale = max(float(p_loss.detach().abs()), 1e-3)
    for key in metrics:
        assert_close(metrics[key], p_metrics[key], 1e-5, scale=scale, name=key)
    assert_close(grads[0], _pack(p_grads[0], in_seq), 1e-5, name="d hidden vs padded")
    assert_close(grads[1], p_grads[1], 1e-5, name="d weight vs padded")
    assert_close(grads[2], p_grads[2], 1e-5, name="d bias vs padded")
    if not floor:
        total, magnitude, ref_grads = _fused_oracle(padded, opts)
        assert_close(loss, total, 1e-5, scale=magnitude, name="loss vs oracle")
        assert_close(grads[0], _pack(ref_grads[0], in_seq.cpu()), 1e-5, name="d hidden vs oracle")
        for g, rg, name in zip(grads[1:], ref_grads[1:], ("d weight", "d bias"), strict=True):
            assert_close(g, rg, 1e-5, name=name + " vs oracle")


# chunk sizes: one block; 4 and 1 tokens (chunks that cut sequences and hold several sequence ends)
@pytest.mark.parametrize("chunk_size", [None, 4, 1])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("opts", [AGGS[0], AGGS[3], AGGS[4]], ids=_id)
def test_fused_packed_equals_padded_cpu(opts, loss_type, chunk_size):
    _check_fused("cpu", "cpu", {**opts, "loss_type": loss_type}, chunk_size)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_packed_with_floor_cpu(loss_type):
    _check_fused("cpu", "cpu", {"agg": "seq-mean-token-sum", "loss_type": loss_type}, 4, floor=True)


# The interpreter computes with NumPy, which warns on the NaN padding of the padded reference (selected
# away afterwards; compiled kernels compute the same dead lanes silently).
@pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero|All-NaN slice) encountered:RuntimeWarning"
)
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "opts", [{"agg": "seq-mean-token-mean", "loss_type": "gspo"}, {"agg": "seq-mean-token-sum-norm"}], ids=_id
)
def test_fused_packed_equals_padded_triton(backend, backend_device, opts):
    _check_fused(backend, backend_device, opts, floor=opts.get("loss_type") == "gspo")


BAD_OFFSETS = [
    ({"cu_seqlens": [0, 5, 21]}, ValueError, "cu_seqlens must end at the packed length 22"),
    ({"cu_seqlens": [0, 5, 5, 22]}, ValueError, "cu_seqlens must be strictly increasing"),
    ({"cu_seqlens": torch.tensor([0.0, 22.0])}, TypeError, "cu_seqlens must hold integers"),
    ({"cu_seqlens": "0,22"}, TypeError, "cu_seqlens must be a 1-D integer tensor"),
]


@pytest.mark.parametrize("override, exc, match", BAD_OFFSETS, ids=["end", "empty", "float", "str"])
def test_bad_offsets(override, exc, match):
    padded, _, in_seq = make_fused()
    packed = {k: v if k in ("weight", "bias") else _pack(v, in_seq) for k, v in padded.items()}
    with pytest.raises(exc, match=match):
        ppo_policy_loss(packed["logp"], packed["old_logp"], packed["advantages"], packed["mask"], **override)
    with pytest.raises(exc, match=match):
        fused_linear_ppo_loss(
            packed["hidden"], packed["weight"], packed["labels"], packed["old_logp"], packed["advantages"],
            packed["mask"], **override,
        )  # fmt: skip


def test_offsets_need_one_packed_row():
    padded, cu, _ = make_fused()
    args = [padded[k] for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=r"with cu_seqlens, logp must hold one packed row"):
        ppo_policy_loss(*args, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"with cu_seqlens, hidden must hold one packed row"):
        fused_linear_ppo_loss(
            padded["hidden"], padded["weight"], padded["labels"], padded["old_logp"], padded["advantages"],
            padded["mask"], cu_seqlens=cu,
        )  # fmt: skip


def test_cpu_parallel_kernels_packed(monkeypatch):
    # The numba prange variants run only past PARALLEL_MIN_ELEMENTS; force them on a small batch.
    import alignkit.cpu

    monkeypatch.setattr(alignkit.cpu, "PARALLEL_MIN_ELEMENTS", 0)
    for loss_type in LOSS_TYPES:
        _check_policy("cpu", "cpu", {"agg": "seq-mean-token-mean", "loss_type": loss_type})
