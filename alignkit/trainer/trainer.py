"""The RL trainer: a model, prompts and a reward in, an aligned model out.

One iteration, in the order it runs (each phase a method named for it)::

    rollout      RolloutEngine samples num_generations responses per prompt (log-probs + floor)
    rewards      the user's reward function(s) score each completion
    score        no-grad pass: the policy's and the reference's log-probs of the sampled tokens
                 (fused, no logits; the rollout's logit floor, so the distribution is the sampled one)
    advantages   the algorithm's registered estimator (alignkit.trainer.advantages)
    buffer       the samples go into a ReplayBuffer
    update       ppo_epochs passes; each streams token-budget minibatches out of the buffer,
                 accumulates gradients of ppo_policy_loss (normalised by the iteration's global token /
                 sequence counts, so the result does not depend on minibatch_tokens) and takes one
                 clipped optimizer step
    log          one metrics dict (tensors until one .item() batch), metrics.jsonl, checkpoint

The trainer composes alignkit's ops and re-implements none of their math. Dropout is off throughout
(the model runs in eval mode), so the first epoch's ratios are exactly 1 in fp32.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..ops.logprobs import causal_lm_logprobs
from ..ops.loss_config import PolicyLossConfig
from ..ops.losses import kl_penalty, ppo_policy_loss
from ..ops.rollout_correction import rollout_correction_weights
from ..replay_buffer import ReplayBuffer
from ..rollout import RolloutEngine
from . import checkpoint
from .advantages import Scored, advantages_for
from .config import GROUP_ALGORITHMS, RLConfig
from .rewards import RewardFunction

_FIELDS = {
    "tokens": torch.int64,
    "loss_mask": torch.uint8,
    "old_logp": torch.float32,
    "ref_logp": torch.float32,
    "advantages": torch.float32,
    "is_weights": torch.float32,
    "logit_floor": torch.float32,
}


def _load_model(model: object) -> torch.nn.Module:
    if isinstance(model, (str, Path)):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM module or a path / hub id, got {type(model).__name__}")
    return model


def _check_prompts(prompts: object) -> list[dict[str, Any]]:
    """Prompts as dicts with a ``prompt`` key (strings, token-id lists or chat messages) and extra
    columns, which reach the reward function as ``meta`` (TRL's dataset-column convention)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty list")
    rows = []
    for i, p in enumerate(prompts):
        row = dict(p) if isinstance(p, dict) else {"prompt": p}
        if "prompt" not in row:
            raise ValueError(f"prompts[{i}] is a dict without a 'prompt' key: {sorted(row)}")
        if isinstance(row["prompt"], str) and not row["prompt"]:
            raise ValueError(f"prompts[{i}] is an empty string")
        rows.append(row)
    columns = set(rows[0]) - {"prompt"}
    for i, row in enumerate(rows):
        if set(row) - {"prompt"} != columns:
            raise ValueError(
                f"prompts[{i}] has columns {sorted(row)}, prompts[0] has {sorted(columns | {'prompt'})}"
            )
    return rows


class Trainer:
    """RL fine-tuning of a Hugging Face causal LM (see the module docstring for one iteration).

    Args:
        model: a causal LM module, or a path / hub id for ``from_pretrained``.
        tokenizer: its tokenizer (needed for string prompts and completions).
        reward_fn: ``reward_fn(prompts, completions, **meta) -> list[float]``, async allowed, a list
            of them (weighted by ``reward_weights``), or a one-label sequence-classification model.
        prompts: strings, token-id lists, chat-message lists, or dicts with a ``prompt`` key whose
            other keys are passed to the reward as ``meta`` columns.
        config: an :class:`RLConfig` (default: its defaults).
        ref_model: the KL reference (default: a frozen copy of ``model`` when ``kl_coef > 0``;
            none is loaded when ``kl_coef == 0``).
        critic: a value model, for ``algorithm="ppo"`` (not available yet: see the README).
    """

    def __init__(
        self,
        model: object,
        tokenizer=None,
        *,
        reward_fn: object,
        prompts: Sequence[object],
        config: RLConfig | None = None,
        ref_model: torch.nn.Module | None = None,
        critic: torch.nn.Module | None = None,
        reward_weights: Sequence[float] | None = None,
    ) -> None:
        self.config = config if config is not None else RLConfig()
        if not isinstance(self.config, RLConfig):
            raise TypeError(f"config must be an alignkit.RLConfig, got {type(self.config).__name__}")
        if critic is not None:
            kind = " (a group method)" if self.config.algorithm in GROUP_ALGORITHMS else ""
            raise ValueError(
                f"critic is for a value-based algorithm (ppo); algorithm={self.config.algorithm!r}{kind} "
                "computes advantages without one"
            )
        self.model = _load_model(model).eval()
        self.tokenizer = tokenizer
        self.prompts = _check_prompts(prompts)
        self.reward = RewardFunction(reward_fn, reward_weights=reward_weights, tokenizer=tokenizer)
        self.engine = RolloutEngine(self.model, tokenizer)
        self.ref_model = None
        if self.config.kl_coef > 0:
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(self.model)).eval()
            self.ref_model.requires_grad_(False)
        self.loss_config = PolicyLossConfig(
            clip_low=self.config.clip_low,
            clip_high=self.config.clip_high,
            dual_clip=self.config.dual_clip,
            agg=self.config.agg,
            agg_scale=None,
            kl_coef=0.0 if self.config.kl_in_reward else self.config.kl_coef,
            kl_estimator="k3",
            entropy_coef=self.config.entropy_coef,
            loss_type=self.config.loss_type,
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=self.config.learning_rate,
            betas=self.config.adam_betas,
            weight_decay=self.config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.iteration = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------- schedule

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_iterations:
            return (step + 1) / (cfg.warmup_iterations + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(cfg.iterations - cfg.warmup_iterations, 1)
        done = min((step - cfg.warmup_iterations) / span, 1.0)
        return 1.0 - done if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def _seed(self, iteration: int, stream: int) -> int:
        # Every random draw of an iteration comes from (seed, iteration, stream): a resumed run
        # repeats an uninterrupted one exactly, with no generator state to carry.
        return (self.config.seed * 1_000_003 + iteration * 7_919 + stream) % (2**31 - 1)

    # ------------------------------------------------------------------------- phases

    def select_prompts(self, iteration: int, count: int, stream: int = 0) -> list[dict[str, Any]]:
        """``count`` prompts for this iteration: a seeded shuffle of the prompt list, cycled."""
        g = torch.Generator().manual_seed(self._seed(iteration, 100 + stream))
        order = torch.randperm(len(self.prompts), generator=g).tolist()
        return [self.prompts[order[i % len(order)]] for i in range(count)]

    def rollout(self, prompts: list[dict[str, Any]], iteration: int, stream: int = 0):
        cfg = self.config
        return self.engine.generate(
            [p["prompt"] for p in prompts], n=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop,
            seed=self._seed(iteration, stream),
        )  # fmt: skip

    def rewards(self, prompts: list[dict[str, Any]], rollout) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.config.num_generations
        rows = [p for p in prompts for _ in range(n)]
        texts = [_prompt_text(r["prompt"], self.tokenizer) for r in rows]
        completions = rollout.texts if rollout.texts is not None else [""] * len(rows)
        meta: dict[str, list] = {key: [r[key] for r in rows] for key in rows[0] if key != "prompt"}
        meta["completion_ids"] = [
            ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, rollout.response_mask, strict=True)
        ]
        return self.reward(texts, completions, meta)

    @torch.no_grad()
    def score(self, rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(old_logp, ref_logp) of the sampled tokens, (N, T) float32, in token-budget chunks."""
        T = rollout.response_ids.shape[1]
        ids, mask, positions = rollout.input_ids(), rollout.attention_mask(), rollout.position_ids()
        rows_per_chunk = max(1, self.config.minibatch_tokens // ids.shape[1])
        old, ref = [], []
        for start in range(0, ids.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            floor = None if rollout.logit_floor is None else rollout.logit_floor[rows]
            kwargs = dict(
                attention_mask=mask[rows], position_ids=positions[rows], logits_to_keep=T,
                temperature=self.config.temperature, logit_floor=floor,
            )  # fmt: skip
            old.append(causal_lm_logprobs(self.model, ids[rows], **kwargs))
            if self.ref_model is not None:
                ref.append(causal_lm_logprobs(self.ref_model, ids[rows], **kwargs))
        return torch.cat(old), (torch.cat(ref) if ref else None)

    def correction(self, rollout, scored: Scored) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Importance weights for the gap between the sampler's and the trainer's log-probs (None
        unless config.rollout_correction), and the mismatch metrics, logged every iteration."""
        cfg = self.config
        weights, metrics = rollout_correction_weights(
            scored.old_logp, rollout.logprobs, scored.mask, level=cfg.rollout_correction_level,
            mode=cfg.rollout_correction or "tis", threshold=cfg.rollout_correction_threshold,
        )  # fmt: skip
        return (weights if cfg.rollout_correction is not None else None), metrics

    def buffer(
        self,
        rollout,
        scored: Scored,
        advantages: torch.Tensor,
        is_weights: torch.Tensor | None,
        iteration: int,
    ) -> ReplayBuffer:
        """The iteration's samples as whole sequences (prompt + response, one contiguous run of
        tokens per row); per-token fields describe the token at their position."""
        ids, attention = rollout.input_ids(), rollout.attention_mask()
        P = rollout.prompt_ids.shape[1]
        full = torch.zeros(ids.shape, dtype=torch.float32)

        def spread(x: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
            out = full.clone().fill_(fill)
            if x is not None:
                out[:, P:] = x.float()
            return out

        buffer = ReplayBuffer(
            _FIELDS, capacity_tokens=max(int(attention.sum()), 1), seed=self._seed(iteration, 200)
        )
        buffer.add_padded(
            mask=attention, tokens=ids, loss_mask=spread(scored.mask).to(torch.uint8),
            old_logp=spread(scored.old_logp), ref_logp=spread(scored.ref_logp),
            advantages=spread(advantages), is_weights=spread(is_weights, 1.0) if is_weights is not None
            else spread(None, 1.0),
            logit_floor=spread(rollout.logit_floor, float("-inf")) if rollout.logit_floor is not None
            else spread(None, float("-inf")),
        )  # fmt: skip
        return buffer

    def update(self, buffer: ReplayBuffer, scored: Scored) -> dict[str, torch.Tensor]:
        """ppo_epochs optimizer steps over the buffer; returns the metric tensors of the last epoch
        (token-weighted over its minibatches) and the gradient norms."""
        cfg = self.config
        total_tokens = scored.mask.sum().clamp(min=1.0)
        total_rows = (scored.mask.sum(-1) > 0).sum().clamp(min=1).float()
        token_mean = self.loss_config.agg == "token-mean"
        loss_config = (
            dataclasses.replace(self.loss_config, agg_scale=float(total_tokens))
            if token_mean
            else self.loss_config
        )
        if cfg.algorithm == "dr_grpo" and loss_config.agg == "seq-mean-token-sum-norm":
            loss_config = dataclasses.replace(loss_config, agg_scale=float(cfg.max_new_tokens))
        metrics: dict[str, torch.Tensor] = {}
        for epoch in range(cfg.ppo_epochs):
            sums: dict[str, torch.Tensor] = {}
            self.optimizer.zero_grad(set_to_none=True)
            for batch in buffer.epoch(max_tokens=cfg.minibatch_tokens, layout="padded"):
                loss, out = self._minibatch_loss(batch, loss_config)
                tokens = batch["loss_mask"][:, 1:].sum().float()
                rows = (batch["loss_mask"][:, 1:].sum(-1) > 0).sum().float()
                scale = 1.0 if token_mean else rows / total_rows  # global normalisation
                (loss * scale).backward()
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() * tokens
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            if epoch == cfg.ppo_epochs - 1:
                metrics = {k: v / total_tokens for k, v in sums.items()}
                metrics["grad_norm"] = grad_norm
        metrics["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])  # the rate these steps used
        self.scheduler.step()
        return metrics

    def _minibatch_loss(self, batch, loss_config: PolicyLossConfig):
        ids = batch["tokens"]
        attention = batch.attention_mask.long()
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        # The rollouts carry a floor exactly when top-k / top-p truncation is on (no per-batch check).
        truncated = self.config.top_k > 0 or self.config.top_p < 1.0
        logp, entropy = causal_lm_logprobs(
            self.model, ids, attention_mask=attention, position_ids=positions,
            temperature=self.config.temperature, return_entropy=True,
            logit_floor=batch["logit_floor"][:, 1:] if truncated else None, chunk_size=None,
        )  # fmt: skip
        mask = batch["loss_mask"][:, 1:].float()
        ref = (
            batch["ref_logp"][:, 1:] if self.ref_model is not None and not self.config.kl_in_reward else None
        )
        is_weights = batch["is_weights"][:, 1:] if self.config.rollout_correction is not None else None
        loss, metrics = ppo_policy_loss(
            logp, batch["old_logp"][:, 1:], batch["advantages"][:, 1:], mask,
            config=loss_config, entropy=entropy, ref_logp=ref, is_weights=is_weights,
        )  # fmt: skip
        return loss, metrics

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        if self.config.max_grad_norm is None:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        return torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    # ------------------------------------------------------------------------- the loop

    def sample(self, iteration: int):
        """Rollout + rewards (+ DAPO's dynamic sampling: groups whose rewards are all equal carry no
        signal and are replaced by fresh ones, up to ``dapo_max_refills`` extra rollouts)."""
        cfg = self.config
        prompts = self.select_prompts(iteration, cfg.prompts_per_iteration)
        rollout = self.rollout(prompts, iteration)
        scores, per_fn = self.rewards(prompts, rollout)
        if cfg.algorithm != "dapo":
            return prompts, rollout, scores, per_fn, {}
        from .dynamic_sampling import refill_groups

        return refill_groups(self, iteration, prompts, rollout, scores, per_fn)

    def step(self) -> dict[str, Any]:
        """Run one iteration; returns its metrics."""
        cfg = self.config
        iteration = self.iteration
        t0 = time.perf_counter()
        _, rollout, scores, per_fn, extra = self.sample(iteration)
        t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        old_logp, ref_logp = self.score(rollout)
        mask = rollout.response_mask.float()
        scored = Scored(
            scores=scores, group_ids=rollout.group_ids, mask=mask, old_logp=old_logp, ref_logp=ref_logp
        )
        advantages = advantages_for(cfg.algorithm, scored, cfg)
        is_weights, correction = self.correction(rollout, scored)
        train = self.update(self.buffer(rollout, scored, advantages, is_weights, iteration), scored)
        t_train = time.perf_counter() - t1
        metrics = self.log_metrics(
            iteration, scored, {**train, **correction}, per_fn, extra, t_rollout, t_train
        )
        self.iteration += 1
        return metrics

    def log_metrics(self, iteration, scored, train, per_fn, extra, t_rollout, t_train) -> dict[str, Any]:
        mask = scored.mask
        tokens = mask.sum().clamp(min=1.0)
        live = mask != 0
        values = {
            "reward/mean": scored.scores.mean(),
            "reward/std": scored.scores.std() if scored.scores.numel() > 1 else torch.zeros(()),
            "entropy/mean": train.get("entropy", torch.zeros(())),
            "response_length/mean": mask.sum(-1).mean(),
            "policy/loss": train.get("pg_loss", torch.zeros(())),
            "policy/clipfrac": train.get("pg_clipfrac", torch.zeros(())),
            "policy/approx_kl": train.get("ppo_kl", torch.zeros(())),
            "policy/grad_norm": train.get("grad_norm", torch.zeros(())),
            "lr": train["lr"],
            **{k: v for k, v in train.items() if k.startswith(("rollout/", "rollout_is/"))},
        }
        if scored.ref_logp is not None:
            k3 = kl_penalty(scored.old_logp, scored.ref_logp, kl_estimator="k3")
            values["kl/mean"] = torch.where(live, k3, 0.0).sum() / tokens
        numbers = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist(), strict=True))
        wall = t_rollout + t_train
        out: dict[str, Any] = {
            "iteration": iteration,
            **numbers,
            "kl/mean": numbers.get("kl/mean"),  # None without a reference model (kl_coef = 0)
            **per_fn,
            **extra,
            "time/rollout_s": t_rollout,
            "time/train_s": t_train,
            "tokens_per_s": float(mask.sum()) / max(wall, 1e-9),
        }
        return out

    def train(self, *, resume_from: str | Path | None = None) -> list[dict[str, Any]]:
        """Run the remaining iterations (all of them, or those after ``resume_from``: a checkpoint
        folder, or ``"latest"`` for the newest under ``output_dir``); returns one metrics dict per
        iteration run, also appended to ``output_dir/metrics.jsonl``."""
        cfg = self.config
        if resume_from is not None:
            self.resume(resume_from)
        out_dir = Path(cfg.output_dir) if cfg.output_dir is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        bar = _progress(cfg.progress, cfg.iterations, self.iteration)
        run: list[dict[str, Any]] = []
        try:
            while self.iteration < cfg.iterations:
                metrics = self.step()
                run.append(metrics)
                self.history.append(metrics)
                if out_dir is not None:
                    with open(out_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    done = self.iteration == cfg.iterations
                    if done or (cfg.save_every and self.iteration % cfg.save_every == 0):
                        self.save_checkpoint()
                if bar is not None:
                    kl = metrics["kl/mean"]
                    bar.set_postfix(
                        reward=f"{metrics['reward/mean']:.3f}", kl="-" if kl is None else f"{kl:.4f}"
                    )
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return run

    # ------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        if self.config.output_dir is None:
            raise ValueError("save_checkpoint needs config.output_dir, got None")
        state = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
        }
        return checkpoint.save(
            self.config.output_dir, self.iteration, model=self.model, tokenizer=self.tokenizer, state=state,
            keep=self.config.keep_checkpoints,
        )  # fmt: skip

    def resume(self, path: str | Path) -> None:
        if path == "latest":
            found = checkpoint.list_checkpoints(self.config.output_dir or ".")
            if not found:
                raise FileNotFoundError(f"no checkpoint to resume under {self.config.output_dir!r}")
            path = found[-1]
        state = checkpoint.load(path, model=self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = _checks.non_negative_int(state["iteration"], "iteration")


def _prompt_text(prompt: object, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        return str(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return "\n".join(str(m.get("content", "")) for m in prompt)
    return tokenizer.decode(list(prompt))


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="alignkit train", unit="it", dynamic_ncols=True)
