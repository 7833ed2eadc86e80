"""The RL trainer: a model, prompts and a reward in, an aligned model out.

One iteration, in the order it runs (each phase a method named for it)::

    rollout      RolloutEngine samples num_generations responses per prompt (log-probs + floor)
    rewards      the user's reward function(s) score each completion
    score        no-grad pass: the policy's and the reference's log-probs of the sampled tokens
                 (fused, no logits; the rollout's logit floor, so the distribution is the sampled one)
                 (ppo: also the values of the rollout's states, from the value head or critic)
    advantages   the algorithm's registered estimator (alignkit.trainer.advantages)
    buffer       the samples go into a ReplayBuffer
    update       ppo_epochs passes; each streams token-budget minibatches out of the buffer,
                 accumulates gradients of ppo_policy_loss (normalised by the iteration's global token /
                 sequence counts, so the result does not depend on minibatch_tokens) and takes one
                 clipped optimizer step
    log          one metrics dict (tensors until one .item() batch), metrics.jsonl, checkpoint

The trainer composes alignkit's ops and re-implements none of their math. Dropout is off throughout
(the model runs in eval mode), so the first epoch's ratios are exactly 1 in fp32. Under ``torchrun``
each rank trains on its share of the iteration's prompts and gradients are summed across ranks
(alignkit/trainer/distributed.py), so N processes compute what one process would.
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
from ..ops.fused_ppo import fused_linear_ppo_loss
from ..ops.logprobs import fused_linear_logprobs, output_head
from ..ops.loss_config import PolicyLossConfig
from ..ops.losses import kl_penalty, ppo_policy_loss, value_loss
from ..ops.rollout_correction import rollout_correction_weights
from ..ops.shared_prompts import supports_shared_prompts
from ..replay_buffer import ReplayBuffer
from ..rollout import RolloutEngine
from . import checkpoint, distributed
from .advantages import Scored, advantages_for
from .config import GROUP_ALGORITHMS, VALUE_ALGORITHMS, RLConfig
from .env_rollouts import collect as collect_env_rollouts
from .env_rollouts import env_factory
from .group_minibatches import plan_group_minibatches, split_by_length
from .modeling import (
    apply_lora,
    autocast,
    autocast_dtype,
    enable_gradient_checkpointing,
    load_model,
    train_mode_without_dropout,
)
from .response_scoring import response_hidden, response_start, score_responses
from .rewards import RewardFunction
from .value import ValueHead, check_critic, critic_values, hidden_size_of

_FIELDS = {
    "tokens": torch.int64,
    "loss_mask": torch.uint8,
    "old_logp": torch.float32,
    "ref_logp": torch.float32,
    "advantages": torch.float32,
    "is_weights": torch.float32,
    "logit_floor": torch.float32,
}
_VALUE_FIELDS = {"old_values": torch.float32, "returns": torch.float32}  # ppo only
# ppo_policy_loss metrics aggregated like the loss (the others are token means of the minibatch).
_AGGREGATED_METRICS = ("pg_loss", "entropy", "kl")


def _is_max(key: str) -> bool:
    """Metrics reduced by maximum over minibatches and ranks (the rest are means)."""
    return key.endswith("max")


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
        env: instead of ``reward_fn`` and ``prompts``: a Gymnasium text environment (an id such as
            ``"alignkit/GuessNumber-v0"``, an instance, or a factory) that owns the prompts and the
            reward; episodes may take several turns (alignkit/trainer/env_rollouts.py).
        config: an :class:`RLConfig` (default: its defaults).
        ref_model: the KL reference (default: a frozen copy of ``model`` when ``kl_coef > 0``;
            none is loaded when ``kl_coef == 0``).
        critic: a value model for ``algorithm="ppo"`` (alignkit/trainer/value.py says which kinds);
            default: a value head on the policy's own body.
    """

    def __init__(
        self,
        model: object,
        tokenizer=None,
        *,
        reward_fn: object = None,
        prompts: Sequence[object] | None = None,
        env: object = None,
        config: RLConfig | None = None,
        ref_model: torch.nn.Module | None = None,
        critic: torch.nn.Module | None = None,
        reward_weights: Sequence[float] | None = None,
    ) -> None:
        self.config = config if config is not None else RLConfig()
        if not isinstance(self.config, RLConfig):
            raise TypeError(f"config must be an alignkit.RLConfig, got {type(self.config).__name__}")
        cfg = self.config
        if critic is not None and cfg.algorithm not in VALUE_ALGORITHMS:
            kind = " (a group method)" if cfg.algorithm in GROUP_ALGORITHMS else ""
            raise ValueError(
                f"critic is for a value-based algorithm (ppo); algorithm={cfg.algorithm!r}{kind} "
                "computes advantages without one"
            )
        self.make_env = None
        if env is not None:
            if reward_fn is not None or prompts is not None:
                raise ValueError(
                    "pass either env= or reward_fn= and prompts=, not both: an env owns its reward"
                )
            if cfg.algorithm == "dapo":
                raise ValueError(
                    "algorithm='dapo' refills prompts, which env= rollouts do not have; use grpo"
                )
            if tokenizer is None:
                raise ValueError("env= needs the tokenizer: observations are text")
            self.make_env = env_factory(env)
        elif reward_fn is None or prompts is None:
            raise ValueError("Trainer needs reward_fn= and prompts= (or env=)")
        self.model = load_model(model).eval()
        # LoRA: PEFT injects adapters into the model's modules; the trainer keeps computing on the
        # causal LM itself (alignkit/trainer/modeling.py).
        self.peft_model = apply_lora(self.model, cfg) if cfg.lora_rank > 0 else None
        if self.peft_model is not None:
            self.model = self.peft_model.get_base_model()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.tokenizer = tokenizer
        self.prompts = _check_prompts(prompts) if env is None else None
        self.device = next(self.model.parameters()).device
        distributed.init_from_env(self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if cfg.prompts_per_iteration % self.world_size:
            raise ValueError(
                f"prompts_per_iteration ({cfg.prompts_per_iteration}) must be divisible by the number of "
                f"processes ({self.world_size}): each rank trains on an equal share of the prompts"
            )
        self.prompts_per_rank = cfg.prompts_per_iteration // self.world_size
        # ppo's value function: a separate critic, or a head on the policy's body.
        self.critic = check_critic(critic).eval() if critic is not None else None
        self.value_head = None
        if cfg.algorithm in VALUE_ALGORITHMS and self.critic is None:
            self.value_head = ValueHead(hidden_size_of(self.model)).to(self.device)
        self.reward = (
            RewardFunction(reward_fn, reward_weights=reward_weights, tokenizer=tokenizer)
            if env is None
            else None
        )
        self.engine = RolloutEngine(self.model, tokenizer)
        # Distinct prompts forwarded once (response_scoring.py; with gradient checkpointing too,
        # alignkit/ops/shared_prompts.py says how); sliding-window models train whole rows.
        self.share_prompts = cfg.share_prompts and supports_shared_prompts(self.model)
        self.autocast_dtype = autocast_dtype(cfg, self.device)
        # One epoch and nothing that reads the policy's log-probs before the update (ppo's values,
        # an in-reward KL, rollout-correction weights): the update's forward gives them.
        self.old_logp_from_update = (
            cfg.ppo_epochs == 1
            and cfg.algorithm not in VALUE_ALGORITHMS
            and not cfg.kl_in_reward
            and cfg.rollout_correction is None
        )
        # Replicas start equal (rank 0's weights), before the reference copies them.
        distributed.broadcast_parameters(
            [self.model] + ([self.value_model] if self.value_model is not None else [])
        )
        # The KL reference: the given model, the base with the LoRA adapters off, or a frozen copy.
        self.ref_model = None
        self.reference_is_base = cfg.kl_coef > 0 and ref_model is None and self.peft_model is not None
        if cfg.kl_coef > 0 and not self.reference_is_base:
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(self.model)).eval()
            self.ref_model.requires_grad_(False)
        self.share_reference_prompts = cfg.share_prompts and (
            self.ref_model is None or supports_shared_prompts(self.ref_model)
        )
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
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.value_model is not None:
            value_params = [p for p in self.value_model.parameters() if p.requires_grad]
            groups.append({"params": value_params, "lr": cfg.critic_learning_rate or cfg.learning_rate})
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._board = None  # TensorBoard writer (rank 0, opened on the first record)

    @property
    def value_model(self) -> torch.nn.Module | None:
        """The module that learns values (the critic or the value head); None without one."""
        return self.critic if self.critic is not None else self.value_head

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_model is not None:
            params += [p for p in self.value_model.parameters() if p.requires_grad]
        return params

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

    def seed_for(self, iteration: int, stream: int) -> int:
        # Every random draw of an iteration comes from (seed, iteration, stream): a resumed run
        # repeats an uninterrupted one exactly, with no generator state to carry.
        return (self.config.seed * 1_000_003 + iteration * 7_919 + stream) % (2**31 - 1)

    # ------------------------------------------------------------------------- phases

    def select_prompts(self, iteration: int, stream: int = 0) -> list[dict[str, Any]]:
        """This rank's prompts for the iteration: its share of ``prompts_per_iteration`` drawn by a
        seeded shuffle of the prompt list (cycled), the same draw on every rank."""
        g = torch.Generator().manual_seed(self.seed_for(iteration, 100 + stream))
        order = torch.randperm(len(self.prompts), generator=g).tolist()
        chosen = [self.prompts[order[i % len(order)]] for i in range(self.config.prompts_per_iteration)]
        return distributed.shard(chosen, part=self.rank, parts=self.world_size)

    def rollout(self, prompts: list[dict[str, Any]], iteration: int, stream: int = 0):
        cfg = self.config
        # One seed per prompt, from its slot in the global batch: a prompt's samples do not depend
        # on which rank (or which batch) draws them.
        base = self.seed_for(iteration, stream)
        first = self.rank * len(prompts)
        seeds = [(base * 1_000_003 + (first + i) * 104_729) % (2**31 - 1) for i in range(len(prompts))]
        with autocast(self.autocast_dtype, self.device):
            return self.engine.generate(
                [p["prompt"] for p in prompts], n=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop, seed=seeds,
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

    def score(self, rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(old_logp, ref_logp, values) of the sampled tokens, each (N, T) float32 (ref_logp None
        without a reference, values None without a value function), in token-budget chunks.

        When nothing before the update needs the policy's log-probs (``old_logp_from_update``),
        this pass skips the policy: the single epoch's forward runs on the same, not yet updated
        weights, so its detached log-probs are the old ones (as TRL does for one iteration) and
        ``old_logp`` here is the sampler's, kept for the mismatch metrics the update computes."""
        with torch.no_grad(), autocast(self.autocast_dtype, self.device):
            return self._score(rollout)

    def _score(self, rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        N, T = rollout.response_ids.shape
        ids, mask = rollout.input_ids(), rollout.attention_mask()
        P = ids.shape[1] - T
        start = torch.full((N,), P, dtype=torch.int64, device=ids.device)
        floor = None
        if rollout.logit_floor is not None:  # a per-token field of the rows (prompt columns unread)
            floor = torch.cat([rollout.logit_floor.new_full((N, P), float("-inf")), rollout.logit_floor], 1)
        rows_per_chunk = max(1, self.config.minibatch_tokens // ids.shape[1])
        positions = rollout.position_ids() if self.critic is not None else None
        old, ref, values = [], [], []

        def scored(model, rows, share, *, hidden=False, truncated=True) -> tuple[torch.Tensor, ...]:
            """The rows' (N, T) outputs, in the rollout's response layout. ``truncated``: under the
            sampler's top-k / top-p floor (the policy); the reference's own distribution is not
            truncated (the floor is a policy logit, meaningless on the reference's logits)."""
            row_floor = floor[rows] if floor is not None and truncated else None
            layout, out = score_responses(
                model, ids[rows], mask[rows], start[rows], share_prompts=share,
                temperature=self.config.temperature, logit_floor=row_floor, return_hidden=hidden,
            )  # fmt: skip
            width = T - layout.columns.shape[1]  # responses may end before the rollout's width
            return tuple(
                torch.nn.functional.pad(o, (0, 0, 0, width) if o.dim() == 3 else (0, width)) for o in out
            )

        for begin in range(0, N, rows_per_chunk):
            rows = slice(begin, begin + rows_per_chunk)
            if self.value_head is not None:
                logp, hidden = scored(self.model, rows, self.share_prompts, hidden=True)
                values.append(self.value_head(hidden))
                old.append(logp)
            elif not self.old_logp_from_update:
                old.append(scored(self.model, rows, self.share_prompts)[0])
            if self.critic is not None:
                values.append(critic_values(self.critic, ids[rows], mask[rows], positions[rows], T))
            if self.ref_model is not None:
                ref.append(scored(self.ref_model, rows, self.share_reference_prompts, truncated=False)[0])
            elif self.reference_is_base:
                with self.peft_model.disable_adapter():
                    ref.append(scored(self.model, rows, self.share_prompts, truncated=False)[0])
        # Without a policy pass, the sampler's log-probs stand in until the update recomputes them.
        old_logp = torch.cat(old) if old else rollout.logprobs.float()
        return old_logp, (torch.cat(ref) if ref else None), (torch.cat(values) if values else None)

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
        returns: torch.Tensor | None,
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

        fields = {**_FIELDS, **(_VALUE_FIELDS if returns is not None else {})}
        buffer = ReplayBuffer(
            fields, capacity_tokens=max(int(attention.sum()), 1), seed=self.seed_for(iteration, 200)
        )
        values = (
            {"old_values": spread(scored.values), "returns": spread(returns)} if returns is not None else {}
        )
        buffer.add_padded(
            mask=attention, tokens=ids, loss_mask=spread(scored.mask).to(torch.uint8),
            old_logp=spread(scored.old_logp), ref_logp=spread(scored.ref_logp),
            advantages=spread(advantages), is_weights=spread(is_weights, 1.0) if is_weights is not None
            else spread(None, 1.0),
            logit_floor=spread(rollout.logit_floor, float("-inf")) if rollout.logit_floor is not None
            else spread(None, float("-inf")), **values,
        )  # fmt: skip
        return buffer

    def update(
        self, buffer: ReplayBuffer, scored: Scored, lengths: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """ppo_epochs optimizer steps over the buffer; returns the metric tensors of the last epoch
        (token-weighted over its minibatches) and the gradient norms. ``lengths``: (prompt, response)
        tokens per row (N,) each; with shared prompts, minibatches then keep groups together."""
        cfg = self.config
        # The iteration's global counts (over every rank): the loss normalisers.
        counts = torch.stack([scored.mask.sum(), (scored.mask.sum(-1) > 0).sum().float()])
        total_tokens, total_rows = distributed.all_reduce_sum(counts).clamp(min=1.0).unbind()
        token_mean = self.loss_config.agg == "token-mean"
        loss_config = (
            dataclasses.replace(self.loss_config, agg_scale=float(total_tokens))
            if token_mean
            else self.loss_config
        )
        if cfg.algorithm == "dr_grpo" and loss_config.agg == "seq-mean-token-sum-norm":
            budget = cfg.max_new_tokens * (cfg.max_turns if self.make_env is not None else 1)
            loss_config = dataclasses.replace(loss_config, agg_scale=float(budget))
        metrics: dict[str, torch.Tensor] = {}
        for epoch in range(cfg.ppo_epochs):
            sums: dict[str, torch.Tensor] = {}
            maxes: dict[str, torch.Tensor] = {}
            self.optimizer.zero_grad(set_to_none=True)
            for batch in self._minibatches(buffer, scored, lengths, epoch):
                tokens = batch["loss_mask"].sum().float()
                rows = (batch["loss_mask"].sum(-1) > 0).sum().float()
                scale = 1.0 if token_mean else rows / total_rows  # global normalisation
                with (
                    autocast(self.autocast_dtype, self.device),
                    train_mode_without_dropout(self.model, cfg.gradient_checkpointing),
                ):
                    loss, out = self._minibatch_loss(batch, loss_config, scale, float(total_tokens))
                loss.backward()
                for key, value in out.items():
                    value = value.detach()
                    if _is_max(key):
                        maxes[key] = torch.maximum(maxes[key], value) if key in maxes else value
                        continue
                    # Loss-aggregated metrics are already this minibatch's share of the iteration's
                    # value (global normaliser); token means are weighted by the minibatch's tokens.
                    share = value * scale * total_tokens if key in _AGGREGATED_METRICS else value * tokens
                    sums[key] = sums.get(key, 0.0) + share
            distributed.all_reduce_gradients(self.trainable_parameters())
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            if epoch == cfg.ppo_epochs - 1:
                keys = sorted(sums)
                totals = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys])) if keys else []
                metrics = {k: v / total_tokens for k, v in zip(keys, totals, strict=True)}
                if maxes:
                    peaks = distributed.all_reduce_max(torch.stack([maxes[k] for k in sorted(maxes)]))
                    metrics.update(zip(sorted(maxes), peaks, strict=True))
                metrics["grad_norm"] = grad_norm
        metrics["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])  # the rate these steps used
        self.scheduler.step()
        return metrics

    def _minibatches(self, buffer: ReplayBuffer, scored: Scored, lengths, epoch: int):
        """The epoch's token-budget minibatches (padded layout): whole groups together when the
        prompts are shared (group_minibatches.py), else the buffer's length-binned epoch."""
        repeated = scored.group_ids.unique().numel() < len(buffer)  # some group holds several rows
        if not (self.share_prompts and lengths is not None and repeated):
            yield from buffer.epoch(max_tokens=self.config.minibatch_tokens, layout="padded")
            return
        generator = torch.Generator().manual_seed(self.seed_for(self.iteration, 300 + epoch))
        ids = buffer.live_ids
        plan = plan_group_minibatches(
            *lengths, scored.group_ids, max_tokens=self.config.minibatch_tokens, generator=generator
        )
        prompts, responses, groups = lengths[0].tolist(), lengths[1].tolist(), scored.group_ids.tolist()
        for rows in plan:
            for part in split_by_length(rows, prompts, responses, groups):  # less response padding
                yield buffer.get([ids[r] for r in part], layout="padded")

    def _minibatch_loss(self, batch, loss_config: PolicyLossConfig, scale, total_tokens: float):
        """The minibatch's share of the iteration's loss (policy, plus ``vf_coef`` x value for ppo)
        and its metrics (token means over the minibatch). The loss runs in the response layout
        (response_scoring.py): the rows' per-token fields are gathered to the scored tokens. With
        old log-probs from the scoring pass, ``fused_linear_ppo_loss`` takes the hidden states to
        the loss in one pass; on-policy (``old_logp_from_update``) the log-probs come first, since
        they are the old ones."""
        ids = batch["tokens"]
        attention = batch.attention_mask.long()
        layout, response_ids, hidden = response_hidden(
            self.model, ids, attention, response_start(batch["loss_mask"], attention),
            share_prompts=self.share_prompts,
        )  # fmt: skip
        field = layout.gather
        mask = field(batch["loss_mask"]).float()
        has_reference = self.ref_model is not None or self.reference_is_base
        ref = field(batch["ref_logp"]) if has_reference and not self.config.kl_in_reward else None
        is_weights = field(batch["is_weights"], 1.0) if self.config.rollout_correction is not None else None
        old_logp, advantages = field(batch["old_logp"]), field(batch["advantages"])
        # The rollouts carry a floor exactly when top-k / top-p truncation is on (no per-batch check).
        truncated = self.config.top_k > 0 or self.config.top_p < 1.0
        floor = field(batch["logit_floor"], float("-inf")) if truncated else None
        weight, bias = output_head(self.model)
        states = hidden.to(weight.dtype)  # an fp32 head on a bf16-autocast body scores fp32 states
        labels = response_ids.masked_fill(mask == 0, -100)  # the trained tokens only
        extra_metrics: dict[str, torch.Tensor] = {}
        if self.old_logp_from_update:
            logp, entropy = fused_linear_logprobs(
                states, weight, labels, bias=bias, temperature=self.config.temperature,
                return_entropy=True, logit_floor=floor,
            )  # fmt: skip
            # The weights are not updated yet: this forward's log-probs are the old ones, and the
            # buffer's old_logp holds the sampler's (the mismatch metrics, as correction() logs).
            _, extra_metrics = rollout_correction_weights(
                logp.detach(), old_logp, mask, level=self.config.rollout_correction_level,
                mode="tis", threshold=self.config.rollout_correction_threshold,
            )  # fmt: skip
            loss, metrics = ppo_policy_loss(
                logp, logp.detach(), advantages, mask,
                config=loss_config, entropy=entropy, ref_logp=ref, is_weights=is_weights,
            )  # fmt: skip
        else:
            loss, metrics = fused_linear_ppo_loss(
                states, weight, labels, old_logp, advantages, mask,
                bias=bias, temperature=self.config.temperature, config=loss_config, ref_logp=ref,
                is_weights=is_weights, logit_floor=floor,
            )  # fmt: skip
        metrics = {**metrics, **extra_metrics}
        loss = loss * scale
        if self.value_model is not None:
            if self.value_head is not None:
                values = self.value_head(hidden)
            else:
                positions = (attention.cumsum(-1) - 1).clamp_min(0)
                shifted = critic_values(self.critic, ids, attention, positions, ids.shape[1] - 1)
                # (N, L - 1): column c - 1 predicts the token at column c
                values = shifted.gather(1, (layout.columns - 1).clamp_min(0)).masked_fill(~layout.mask, 0.0)
            # Token mean over the iteration's global token count, like the policy's token-mean.
            vf, vf_metrics = value_loss(
                values, field(batch["old_values"]), field(batch["returns"]), mask,
                clip=self.config.value_clip, agg="token-mean", agg_scale=total_tokens,
            )  # fmt: skip
            loss = loss + self.config.vf_coef * vf
            tokens = mask.sum().clamp(min=1.0)
            metrics = {**metrics, **vf_metrics, "vf_loss": vf_metrics["vf_loss"] * total_tokens / tokens}
        return loss, metrics

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
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
        if self.make_env is not None:
            return (None, *collect_env_rollouts(self, iteration))
        prompts = self.select_prompts(iteration)
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
        old_logp, ref_logp, values = self.score(rollout)
        mask = rollout.response_mask.float()
        scored = Scored(
            scores=scores, group_ids=rollout.group_ids, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
            values=values, turn_rewards=getattr(rollout, "turn_rewards", None),
        )  # fmt: skip
        advantages, returns = advantages_for(cfg.algorithm, scored, cfg)
        is_weights, correction = (None, {}) if self.old_logp_from_update else self.correction(rollout, scored)
        P = rollout.prompt_ids.shape[1]
        lengths = (rollout.prompt_mask.sum(-1), rollout.attention_mask()[:, P:].sum(-1))
        buffer = self.buffer(rollout, scored, advantages, returns, is_weights, iteration)
        train = self.update(buffer, scored, lengths)
        t_train = time.perf_counter() - t1
        metrics = self.log_metrics(
            iteration, scored, {**train, **correction}, per_fn, extra, t_rollout, t_train
        )
        self.iteration += 1
        return metrics

    def log_metrics(self, iteration, scored, train, per_fn, extra, t_rollout, t_train) -> dict[str, Any]:
        """One metrics dict over the whole iteration (every rank's samples): tensors until one
        ``.tolist()``; under torchrun one all-gather of the scores and one all-reduce of the sums."""
        mask = scored.mask
        live = mask != 0
        local_tokens = mask.sum()
        sums = {"tokens": local_tokens}
        if scored.ref_logp is not None:
            k3 = kl_penalty(scored.old_logp, scored.ref_logp, kl_estimator="k3")
            sums["kl"] = torch.where(live, k3, 0.0).sum()
        # Per-rank token means (the rollout mismatch metrics) enter weighted by the rank's tokens.
        local_means = {
            k: v for k, v in train.items() if k.startswith(("rollout/", "rollout_is/")) and not _is_max(k)
        }
        peaks = {k: v for k, v in train.items() if k.startswith(("rollout/", "rollout_is/")) and _is_max(k)}
        sums.update({k: v.float() * local_tokens for k, v in local_means.items()})
        sums.update({k: torch.tensor(float(v)) for k, v in per_fn.items()})  # equal rows per rank
        if scored.values is not None:
            sums["value"] = torch.where(live, scored.values, 0.0).sum()
        keys = list(sums)
        totals = dict(
            zip(keys, distributed.all_reduce_sum(torch.stack([sums[k].float() for k in keys])), strict=True)
        )
        tokens = totals["tokens"].clamp(min=1.0)
        scores = distributed.all_gather_rows(scored.scores.float())
        lengths = distributed.all_gather_rows(mask.sum(-1))
        values = {
            "reward/mean": scores.mean(),
            "reward/std": scores.std() if scores.numel() > 1 else torch.zeros(()),
            "entropy/mean": train.get("entropy", torch.zeros(())),
            "response_length/mean": lengths.mean(),
            "policy/loss": train.get("pg_loss", torch.zeros(())),
            "policy/clipfrac": train.get("pg_clipfrac", torch.zeros(())),
            "policy/approx_kl": train.get("ppo_kl", torch.zeros(())),
            "policy/grad_norm": train.get("grad_norm", torch.zeros(())),
            "lr": train["lr"],
            **{k: totals[k] / tokens for k in local_means},
            **peaks,
        }
        if scored.ref_logp is not None:
            values["kl/mean"] = totals["kl"] / tokens
        if scored.values is not None:
            values["value/loss"] = train.get("vf_loss", torch.zeros(()))
            values["value/clipfrac"] = train.get("vf_clipfrac", torch.zeros(()))
            values["value/mean"] = totals["value"] / tokens
        numbers = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist(), strict=True))
        wall = t_rollout + t_train
        out: dict[str, Any] = {
            "iteration": iteration,
            **numbers,
            "kl/mean": numbers.get("kl/mean"),  # None without a reference model (kl_coef = 0)
            **{k: float(totals[k]) / self.world_size for k in per_fn},
            **extra,
            "time/rollout_s": t_rollout,
            "time/train_s": t_train,
            "tokens_per_s": float(totals["tokens"]) / max(wall, 1e-9),
        }
        return out

    def train(self, *, resume_from: str | Path | None = None, callback=None) -> list[dict[str, Any]]:
        """Run the remaining iterations (all of them, or those after ``resume_from``: a checkpoint
        folder, or ``"latest"`` for the newest under ``output_dir``); returns one metrics dict per
        iteration run, also appended to ``output_dir/metrics.jsonl``. ``callback(metrics)`` runs
        after each iteration; returning False stops training there."""
        cfg = self.config
        if resume_from is not None:
            self.resume(resume_from)
        bar = _progress(cfg.progress and self.rank == 0, cfg.iterations, self.iteration)
        run: list[dict[str, Any]] = []
        try:
            while self.iteration < cfg.iterations:
                metrics = self.step()
                run.append(metrics)
                self.record(metrics, final=self.iteration == cfg.iterations)
                if bar is not None:
                    kl = metrics["kl/mean"]
                    bar.set_postfix(
                        reward=f"{metrics['reward/mean']:.3f}", kl="-" if kl is None else f"{kl:.4f}"
                    )
                    bar.update(1)
                if callback is not None and callback(metrics) is False:
                    break
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return run

    def record(self, metrics: dict[str, Any], *, final: bool = False) -> None:
        """Keep one iteration's metrics: the history, ``output_dir/metrics.jsonl`` and TensorBoard
        (rank 0), and a checkpoint when ``save_every`` (or ``final``) says so. :meth:`train` calls
        it after every :meth:`step`; a loop of its own that calls ``step`` should too."""
        cfg = self.config
        self.history.append(metrics)
        if cfg.output_dir is None:
            return
        out_dir = Path(cfg.output_dir)
        if self.rank == 0:  # one process writes files
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self._board is None and cfg.tensorboard is not False:
                self._board = _tensorboard(cfg.tensorboard, out_dir) or False  # False: none to open
            if self._board:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key != "iteration":
                        self._board.add_scalar(key, value, global_step=metrics["iteration"])
        if final or (cfg.save_every and self.iteration % cfg.save_every == 0):
            self.save_checkpoint()

    def close(self) -> None:
        """Flush and close the TensorBoard writer (a later :meth:`record` opens a new one)."""
        if self._board:
            self._board.close()
        self._board = None

    # ------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<iteration>`` under output_dir (rank 0 writes; every rank waits)."""
        if self.config.output_dir is None:
            raise ValueError("save_checkpoint needs config.output_dir, got None")
        path = Path(self.config.output_dir) / f"checkpoint-{self.iteration}"
        if self.rank == 0:
            state = {
                "iteration": self.iteration,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "config": self.config.to_dict(),
                "value_model": self.value_model.state_dict() if self.value_model is not None else None,
            }
            path = checkpoint.save(
                self.config.output_dir, self.iteration, model=self.peft_model or self.model,
                tokenizer=self.tokenizer,
                state=state, keep=self.config.keep_checkpoints,
            )  # fmt: skip
        distributed.barrier()
        return path

    def resume(self, path: str | Path) -> None:
        if path == "latest":
            found = checkpoint.list_checkpoints(self.config.output_dir or ".")
            if not found:
                raise FileNotFoundError(f"no checkpoint to resume under {self.config.output_dir!r}")
            path = found[-1]
        state = checkpoint.load(path, model=self.peft_model or self.model)
        if self.value_model is not None:
            if state.get("value_model") is None:
                raise ValueError(
                    f"checkpoint {path} holds no value model, which algorithm={self.config.algorithm!r} needs"
                )
            self.value_model.load_state_dict(state["value_model"])
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


def _tensorboard(wanted: bool | None, out_dir: Path):
    """A SummaryWriter on ``out_dir/tensorboard`` (wanted=None: when tensorboard is installed)."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if wanted:
            raise ImportError(
                "tensorboard=True needs TensorBoard: pip install 'alignkit[tensorboard]'"
            ) from exc
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))
