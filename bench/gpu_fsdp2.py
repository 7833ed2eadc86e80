"""Stage 3 of bench/gpu.sh: do alignkit's log-probs work on an FSDP2-sharded model (``fully_shard``)?

    torchrun --standalone --nproc_per_node=<gpus> bench/gpu_fsdp2.py --out results/3-fsdp2.json

A tiny random-init Llama (transformers), the same on every rank, sharded with ``fully_shard`` per
decoder layer and at the root; ``alignkit.causal_lm_logprobs`` forward + backward on it must give
the log-probs and the lm_head / embedding gradients of an unsharded copy. Scale-out is not built
yet (README): this records where alignkit stands. Writes one JSON object (rank 0), with ``status``
``ok``, ``failed`` (with the error; exit 1) or ``skipped`` (no CUDA, no NCCL, no ``fully_shard`` in
this torch, not launched by torchrun; exit 77, "skipped" to bench/gpu.sh). ``--preflight`` (without
torchrun) only checks that the run can happen: exit 77 with the reason written when it cannot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record)[:2000], flush=True)


SKIPPED = 77  # bench/gpu.sh: the stage had nothing to check


def _skip_reason(launched: bool) -> str | None:
    import torch

    if launched and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        return "not launched by torchrun (RANK / WORLD_SIZE unset)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return "torch.distributed or NCCL unavailable in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError as exc:
        return f"torch.distributed.fsdp.fully_shard unavailable: {exc}"
    return None


def _check() -> dict:
    import torch
    import transformers
    from torch.distributed.fsdp import fully_shard

    import alignkit

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    reference = transformers.AutoModelForCausalLM.from_config(config).to("cuda")
    model = copy.deepcopy(reference)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.randint(0, config.vocab_size, (4, 33), device="cuda")
    torch.distributed.broadcast(ids, 0)

    def step(m):
        logp = alignkit.causal_lm_logprobs(m, ids)
        (-logp.mean()).backward()
        return logp.detach()

    expected = step(reference)
    got = step(model)
    record = {"logp_max_abs_diff": float((got - expected).abs().max())}
    for name, ref_param in reference.named_parameters():
        if not name.endswith(("lm_head.weight", "embed_tokens.weight")):
            continue
        param = dict(model.named_parameters())[name]
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        record[f"{name}.grad_max_abs_diff"] = float((grad - ref_param.grad).abs().max())
    record["status"] = "ok" if all(v < 1e-4 for k, v in record.items() if k.endswith("diff")) else "failed"
    return record


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preflight", action="store_true", help="only check that the run can happen")
    args = parser.parse_args()
    reason = _skip_reason(launched=not args.preflight)
    if reason is not None:
        _write(args.out, {"status": "skipped", "reason": reason})
        return SKIPPED
    if args.preflight:
        return 0
    import torch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.distributed.init_process_group("nccl")
    try:
        record = _check()
    except Exception as exc:  # the finding to record, not a crash of the stage
        record = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
    if rank == 0:
        _write(args.out, {"world_size": world, "torch": torch.__version__, **record})
    torch.distributed.destroy_process_group()
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
