"""Benchmark session setup: the same kernel environment as the tests, versions in machine info."""

from __future__ import annotations

import os
import subprocess

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.metadata

import pytest


def pytest_benchmark_update_machine_info(config, machine_info):
    versions = {}
    for dist in (
        "alignkit",
        "torch",
        "triton",
        "transformers",
        "numba",
        "numpy",
        "trl",
        "torchrl",
        "liger-kernel",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    machine_info["versions"] = versions
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["torch_threads"] = torch.get_num_threads()
    try:
        machine_info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        machine_info["git_commit"] = None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CPU benchmark (run without CUDA)")
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip)
    else:
        skip = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu.sh)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
