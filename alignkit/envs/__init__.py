"""Text environments for RL on language models: Gymnasium's API, multi-turn collection, tools.

    import gymnasium, alignkit.envs
    env = gymnasium.make("alignkit/GuessNumber-v0")
    episodes = alignkit.envs.collect_episodes(engine, [env0, env1, ...], tokenizer=tokenizer,
                                              max_turns=6, max_total_tokens=128, max_new_tokens=4)

Importing this package registers the built-in envs (``alignkit/Addition-v0``,
``alignkit/GuessNumber-v0``); ``import alignkit`` alone does not import Gymnasium. docs/envs.md
describes the protocol, the episode layout and the budgets.
"""

from __future__ import annotations

try:
    import gymnasium
except ImportError as exc:  # an optional dependency: say which one
    raise ImportError(
        "alignkit.envs needs gymnasium: pip install 'gymnasium>=1.0' (the alignkit[envs] extra)"
    ) from exc

from .algorithms import GRPO, PPO, BaseAlgorithm, Conversation
from .builtin import AdditionEnv, GuessNumberEnv
from .collect import collect_episodes
from .core import CHARSET, EnvError, TextEnv, chat_space, check_observation, check_reward, text_space
from .episodes import EPISODE_END_REASONS, Episodes
from .rewards import RewardEnv, env_prompts, env_reward, reward_env
from .tools import ToolCall, ToolEnv, ToolError, describe_tools, parse_tool_call, run_tool
from .turns import TurnEncoder

BUILTIN_ENVS: dict[str, str] = {
    "alignkit/Addition-v0": "alignkit.envs.builtin:AdditionEnv",
    "alignkit/GuessNumber-v0": "alignkit.envs.builtin:GuessNumberEnv",
}


def _register() -> None:
    for env_id, entry_point in BUILTIN_ENVS.items():
        if env_id not in gymnasium.registry:  # a re-import must not warn about overriding
            gymnasium.register(id=env_id, entry_point=entry_point)


_register()

__all__ = [
    "BUILTIN_ENVS",
    "CHARSET",
    "EPISODE_END_REASONS",
    "GRPO",
    "PPO",
    "AdditionEnv",
    "BaseAlgorithm",
    "Conversation",
    "EnvError",
    "Episodes",
    "GuessNumberEnv",
    "RewardEnv",
    "TextEnv",
    "ToolCall",
    "ToolEnv",
    "ToolError",
    "TurnEncoder",
    "chat_space",
    "check_observation",
    "check_reward",
    "collect_episodes",
    "describe_tools",
    "env_prompts",
    "env_reward",
    "parse_tool_call",
    "reward_env",
    "run_tool",
    "text_space",
]
