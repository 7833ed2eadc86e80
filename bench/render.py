"""Render pytest-benchmark JSON results into markdown tables, one per benchmark group.

Each row is a provider; `speed-up` is the provider's median time over alignkit's in the same run
(> 1: alignkit is faster). GB/s and TFLOP/s come from `bytes_moved` / `flops` in extra_info.

    python bench/render.py bench/results/cpu.json [--out cpu.md] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(data: dict) -> str:
    info = data.get("machine_info", {})
    versions = info.get("versions", {})
    head = (
        f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
        f"{info.get('cuda_device') or 'no GPU'}; "
        f"torch {versions.get('torch')}, triton {versions.get('triton')}; "
        f"commit {str(info.get('git_commit') or data.get('commit_info', {}).get('id', '?'))[:10]}; "
        f"{data.get('datetime', '')[:19]}"
    )
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    lines = [head, ""]
    for group in sorted(groups):
        rows = groups[group]
        base = next((b for b in rows if b["extra_info"].get("provider") == "alignkit"), None)
        lines += [
            f"**{group}**",
            "",
            "| provider | median | speed-up of alignkit | peak extra memory | GB/s | TFLOP/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            extra = b["extra_info"]
            median = b["stats"]["median"]
            ratio = f"{median / base['stats']['median']:.2f}x" if base else "-"
            peak = f"{extra['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in extra else "-"
            gbs = f"{extra['bytes_moved'] / median / 1e9:.1f}" if "bytes_moved" in extra else "-"
            tfs = f"{extra['flops'] / median / 1e12:.2f}" if "flops" in extra else "-"
            provider = extra.get("provider", b["name"])
            lines.append(f"| {provider} | {_fmt_time(median)} | {ratio} | {peak} | {gbs} | {tfs} |")
        lines.append("")
    return "\n".join(lines)


def update_readme(readme: Path, sections: list[str]) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(before + START + "\n" + "\n".join(sections) + "\n" + END + after)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    sections = [render(json.loads(p.read_text())) for p in args.results]
    text = "\n".join(sections)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if args.readme:
        results_dir = args.results[0].parent
        all_md = [p.read_text() for p in sorted(results_dir.glob("*.md"))] or sections
        update_readme(args.readme, all_md)


if __name__ == "__main__":
    main()
