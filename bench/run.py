"""Run the benchmarks side by side and write bench/results/<device>.json and .md.

    python bench/run.py --device cpu            # CPU benchmarks (make bench)
    python bench/run.py --device cuda           # GPU benchmarks (bench/gpu.sh)
    python bench/run.py --device cpu -k gae     # a subset

The JSON is pytest-benchmark's (machine info, versions, git commit, every round's timing) and
the markdown is rendered from it by bench/render.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=None, help="also update this README's table")
    args = parser.parse_args()
    args.out = args.out.resolve()  # pytest runs in bench/: a relative --out means the caller's folder
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.device}.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(HERE / "pytest.ini"),
        str(HERE),
        f"--benchmark-json={json_path}",
        "-q",
        "-rs",
    ]
    if args.keyword:
        cmd += ["-k", args.keyword]
    code = subprocess.call(cmd, cwd=HERE)
    if code not in (0, 5) or not json_path.exists():
        return code or 1
    render = [
        sys.executable,
        str(HERE / "render.py"),
        str(json_path),
        "--out",
        str(json_path.with_suffix(".md")),
    ]
    if args.readme:
        render += ["--readme", str(args.readme)]
    return subprocess.call(render) or code


if __name__ == "__main__":
    sys.exit(main())
