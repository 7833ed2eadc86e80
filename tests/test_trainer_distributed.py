"""The trainer under torchrun: 2 CPU processes (gloo) end with identical parameters, equal to a
single-process run with the same global batch (prompts are split by rank, each prompt keeps its
seed, losses are normalised by global counts and gradients summed across ranks; DAPO chooses its
kept groups over both ranks, as one process would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker
import pytest
import torch
from toy_task import save_tiny_llama

HERE = Path(__file__).parent

# The same gradients summed in another order (two half-batches + all-reduce vs one accumulation)
# differ by float rounding; Adam divides by sqrt(v), so where a gradient is ~0 that rounding can
# move a weight by a visible fraction of one step (lr = 3e-3). On average the weights agree to
# 1e-6, and no weight may differ by a tenth of a step (a different sample or a missed gradient
# share moves many weights by whole steps).
MEAN_DIFF, STEP_FRACTION = 1e-6, 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "dapo"])
def test_two_ranks_match_one_process(model_dir, tmp_path, algorithm):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "distributed_worker.py"), str(model_dir), str(tmp_path / "ddp"), algorithm,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = torch.load(tmp_path / "ddp" / "params-rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "params-rank1.pt")
    assert torch.equal(rank0, rank1), "the ranks' parameters differ"

    distributed_worker.run(str(model_dir), tmp_path / "single", algorithm)
    single = torch.load(tmp_path / "single" / "params-rank0.pt")
    import transformers

    start = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    initial = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    assert (single[: initial.numel()] - initial).abs().max() > 1e-4  # training moved the weights
    diff = (rank0 - single).abs()
    assert diff.mean() < MEAN_DIFF, float(diff.mean())
    assert diff.max() < STEP_FRACTION * 3e-3, float(diff.max())
    ddp = json.loads((tmp_path / "ddp" / "metrics-rank0.json").read_text())
    one = json.loads((tmp_path / "single" / "metrics-rank0.json").read_text())
    for a, b in zip(ddp, one, strict=True):
        for key in ("reward/mean", "reward/std", "response_length/mean", "kl/mean", "entropy/mean"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])


GATHER_SCRIPT = """
import sys, torch
from alignkit.trainer import distributed
distributed.init_from_env(torch.device("cpu"))
rank = distributed.rank()
rows = torch.arange(rank + 1, dtype=torch.float32)[:, None].expand(-1, 3) + 10 * rank  # 1 and 2 rows
got = distributed.all_gather_rows(rows)
want = torch.cat([torch.zeros(1, 3), torch.tensor([[10.0] * 3, [11.0] * 3])])
assert torch.equal(got, want), got
assert distributed.all_gather_objects({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
torch.distributed.destroy_process_group()
"""


def test_gathers_of_unequal_rows(tmp_path):
    """DAPO's kept groups can leave ranks with different row counts: the gathers take that."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd.append(str(script))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
