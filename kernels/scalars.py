"""Host floats as kernel arguments without losing fp64 precision.

Compiled Triton launches type a Python float argument as fp32. Passing an fp64 scalar through a
device tensor instead costs a host-to-device copy, and a device sync, per launch. So each scalar
travels as three fp32 float arguments (:func:`split_float`) and kernels rebuild it in their
accumulation dtype (:func:`join_float`).
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl


def split_float(*values: float) -> tuple[float, ...]:
    """Each value as three fp32 pieces ``hi, mid, lo`` (``hi = fp32(x)``, ``mid = fp32(x - hi)``,
    ``lo = x - hi - mid``) for :func:`join_float`. The pieces sum back to the fp64 value exactly
    for 2**-97 < |x| < 2**128 and for 0 / +-inf."""
    out: list[float] = []
    for x in values:
        x = float(x)
        with np.errstate(over="ignore"):
            hi = float(np.float32(x))
        if not np.isfinite(hi):  # inf / nan as given; a finite |x| >= 2**128 overflows fp32 anyway
            out += [hi, 0.0, 0.0]
            continue
        mid = float(np.float32(x - hi))
        out += [hi, mid, float(np.float32(x - hi - mid))]
    return tuple(out)


@triton.jit
def join_float(hi, mid, lo, DTYPE: tl.constexpr):
    # A host float passed as three fp32 pieces (split_float): rebuilt exactly in fp64; in fp32 it is
    # the first piece, fp32(x). (tl.cast: the interpreter passes the pieces as Python floats.)
    if DTYPE == tl.float64:  # noqa: SIM300 (a constexpr, not a constant)
        return (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)
