"""Name → environment class. Adding an environment is one file in this folder plus one line below.

Classes are imported lazily, so listing names (or using Maze alone) does not pay for minigrid's import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from fedse.envs.base import TextEnv

#: One line per environment: name -> "module:Class". Order is the paper's table order.
ENVS: dict[str, str] = {
    "babyai": "fedse.envs.babyai:BabyAIEnv",
    "webshop": "fedse.envs.webshop:WebShopEnv",
    "textcraft": "fedse.envs.textcraft:TextCraftEnv",
    "maze": "fedse.envs.maze:MazeEnv",
    "wordle": "fedse.envs.wordle:WordleEnv",
}


def env_names() -> list[str]:
    """Registered environment names, in the paper's order."""
    return list(ENVS)


def env_class(name: str) -> type[TextEnv]:
    """The class registered as `name`; an unknown name gets one line that lists the known ones."""
    try:
        target = ENVS[name]
    except KeyError:
        raise KeyError(f"unknown environment {name!r}; known: {', '.join(ENVS)}") from None
    module, _, cls = target.partition(":")
    return getattr(import_module(module), cls)


def make_env(name: str, **options: Any) -> TextEnv:
    """A fresh instance of environment `name`; `options` are its constructor's keyword arguments."""
    cls = env_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"{name}: bad environment options {options}: {exc}") from None
