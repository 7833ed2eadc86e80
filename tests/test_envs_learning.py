"""Issue 14's learning claim, shortened: a tiny Llama, warm-started on the answer format only, plays
GuessNumber (1-8, 4 guesses) measurably better, greedily on held-out episodes, after a short GRPO
run through alignkit.envs.GRPO. The full 3-seed measurement: bench/bench_envs_learning.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_envs_learning.py"
ITERATIONS = 50  # of the bench's 120 (seed 0 reached a greedy solve rate of 0.70 from 0.125 there)


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
        record = bench.run_seed(0, iterations=ITERATIONS, warm_steps=bench.WARM_STEPS)
    finally:
        torch.set_num_threads(threads)
    before, after = record["before"], record["after"]
    assert after["solve_rate"] >= before["solve_rate"] + 0.25, record
    assert after["mean_return"] >= before["mean_return"] + 0.2, record
