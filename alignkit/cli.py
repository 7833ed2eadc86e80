"""Command line: ``alignkit --version``, ``alignkit info``, ``alignkit smoke``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print versions, the extension's status, CUDA devices and each op's backend."""
    import torch

    import alignkit
    from alignkit import _ext, backend, kernels

    print(f"alignkit      {alignkit.__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    for dist in ("torch", "triton", "transformers", "numba", "numpy"):
        print(f"{dist:<13} {_dist_version(dist)}")
    loaded, detail = _ext.status()
    print(f"extension     {'loaded' if loaded else 'NOT LOADED'}: {detail}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda          no CUDA device")
    print(f"triton        {'interpreter on CPU' if kernels.interpreter_active() else 'compiled'}")
    print(f"backend       {backend.ENV_VAR}={backend.requested()}")
    print("op backends   (for CPU tensors / CUDA tensors)")
    for op, row in backend.describe().items():
        print(f"  {op:<28} {row['cpu']} / {row['cuda']}")
    return 0


def smoke() -> int:
    """A short real run of every op on both backends (alignkit/smoke.py)."""
    from alignkit import smoke as _smoke

    return _smoke.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"alignkit {_dist_version('alignkit')}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, compiled extension, CUDA devices, backend of each op")
    sub.add_parser("smoke", help="a short real run of every op on both backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "smoke":
        return smoke()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
