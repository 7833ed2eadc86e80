"""One TRL GRPO step (``GRPOTrainer.compute_loss`` forward + backward on a fixed batch of generated
completions), side by side:

* ``trl``: TRL as installed (1.16 scores completions with its own chunked fused lm_head).
* ``alignkit``: after ``alignkit.compat.trl.patch()``: ``alignkit.fused_linear_logprobs`` on the
  last hidden states (no [B x T x V] logits; the CPU path holds one 32 MiB block of logits).
* ``trl-logits``: the materialised-logits path of TRL <= 1.10 (``model(...).logits`` ->
  ``selective_log_softmax`` / ``entropy_from_logits``), the one TRL issue 3678 ran out of memory
  with, rebuilt from TRL's own helpers.

Every provider computes the same loss (recorded as ``loss`` in extra_info; the alignkit and trl
values agree to fp32 rounding). Needs trl (the bench extra); a missing TRL skips every case.
Run: ``python bench/run.py --device cpu -k compat`` or ``pytest -c bench/pytest.ini
bench/bench_compat.py``. Case: a 2-layer Qwen2 with a 32k vocabulary on CPU (issue 13).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

VOCAB, HIDDEN, LAYERS = 32000, 64, 2
COMPLETIONS, COMPLETION_LENGTH = 8, 128  # per step: 8 completions of 128 tokens (4 prompts x 2)
PROVIDERS = ["trl", "alignkit", "trl-logits"]


def word_tokenizer(vocab: int):
    """A word-level tokenizer over "t0" .. "t{vocab-1}" (built locally: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t1", eos_token="t2", unk_token="t0")


def tiny_model(vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=1,
    )
    return Qwen2ForCausalLM(config)


def length_reward(completions, **kwargs):
    """A reward with spread inside each group (so the advantages are not all 0)."""
    return [len(c) / 100.0 for c in completions]


def grpo_trainer(output_dir: str, *, completions: int, completion_length: int, vocab: int = VOCAB, **config):
    """A GRPOTrainer on CPU in fp32 (``bf16=False``) over a tiny model and 8 synthetic prompts."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [" ".join(f"t{(7 * i + j) % (vocab - 3) + 3}" for j in range(5 + i % 3)) for i in range(8)]
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=completions,
        num_generations=min(completions, 4),
        max_completion_length=completion_length,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="no",
        **config,
    )
    return GRPOTrainer(
        model=tiny_model(vocab),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=word_tokenizer(vocab),
    )


def logits_per_token_logps(trl_utils):
    """The per-token method of TRL <= 1.10: full logits, then TRL's selective_log_softmax and
    entropy_from_logits (text-only inputs)."""

    def method(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
               compute_aux_loss=False, **unused):  # fmt: skip
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1][:, -logits_to_keep:] / self.temperature
        logps = trl_utils.selective_log_softmax(logits, input_ids[:, -logits_to_keep:])
        entropies = trl_utils.entropy_from_logits(logits) if compute_entropy else None
        return logps, entropies, None

    return method


@contextlib.contextmanager
def provider_context(provider: str):
    """The GRPOTrainer class as ``provider`` runs it, for the duration of the block."""
    if provider == "trl":
        yield
        return
    if provider == "alignkit":
        import alignkit.compat.trl

        with alignkit.compat.trl.patch():
            yield
        return
    from trl.trainer import grpo_trainer, utils

    trainer_cls = grpo_trainer.GRPOTrainer
    original = trainer_cls.__dict__["_get_per_token_logps_and_entropies"]
    trainer_cls._get_per_token_logps_and_entropies = logits_per_token_logps(utils)
    try:
        yield
    finally:
        trainer_cls._get_per_token_logps_and_entropies = original


def generated_batch(trainer):
    """One training batch of generated, scored completions (the inputs of compute_loss)."""
    trainer.model.train()
    # compute_loss reads this attribute, which Trainer's loop sets per step
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_grpo_step(benchmark, provider):
    harness.require_peer("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL / transformers deprecation notices
        with tempfile.TemporaryDirectory() as out, provider_context(provider):
            trainer = grpo_trainer(out, completions=COMPLETIONS, completion_length=COMPLETION_LENGTH)
            torch.manual_seed(0)
            inputs = generated_batch(trainer)
            model = trainer.model
            losses = []

            def step():
                model.zero_grad(set_to_none=True)
                loss = trainer.compute_loss(model, inputs)
                loss.backward()
                losses.append(float(loss))

            step()  # warm-up
            peak = harness.peak_memory_bytes(step)
            benchmark.group = f"GRPO step V={VOCAB} H={HIDDEN} completions={COMPLETIONS}x{COMPLETION_LENGTH}"
            benchmark.pedantic(step, rounds=3, iterations=1)
    harness.record(
        benchmark,
        provider,
        peak_bytes=peak,
        loss=losses[0],
        completion_tokens=int(inputs["completion_mask"].sum()),
    )
