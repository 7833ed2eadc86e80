"""``PPO`` and ``GRPO`` in the Stable-Baselines3 shape, a thin front over :class:`alignkit.Trainer`::

    model = alignkit.envs.PPO("path/or/hub-id", "alignkit/GuessNumber-v0", max_new_tokens=4)
    model.learn(total_timesteps=2_000)              # trainer iterations until 2000 env steps
    obs, info = env.reset(seed=0)
    action, state = model.predict(obs, deterministic=True)   # the model's reply (greedy)
    obs, reward, terminated, truncated, info = env.step(action)
    model.save("agent"); model = alignkit.envs.PPO.load("agent", env="alignkit/GuessNumber-v0")

A timestep is one env step: one model reply. ``learn`` runs ``trainer.step()`` (one rollout +
update iteration of ``prompts_per_iteration x num_generations`` episodes) until the env steps
counted reach ``total_timesteps``; every rollout, advantage and loss is the trainer's.

``predict``'s ``state`` is SB3's recurrent-state slot, used for what a language model's recurrence
is: the conversation so far, as token ids (:class:`Conversation`). A text env's ``step`` returns
only its *new* turn, so the next call passes the state back (``predict(obs, state=state)``) and the
model sees exactly the token history ``collect_episodes`` would have built in training (the reply's
eos included, the observation appended as ids; alignkit/envs/turns.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from .core import check_observation, is_messages
from .turns import TurnEncoder

CONFIG_FILE = "alignkit_algorithm.json"  # what save() writes next to the model and tokenizer
VALUE_HEAD_FILE = "value_head.pt"  # ppo's value head (absent for grpo, or with a critic model)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """``predict``'s state: the token ids of an episode so far (prompt, replies, observations), in
    the layout of :func:`alignkit.envs.collect_episodes`."""

    ids: tuple[int, ...]  # the whole history, the last reply included
    chat: bool  # chat mode (the first observation was chat messages)
    eos_text: str | None  # the decoded eos that ended the last reply (None: cut at the budget / a stop)


def _load_policy(policy: object, tokenizer):
    """(model, tokenizer) from a module (its tokenizer required) or a path / hub id."""
    if isinstance(policy, (str, os.PathLike)):
        import transformers

        source = os.fspath(policy)
        model = transformers.AutoModelForCausalLM.from_pretrained(source)
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
                tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    if not isinstance(policy, torch.nn.Module):
        raise TypeError(
            "policy must be a causal LM (a torch.nn.Module) or a path / hub id for from_pretrained, "
            f"got {type(policy).__name__}"
        )
    if tokenizer is None:
        raise ValueError("policy is a module: pass its tokenizer= (observations and replies are text)")
    return policy, tokenizer


class BaseAlgorithm:
    """The shared front of :class:`PPO` and :class:`GRPO` (``ALGORITHM`` fixes the trainer's).

    Args:
        policy: a causal LM module, or a path / hub id loaded with ``from_pretrained`` together with
            its tokenizer.
        env: an env id (``gymnasium.make``), a Gymnasium text env instance (deep-copied per episode)
            or a factory; None builds no trainer (``predict`` works, ``learn`` needs :meth:`set_env`).
        tokenizer: the policy's tokenizer (required with a module; default: loaded with a path).
        **config: :class:`alignkit.RLConfig` fields (``algorithm`` is fixed by the class).

    Attributes: ``policy`` (the model), ``tokenizer``, ``env`` (as given), ``trainer`` (the
    :class:`alignkit.Trainer`, None without an env), ``config``, ``num_timesteps`` (env steps so far).
    """

    ALGORITHM: str = ""

    def __init__(self, policy: object, env: object = None, *, tokenizer=None, **config: Any) -> None:
        from ..trainer import RLConfig

        if "algorithm" in config and config["algorithm"] != self.ALGORITHM:
            raise ValueError(
                f"{type(self).__name__} fixes algorithm={self.ALGORITHM!r}, "
                f"got algorithm={config['algorithm']!r} (use alignkit.Trainer for the other algorithms)"
            )
        self.config = RLConfig.from_dict({**config, "algorithm": self.ALGORITHM})
        self.policy, self.tokenizer = _load_policy(policy, tokenizer)
        self.encoder = TurnEncoder(self.tokenizer)
        self.num_timesteps = 0
        self.env = None
        self.trainer = None
        if env is not None:
            self.set_env(env)

    # ------------------------------------------------------------------------- training

    def set_env(self, env: object) -> None:
        """Build the trainer for ``env`` (an id, instance or factory); the policy's weights are kept."""
        from ..trainer import Trainer

        self.trainer = Trainer(self.policy, self.tokenizer, env=env, config=self.config)
        self.env = env

    def get_env(self) -> object:
        return self.env

    def learn(
        self,
        total_timesteps: int,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
        progress_bar: bool = True,
        reset_num_timesteps: bool = True,
    ) -> BaseAlgorithm:
        """Run trainer iterations until ``total_timesteps`` env steps (model replies) have been
        played; the last iteration may pass it (an iteration is never cut). Returns ``self``.

        ``callback(locals)`` runs after every iteration with a dict: ``model`` (this object),
        ``iteration`` (the trainer's, 0-based, of the iteration just run), ``metrics`` (that
        iteration's metrics, as ``Trainer.step`` returns them), ``timesteps`` (env steps of that
        iteration), ``num_timesteps`` and ``total_timesteps``. Returning ``False`` stops training
        (SB3's ``_on_step`` convention); ``None`` or ``True`` goes on. ``reset_num_timesteps=False``
        counts on from the previous call (``total_timesteps`` more steps).
        """
        if isinstance(total_timesteps, bool) or not isinstance(total_timesteps, int) or total_timesteps <= 0:
            raise ValueError(f"total_timesteps must be a positive int, got {total_timesteps!r}")
        if callback is not None and not callable(callback):
            raise TypeError(
                f"callback must be a callable callback(locals) -> bool | None, got {type(callback).__name__}"
            )
        progress_bar = _checks.flag(progress_bar, "progress_bar")
        if self.trainer is None:
            raise ValueError(f"{type(self).__name__}.learn needs an env: pass env= or call set_env(env)")
        if _checks.flag(reset_num_timesteps, "reset_num_timesteps"):
            self.num_timesteps = 0
        target = self.num_timesteps + total_timesteps
        trainer = self.trainer
        bar = _progress(progress_bar, total_timesteps)
        try:
            while self.num_timesteps < target:
                metrics = trainer.step()
                trainer.record(metrics)  # history, metrics.jsonl, TensorBoard, checkpoints as configured
                steps = metrics["env/steps"]  # model replies over every rank
                self.num_timesteps += steps
                if bar is not None:
                    bar.update(min(steps, target - bar.n))
                    reward, turns = metrics["reward/mean"], metrics["env/turns_mean"]
                    bar.set_postfix(reward=f"{reward:.3f}", turns=f"{turns:.2f}")
                if callback is not None:
                    local = {
                        "model": self, "iteration": trainer.iteration - 1, "metrics": metrics,
                        "timesteps": steps, "num_timesteps": self.num_timesteps, "total_timesteps": target,
                    }  # fmt: skip
                    if callback(local) is False:
                        break
        finally:
            if bar is not None:
                bar.close()
            trainer.close()
        return self

    # ------------------------------------------------------------------------- acting

    @torch.no_grad()
    def predict(
        self,
        observation: object,
        state: Conversation | None = None,
        episode_start: object = None,
        deterministic: bool = False,
    ) -> tuple[str, Conversation]:
        """The model's reply to ``observation`` and the conversation so far.

        ``observation``: text or chat messages. With ``state=None`` (or ``episode_start`` true) it
        opens a conversation (encoded as ``collect_episodes`` encodes a first observation: a plain
        prompt, or the chat template); with the ``state`` a previous call returned it is the env's
        next turn, appended as token ids. ``deterministic=True`` decodes greedily; else it samples
        with the config's temperature / top-k / top-p. At most ``max_new_tokens`` tokens, the
        config's ``stop`` strings. Returns ``(action, state)``: the reply as ``env.step`` takes it
        (special tokens skipped) and the :class:`Conversation` to pass back next turn.
        """
        where = f"{type(self).__name__}.predict"
        if not (isinstance(observation, str) or is_messages(observation) or observation in ([], ())):
            raise TypeError(
                f"observation must be text (a string) or chat messages, got {type(observation).__name__}"
            )
        observation = check_observation(observation, where)
        if state is not None and not isinstance(state, Conversation):
            raise TypeError(
                f"state must be None or the Conversation predict returned, got {type(state).__name__}"
            )
        deterministic = _checks.flag(deterministic, "deterministic")
        if state is None or (episode_start is not None and bool(episode_start)):
            if observation in ("", []):
                raise ValueError(f"{where}: the first observation of a conversation must not be empty")
            chat = isinstance(observation, list)
            ids = self.encoder.prompt(observation, chat=chat)
        else:
            chat = state.chat
            ids = list(state.ids) + self.encoder.observation(
                observation, chat=chat, eos_text=state.eos_text, where=where
            )
        cfg = self.config
        engine = self.trainer.engine if self.trainer is not None else self._engine()
        out = engine.generate(
            [ids], n=1, max_new_tokens=cfg.max_new_tokens,
            temperature=0.0 if deterministic else cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            stop=cfg.stop,
        )  # fmt: skip
        reply_ids = out.response_ids[0, : int(out.response_mask[0].sum())].tolist()
        eos_text = None
        if out.finish_reason[0] == "eos":
            eos_text = self.tokenizer.decode(reply_ids[-1:], skip_special_tokens=False)
        action = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        return action, Conversation(ids=tuple(ids + reply_ids), chat=chat, eos_text=eos_text)

    def _engine(self):
        if getattr(self, "_predict_engine", None) is None:
            from ..rollout import RolloutEngine

            self._predict_engine = RolloutEngine(self.policy.eval(), self.tokenizer)
        return self._predict_engine

    # ------------------------------------------------------------------------- saving

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/``: the model and tokenizer (``from_pretrained``-loadable), the config and the
        class as JSON (``alignkit_algorithm.json``), and ppo's value head (``value_head.pt``). The
        optimizer state is not saved (a checkpoint of the trainer's, ``output_dir``, holds it)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        record = {
            "class": type(self).__name__,
            "config": self.config.to_dict(),
            "num_timesteps": self.num_timesteps,
            "env": self.env if isinstance(self.env, str) else None,
        }
        (path / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        value = self.trainer.value_head if self.trainer is not None else None
        if value is not None:
            torch.save(value.state_dict(), path / VALUE_HEAD_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, env: object = None, **overrides: Any) -> BaseAlgorithm:
        """The algorithm saved at ``path``; ``env`` (default: the saved env id, when it was an id) and
        config ``overrides`` (RLConfig fields) replace the saved ones."""
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not a folder {cls.__name__}.save wrote")
        record = json.loads(config_file.read_text())
        if record.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a saved {record.get('class')}, not a {cls.__name__}")
        config = {k: v for k, v in record["config"].items() if k != "algorithm"}
        config["adam_betas"] = tuple(config["adam_betas"])
        model = cls(path, env if env is not None else record.get("env"), **{**config, **overrides})
        model.num_timesteps = int(record.get("num_timesteps", 0))
        value_file = path / VALUE_HEAD_FILE
        if model.trainer is not None and model.trainer.value_head is not None and value_file.is_file():
            model.trainer.value_head.load_state_dict(torch.load(value_file, weights_only=True))
        return model


class PPO(BaseAlgorithm):
    """Proximal Policy Optimization (Schulman et al. 2017) with a value head on the policy's body:
    ``RLConfig(algorithm="ppo")``, GAE over the episode's model tokens (observation spans carried)."""

    ALGORITHM = "ppo"


class GRPO(BaseAlgorithm):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): the ``num_generations``
    episodes of a group share the reset seed; advantages are returns normalised within the group."""

    ALGORITHM = "grpo"


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="alignkit learn", unit="step", dynamic_ncols=True)
