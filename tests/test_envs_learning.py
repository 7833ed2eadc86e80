"""Issue 14's learning claim on two seeds: a tiny Llama, warm-started on the answer format only,
plays GuessNumber (1-8, 4 guesses) measurably better, greedily on held-out episodes, after the
bench's PPO run. The full measurement over more seeds: bench/bench_envs_learning.py.

Two seeds and their mean, not one: a run this small is chaotic. Rounding-level changes to the loss
(2e-7, e.g. torch's exp against numba's) change which tokens get sampled and, from there, the whole
trajectory: over six seeds the solve rate after 120 iterations ranged 19%-95%, with the same mean
either way. One seed after 50 iterations (this test before) passed or failed on such noise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_envs_learning.py"
SEEDS = (0, 1)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_envs_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_model_learns_guess_number_on_held_out_episodes():
    bench = load_bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = [bench.run_seed(s, iterations=bench.ITERATIONS, warm_steps=bench.WARM_STEPS) for s in SEEDS]
    finally:
        torch.set_num_threads(threads)

    def gain(key):
        return sum(r["after"][key] - r["before"][key] for r in records) / len(records)

    assert gain("solve_rate") >= 0.25, records
    assert gain("mean_return") >= 0.2, records
    assert all(r["after"]["solve_rate"] > r["before"]["solve_rate"] for r in records), records
