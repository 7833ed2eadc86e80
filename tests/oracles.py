"""Float64 oracles of the op tests: the formulas of docs/formulas.md written plainly (Python loops
for the recurrences, direct torch for the rest), in float64.

Masked positions are selected away (``if`` / ``where``), never multiplied by the mask, as the ops
promise: NaN stored at a masked position does not reach a live result of an oracle either. The
oracles do not validate their input (the op tests check the errors). Imported as
``from oracles import ...`` (tests/conftest.py puts this directory on ``sys.path``).
"""

from __future__ import annotations

import itertools
import math

import torch

IGNORE = -100  # the default ignore_index of the log-prob ops

# ----------------------------------------------------------------------------- advantages


def ref_gae(rewards, values, mask, gamma, lam):
    """verl's ``compute_gae_advantage_return`` loop (no whitening): (advantages, returns), (B, T)."""
    r, v, m = (x.double().cpu().tolist() for x in (rewards, values, mask))
    adv = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        nv = last = 0.0
        for t in reversed(range(len(r[b]))):
            if m[b][t] != 0:  # masked positions pass both carries through
                last = r[b][t] + gamma * nv - v[b][t] + gamma * lam * last
                nv = v[b][t]
            adv[b][t] = last
    adv = torch.tensor(adv, dtype=torch.float64).reshape(rewards.shape)
    return adv, adv + values.double().cpu()


def ref_discounted_returns(rewards, mask, gamma):
    """REINFORCE++ reward-to-go: G = r_t + gamma G; ret_t = G; G = 0 where m_t = 0. (B, T)."""
    r, m = rewards.double().cpu().tolist(), mask.double().cpu().tolist()
    out = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        g = 0.0
        for t in reversed(range(len(r[b]))):
            g = r[b][t] + gamma * g
            out[b][t] = g
            if m[b][t] == 0:
                g = 0.0
    return torch.tensor(out, dtype=torch.float64).reshape(rewards.shape)


def _sequences(cu_seqlens):
    cu = [int(c) for c in cu_seqlens]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(cu)]


def ref_gae_packed(rewards, values, mask, cu_seqlens, gamma, lam):
    """:func:`ref_gae` on each packed sequence of (N,) or (1, N) inputs; the input's shape."""
    r, v, m = (x.reshape(1, -1) for x in (rewards, values, mask))
    adv, ret = torch.zeros(r.shape, dtype=torch.float64), torch.zeros(r.shape, dtype=torch.float64)
    for sl in _sequences(cu_seqlens):
        adv[:, sl], ret[:, sl] = ref_gae(r[:, sl], v[:, sl], m[:, sl], gamma, lam)
    return adv.reshape(rewards.shape), ret.reshape(rewards.shape)


def ref_discounted_returns_packed(rewards, mask, cu_seqlens, gamma):
    """:func:`ref_discounted_returns` on each packed sequence (restarting at every boundary)."""
    r, m = rewards.reshape(1, -1), mask.reshape(1, -1)
    out = torch.zeros(r.shape, dtype=torch.float64)
    for sl in _sequences(cu_seqlens):
        out[:, sl] = ref_discounted_returns(r[:, sl], m[:, sl], gamma)
    return out.reshape(rewards.shape)


# ----------------------------------------------------------------------------- masked statistics


def ref_masked_mean(x, mask, dim=None):
    """sum(m x) / sum(m), over everything or along ``dim``."""
    x, keep = x.double(), mask != 0
    if dim is None:
        return x[keep].sum() / keep.sum()
    return torch.where(keep, x, 0.0).sum(dim) / keep.sum(dim)


def ref_masked_var(x, mask, unbiased=True):
    sel = x.double()[mask != 0]
    n = sel.numel()
    return ((sel - sel.sum() / n) ** 2).sum() / (n - 1 if unbiased else n)


def ref_masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) with the masked mean and unbiased masked variance, at every
    position (verl's ``masked_whiten``); plus the mean back when ``shift_mean=False``."""
    mean = ref_masked_mean(x, mask)
    out = (x.double() - mean) / torch.sqrt(ref_masked_var(x, mask) + 1e-8)
    return out if shift_mean else out + mean


def ref_group_advantages(scores, ids, method, eps=1e-6, mask=None):
    """Outcome advantages computed group by group (docs/formulas.md, "Group (outcome) advantages");
    ``ids`` is a list of hashable group ids. With a (B, T) ``mask``, broadcast over its live tokens
    (reinforce++-baseline then whitens over those tokens, as verl does)."""
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
    if mask is None:
        if method == "reinforce++-baseline":
            out = ref_masked_whiten(out, torch.ones_like(out))
        return out
    keep = mask != 0
    tokens = torch.where(keep, out[:, None], 0.0)
    if method == "reinforce++-baseline":
        tokens = torch.where(keep, ref_masked_whiten(tokens, keep), 0.0)
    return tokens


# ----------------------------------------------------------------------------- losses


def ref_kl(logp, ref_logp, kl_estimator="k3"):
    """Per-token KL estimate at d = logp - ref_logp (every name and alias of docs/formulas.md)."""
    d = logp - ref_logp
    if kl_estimator in ("k1", "kl"):
        return d
    if kl_estimator == "abs":
        return d.abs()
    if kl_estimator in ("k2", "mse"):
        return 0.5 * d * d
    x = (-d).clamp(-20, 20)
    return (x.exp() - x - 1).clamp(-10, 10)


def ref_agg(loss_mat, mask, agg="token-mean", agg_scale=None):
    """The four aggregation modes; fully masked rows are no rows."""
    keep = mask != 0
    rows = torch.where(keep, loss_mat, 0.0).sum(-1)
    counts = keep.double().sum(-1)
    if agg == "token-mean":
        return rows.sum() / (counts.sum() if agg_scale is None else agg_scale)
    nonempty = counts > 0
    n = nonempty.sum()
    if agg == "seq-mean-token-sum":
        return rows[nonempty].sum() / n
    if agg == "seq-mean-token-mean":
        return (rows / (counts + 1e-8))[nonempty].sum() / n
    return rows[nonempty].sum() / n / (loss_mat.shape[1] if agg_scale is None else agg_scale)


def ref_policy(
    logp,
    old,
    adv,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=3.0,
    agg="token-mean",
    agg_scale=None,
    loss_type="ppo_clip",
    is_weights=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy=None,
    entropy_coef=0.0,
):
    """Policy loss of every ``loss_type`` (ppo_clip, gspo, cispo): (total, metrics, magnitude);
    magnitude bounds the summands, for an absolute tolerance. Ties are not clipped (strict
    comparisons), so autograd through it is the exact reference gradient at clip bounds too.
    CISPO: ``-stopgrad(clamp(ratio, 1 - clip_low, 1 + clip_high)) * A * logp``, clipped where
    ``ratio != clamp(ratio)``, no dual clip."""
    keep = mask != 0
    mf = keep.double()
    lr = (logp - old).clamp(-20, 20)
    if loss_type != "gspo":
        ratio = lr.exp()
    else:
        s = torch.where(keep, lr, 0.0).sum(-1) / mf.sum(-1).clamp(min=1)
        ratio = (logp - logp.detach() + s.detach()[:, None]).clamp(max=10).exp()
    lower = torch.zeros_like(keep)
    if loss_type == "cispo":
        w = ratio.clamp(1 - clip_low, 1 + clip_high)
        loss = -w.detach() * adv * logp
        clipped = ratio != w
    else:
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        clipped = l2 > l1
        loss = torch.where(clipped, l2, l1)
    if dual_clip is not None and loss_type == "ppo_clip":
        l3 = -adv * dual_clip
        lower = (adv < 0) & (loss > l3)
        loss = torch.where(lower, l3, loss)
    if is_weights is not None:
        loss = loss * is_weights
    pg = ref_agg(loss, mask, agg, agg_scale)
    total = pg
    magnitude = ref_agg(loss.detach().abs(), mask, agg, agg_scale)
    tokens = mf.sum()
    metrics = {
        "pg_loss": pg,
        "pg_clipfrac": (clipped & keep).double().sum() / tokens,
        "pg_clipfrac_lower": (lower & keep).double().sum() / tokens,
        "ppo_kl": torch.where(keep, -lr, 0.0).sum() / tokens,
    }
    if entropy is not None:
        ent = ref_agg(entropy, mask, agg, agg_scale)
        total = total - entropy_coef * ent
        magnitude = magnitude + abs(entropy_coef) * ref_agg(entropy.detach().abs(), mask, agg, agg_scale)
        metrics["entropy"] = ent
    if ref_logp is not None:
        kl_mat = ref_kl(logp, ref_logp, kl_estimator)
        kl = ref_agg(kl_mat, mask, agg, agg_scale)
        total = total + kl_coef * kl
        magnitude = magnitude + abs(kl_coef) * ref_agg(kl_mat.detach().abs(), mask, agg, agg_scale)
        metrics["kl"] = kl
    return total, metrics, magnitude


def ref_value(values, old, returns, mask, clip=0.5, agg="token-mean", agg_scale=None):
    """Clipped value loss: (loss, clipfrac)."""
    vclip = old + (values - old).clamp(-clip, clip)
    e1 = (values - returns) ** 2
    e2 = (vclip - returns) ** 2
    loss = 0.5 * ref_agg(torch.where(e2 > e1, e2, e1), mask, agg, agg_scale)
    keep = mask != 0
    return loss, ((e2 > e1) & keep).double().sum() / keep.double().sum()


def ref_rollout_correction(old_logp, rollout_logp, mask, level="token", mode="tis", threshold=2.0):
    """Rollout-correction weights and metrics (docs/formulas.md, "Rollout correction"), a Python loop
    over sequences in float64: (weights (B, T), metrics dict). Units are live tokens (token level)
    or non-empty sequences (sequence level); a unit is clipped when rho > threshold."""
    old, roll, m = (x.double().cpu().tolist() for x in (old_logp, rollout_logp, mask))
    weights = [[0.0] * len(row) for row in old]
    unit_weights, clipped, mismatch = [], [], []

    def exp(x):
        return math.inf if x > 709.0 else math.exp(x)  # math.exp raises on overflow

    def weight(rho):
        if mode == "tis":
            return min(rho, threshold) if rho == rho else rho
        return 0.0 if rho > threshold else rho

    for b in range(len(old)):
        live = [t for t in range(len(old[b])) if m[b][t] != 0]
        mismatch += [abs(old[b][t] - roll[b][t]) for t in live]
        if level == "token":
            for t in live:
                rho = exp(old[b][t] - roll[b][t])
                weights[b][t] = weight(rho)
                unit_weights.append(weights[b][t])
                clipped.append(rho > threshold)
        elif live:
            rho = exp(sum(old[b][t] - roll[b][t] for t in live))
            for t in live:
                weights[b][t] = weight(rho)
            unit_weights.append(weight(rho))
            clipped.append(rho > threshold)
    n_units = max(len(unit_weights), 1)
    metrics = {
        "rollout/logprob_mismatch": sum(mismatch) / max(len(mismatch), 1),
        "rollout/logprob_mismatch_max": max(mismatch, default=0.0),
        "rollout_is/mean": sum(unit_weights) / n_units,
        "rollout_is/max": max(unit_weights, default=0.0),
        "rollout_is/clipfrac": sum(clipped) / n_units,
    }
    out = torch.tensor(weights, dtype=torch.float64).reshape(old_logp.shape)
    return out, {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- log-probs


def ref_logprobs(logits, labels, temperature=1.0, ignore_index=IGNORE, dtype=torch.float64):
    """(logp, entropy) by log_softmax and gather, computed in ``dtype`` (float64: the oracle; the
    input's dtype: the plain PyTorch computation the accuracy rule compares with). Positions with
    label ``ignore_index`` give 0."""
    z = logits.to(dtype) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    logp = log_p.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(keep, logp, zero), torch.where(keep, ent, zero)


# ----------------------------------------------------------------------------- comparison


def assert_close(actual, expected, rtol=1e-6, scale=None, name=""):
    """|a - e| <= rtol |e| + rtol * scale (scale: the magnitude of the summands, default max |e|);
    compared on the CPU in float64, and ``actual`` must be finite."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), name
    if scale is None:
        scale = expected.abs().max() if expected.numel() else 0.0
    atol = rtol * float(scale) + 1e-30
    err = (actual - expected).abs()
    bound = rtol * expected.abs() + atol
    assert (err <= bound).all(), f"{name}: max err {float(err.max()):.3e}, bound {float(bound.max()):.3e}"


# ----------------------------------------------------------------------------- rollout sampling


def ref_rollout_logprobs(z, tokens, floor=None):
    """float64 log-probs of ``tokens`` (...) under the rollout's processed distribution
    (docs/formulas.md "Truncated sampling and the logit floor"): ``log_softmax`` of the scaled logits
    ``z`` (..., V) over ``{z_j >= floor}`` (the whole vocabulary when ``floor`` (...) is None)."""
    z = z.double()
    if floor is not None:
        z = z.masked_fill(z < floor.double()[..., None], float("-inf"))
    return torch.log_softmax(z, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def ref_logprobs_truncated(logits, labels, logit_floor, temperature=1.0, ignore_index=IGNORE):
    """(logp, entropy) in float64 under softmax(z) restricted to {z >= floor} (docs/formulas.md,
    "Truncated sampling and the logit floor"): entries below the floor leave the normaliser and the
    entropy, which is that of the renormalised distribution; a floor of -inf keeps everything. The
    floor of an ``ignore_index`` position is never read (it gives 0)."""
    z = logits.double() / temperature
    keep = labels != ignore_index
    floor = torch.where(keep, logit_floor.double(), -torch.inf)
    kept = z >= floor[..., None]
    log_p = torch.log_softmax(torch.where(kept, z, -torch.inf), dim=-1)
    logp = log_p.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * torch.where(kept, log_p, 0.0)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(keep, logp, zero), torch.where(keep, ent, zero)
