"""Rollout throughput: alignkit.RolloutEngine vs Hugging Face ``model.generate``, same model, prompts and
sampling settings (temperature 1, no top-k / top-p), side by side.

CPU cases (issue 10), a random-init ``LlamaConfig(vocab_size=8192, hidden_size=384,
intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6)`` (16.9M parameters), 32 rows,
16-token prompts, 128 new tokens:

* ``fixed``: every row samples 128 tokens (``min_new_tokens=128``). Goal: >= 1.5x HF tokens/s.
* ``varying``: 4 prompts x n = 8 samples, eos allowed. A random-init model samples nearly
  uniformly, so one eos id would almost never come: the model gets every 40th token id as an eos
  id (``generation_config.eos_token_id``, the same list passed to HF), a hazard of ~1/40 per step
  (lengths spread from 1 to 128, mean ~40). HF keeps every row in the batch until the last one
  finishes; alignkit drops finished rows and prefills each prompt once. Goal: >= 2x HF tokens/s.

GPU case (``bench/gpu.sh``): a random-init model of Qwen2-0.5B shape, batch 64, 256 new tokens.
Goal: >= 3x HF. A third provider there, ``alignkit-eager``, is the engine with ``decode="eager"``
(no CUDA graphs), so the table separates what the graphs give from the rest of the engine. Each
GPU case runs once after its warm-up (the warm-up also measures the peak memory; it includes the
graph captures), so the stage fits bench/gpu.sh's budget.

Tokens/s counts sampled tokens (eos included, nothing after it) and is stored in ``extra_info``;
the renderer's speed-up column is the ratio of median times (equal token counts in ``fixed``, equal
in expectation in ``varying``). pytest-benchmark times the providers one after the other; on a
shared machine run ``python bench/bench_rollout.py`` instead, which interleaves the providers
round by round, prints median tokens/s and their ratio, and writes them (every round, both clocks)
to bench/results/rollout_<device>.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

PROMPT_LEN, NEW_TOKENS, ROWS = 16, 128, 32
EOS, PAD = 2, 0
CASES = {"fixed": 1, "varying": 8}  # case: samples per prompt (rows = 32 either way)
PROVIDERS = ["alignkit", "hf"]
GPU_PROVIDERS = ["alignkit", "alignkit-eager", "hf"]  # alignkit-eager: decode="eager", no CUDA graphs
GOALS = {"fixed": 1.5, "varying": 2.0}  # alignkit / HF tokens/s (issue 10)
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).train(False)


def gpu_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.to("cuda").train(False)


def prompts(count: int, seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, PROMPT_LEN), generator=g)


def run_alignkit(engine, ids: torch.Tensor, n: int, fixed: bool, eos: list[int]) -> int:
    out = engine.generate(
        ids.tolist(), n=n, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS if fixed else 0,
        temperature=1.0,
    )  # fmt: skip
    return int(out.response_mask.sum())


@torch.no_grad()
def run_hf(model, ids: torch.Tensor, n: int, fixed: bool, eos: list[int]) -> int:
    ids = ids.to(model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS if fixed else 0, num_return_sequences=n,
        eos_token_id=eos, pad_token_id=PAD,
    )[:, ids.shape[1] :]  # fmt: skip
    is_eos = torch.isin(out, torch.tensor(eos, device=out.device))
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, out.shape[1])
    return int(first.sum())  # sampled tokens: up to and including the first eos


class Workload:
    """One case: model (with its eos ids), engine, prompts."""

    def __init__(self, case: str, device: str) -> None:
        from alignkit.rollout import RolloutEngine

        self.model = cpu_model() if device == "cpu" else gpu_model()
        self.fixed = case == "fixed"
        self.n = CASES[case]
        rows = ROWS if device == "cpu" else 64
        self.ids = prompts(rows // self.n, 0, self.model.config.vocab_size)
        vocab = self.model.config.vocab_size
        self.eos = [EOS] if self.fixed else [i for i in range(EOS, vocab, 40)]
        self.model.generation_config.eos_token_id = self.eos
        self.engines = {
            "alignkit": RolloutEngine(self.model),
            "alignkit-eager": RolloutEngine(self.model, decode="eager"),
        }

    def run(self, provider: str) -> int:
        if provider in self.engines:
            return run_alignkit(self.engines[provider], self.ids, self.n, self.fixed, self.eos)
        return run_hf(self.model, self.ids, self.n, self.fixed, self.eos)


def providers(device: str) -> list[str]:
    return GPU_PROVIDERS if device == "cuda" else PROVIDERS


def _run_case(benchmark, provider: str, case: str, device: str, rounds: int) -> None:
    work = Workload(case, device)
    tokens: list[int] = []

    def step():
        tokens.append(work.run(provider))
        harness.sync(device)

    if device == "cpu":
        step()  # warm-up
    peak = harness.peak_memory_bytes(step, device)  # on CUDA also the warm-up
    tokens.clear()
    benchmark.group = f"rollout {case} rows={ROWS} prompt={PROMPT_LEN} new={NEW_TOKENS} ({device})"
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    median_tokens = statistics.median(tokens)
    harness.record(
        benchmark, provider, peak_bytes=peak, tokens=median_tokens,
        tokens_per_s=median_tokens / benchmark.stats.stats.median,
    )  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rollout_cpu(benchmark, provider, case):
    _run_case(benchmark, provider, case, "cpu", rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_rollout_gpu(benchmark, provider, case):
    _run_case(benchmark, provider, case, "cuda", rounds=1)


def interleaved(case: str, device: str, rounds: int) -> dict[str, dict[str, list[float]]]:
    """tokens/s per round of each provider (by wall clock and by this process's CPU time, the
    steadier measure on a shared machine with one torch thread), providers alternating each round."""
    work = Workload(case, device)
    for provider in providers(device):
        work.run(provider)  # warm-up
    rates: dict[str, dict[str, list[float]]] = {p: {"wall": [], "cpu": []} for p in providers(device)}
    for _ in range(rounds):
        for provider in providers(device):
            wall, cpu = time.perf_counter(), time.process_time()
            count = work.run(provider)
            harness.sync(device)
            rates[provider]["wall"].append(count / (time.perf_counter() - wall))
            rates[provider]["cpu"].append(count / (time.process_time() - cpu))
    return rates


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {d: importlib.metadata.version(d) for d in ("torch", "transformers")}
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
        "datetime": datetime.datetime.now().isoformat(timespec="seconds"), "load_average": os.getloadavg(),
    }  # fmt: skip


def render(data: dict) -> str:
    info = data["machine"]
    lines = [
        f"Machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads; "
        f"torch {info['versions']['torch']}, transformers {info['versions']['transformers']}; "
        f"{info['datetime']} (load average at the end "
        f"{', '.join(f'{x:.2f}' for x in info['load_average'])})",
        "",
        f"**Rollout, {data['device']}: 16.9M Llama, {ROWS} rows, {PROMPT_LEN}-token prompts, "
        f"{NEW_TOKENS} new tokens, temperature 1; providers interleaved round by round, "
        f"{data['rounds']} rounds (+ warm-up)**",
        "",
        "| case | clock | alignkit tok/s | HF generate tok/s | ratio | goal | rounds alignkit/HF |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for case, block in data["cases"].items():
        for clock in ("wall", "cpu"):
            r = block[clock]
            rounds = " ".join(f"{a:.0f}/{h:.0f}" for a, h in zip(r["alignkit"], r["hf"], strict=True))
            lines.append(
                f"| {case} | {clock} | {r['median']['alignkit']:.0f} | {r['median']['hf']:.0f} | "
                f"{r['ratio']:.2f}x | >= {GOALS[case]}x | {rounds} |"
            )
    lines += ["", "Written by `python bench/bench_rollout.py` (cpu clock: this process's CPU time)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="interleaved rollout throughput (tokens/s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/rollout_<device>.json)"
    )
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = {"benchmark": "rollout tokens/s, alignkit.RolloutEngine vs HF generate", "device": args.device,
            "rounds": args.rounds, "cases": {}}  # fmt: skip
    for case in args.cases:
        rates = interleaved(case, args.device, args.rounds)
        data["cases"][case] = {}
        for clock in ("wall", "cpu"):
            med = {p: statistics.median(rates[p][clock]) for p in rates}
            rounds = "  ".join(f"{p}: {[round(r) for r in rates[p][clock]]}" for p in rates)
            print(
                f"{case:8s} {clock:4s} alignkit {med['alignkit']:6.0f} tok/s  hf {med['hf']:6.0f} tok/s  "
                f"ratio {med['alignkit'] / med['hf']:.2f}x  ({rounds}; {torch.get_num_threads()} threads)",
                flush=True,
            )
            data["cases"][case][clock] = {
                **{p: rates[p][clock] for p in rates},
                "median": med,
                "ratio": med["alignkit"] / med["hf"],
            }
    data["machine"] = machine_info()
    out = args.out or RESULTS / f"rollout_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
