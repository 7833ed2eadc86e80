"""Every launched Triton kernel compiles for a real GPU (sm_90), ahead of time and without one.

The other tests run the kernels under the Triton interpreter, which never lowers them to PTX: a
kernel can pass there and still fail to compile on a GPU. tests/compile_kernels_sm90.py compiles
each kernel with the signatures, constexprs and configs its host launcher uses on CUDA; it needs
``TRITON_INTERPRET=0``, so it runs in a subprocess (this process's kernels are interpreter objects).
Each variant's line reports the registers per thread and spills (``n_regs`` / ``n_spills``) read from
its sm_90 cubin; a variant that spills, or whose resources cannot be read, fails the script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_kernels_sm90.py")


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"sm_90 compilation failed (exit {proc.returncode}):\n{output}"
    assert " 0 failures" in proc.stdout, output
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok  ")]
    count = int(re.search(r"^(\d+) variants for", proc.stdout, re.MULTILINE).group(1))
    assert len(lines) == count, output
    resources = [re.search(r"regs=\s*(\d+) spills=(\d+)", line) for line in lines]
    assert all(resources), f"a variant without its registers / spills:\n{output}"
    assert all(int(m.group(2)) == 0 for m in resources), output
    fused = [line for line in lines if "_fused_linear_logprobs" in line]
    assert any("DOT_PRECISION=ieee" in line for line in fused), output  # both fp32 precisions compile
    assert any("DOT_PRECISION=tf32" in line for line in fused), output
