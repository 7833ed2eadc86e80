"""``curves.png``: held-out greedy accuracy and training reward against RL iteration.

matplotlib is optional (``pip install 'alignkit[plot]'``); without it :func:`plot_curves` raises an
ImportError that says so, and the demo writes everything else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

PLOT_HINT = "curves.png needs matplotlib: pip install 'alignkit[plot]' (or pip install matplotlib)"

_ACCURACY, _REWARD, _KL = "#1f77b4", "#d62728", "#7f7f7f"
_PART_COLORS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    metrics: Sequence[dict[str, Any]],
    evaluations: Sequence[tuple[int, float]],
    path: str | os.PathLike,
    *,
    title: str,
    reward_weights: dict[str, float] | None = None,
) -> None:
    """Write a PNG to ``path``: held-out greedy accuracy (%) at each evaluation (iteration 0 is the
    warm start); each reward function's mean and the weighted total per iteration (faint: raw; bold:
    a trailing mean; ``reward_weights``, by function name, label them); and, when logged, the KL to
    the warm start."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc

    kl = [m.get("kl/mean") for m in metrics]
    has_kl = bool(metrics) and all(k is not None for k in kl)
    figure = Figure(figsize=(15 if has_kl else 11, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3 if has_kl else 2, width_ratios=[1, 1.25, 0.8] if has_kl else [1, 1.25])
    accuracy_axes, reward_axes = panels[0], panels[1]

    steps = [i for i, _ in evaluations]
    percent = [100 * a for _, a in evaluations]
    accuracy_axes.plot(steps, percent, "o-", color=_ACCURACY, lw=2.2, ms=5)
    accuracy_axes.axhline(percent[0], color=_ACCURACY, ls=":", lw=1)
    # The warm-start label sits at the right end of its line, on the side away from the final point
    # (the first iterations may dip below the line; by the end the curve is far from it).
    rose = percent[-1] >= percent[0]
    accuracy_axes.annotate(f"warm start {percent[0]:.1f}%", (steps[-1], percent[0]), color=_ACCURACY,
                           xytext=(-6, -16 if rose else 8), textcoords="offset points",
                           ha="right")  # fmt: skip
    above = rose and percent[-1] < 85  # under the point when RL lowered it, or near the top
    accuracy_axes.annotate(f"after RL {percent[-1]:.1f}%", (steps[-1], percent[-1]), color=_ACCURACY,
                           xytext=(-6, 10 if above else -18), textcoords="offset points", ha="right",
                           weight="bold")  # fmt: skip
    accuracy_axes.set(xlabel="RL iteration", ylabel="held-out accuracy, greedy (%)",
                      title="Held-out accuracy", ylim=(0, max(100.0, max(percent) + 5)))  # fmt: skip
    accuracy_axes.grid(alpha=0.3)

    if metrics:
        iterations = [m["iteration"] + 1 for m in metrics]
        window = max(1, len(metrics) // 15)
        parts = sorted(
            k for k in metrics[0] if k.startswith("reward/") and k not in ("reward/mean", "reward/std")
        )
        colors = iter(_PART_COLORS)
        for key in [*parts, "reward/mean"]:
            values = [float(m.get(key, float("nan"))) for m in metrics]
            total = key == "reward/mean"
            color = _REWARD if total else next(colors)
            name = key.removeprefix("reward/")
            label = "total (weighted sum)" if total else name.replace("_", " ")
            if not total and reward_weights and name in reward_weights:
                label += f" (weight {reward_weights[name]:g})"
            reward_axes.plot(iterations, values, color=color, alpha=0.2, lw=1)
            reward_axes.plot(
                iterations, _smooth(values, window), color=color, lw=2.6 if total else 1.6, label=label
            )
        reward_axes.legend(loc="lower center", frameon=False, ncol=2)
    if has_kl:
        kl_axes = panels[2]
        values = [float(k) for k in kl]
        kl_axes.plot(iterations, values, color=_KL, alpha=0.25, lw=1)
        kl_axes.plot(iterations, _smooth(values, window), color=_KL, lw=2)
        kl_axes.set(xlabel="RL iteration", ylabel="KL(policy || warm start) per token",
                    title="Drift from the warm start")  # fmt: skip
        kl_axes.set_ylim(bottom=0)
        kl_axes.grid(alpha=0.3)
    reward_axes.set(xlabel="RL iteration", ylabel="mean reward of the sampled answers",
                    title="Training reward (faint: per iteration; bold: trailing mean)")  # fmt: skip
    reward_axes.set_ylim(0, max(1.05, reward_axes.get_ylim()[1]))
    reward_axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path)
