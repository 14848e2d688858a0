"""The five private environments of a Fed-SE federation, behind one API (see `base.TextEnv`)."""

from fedse.envs.base import Outcome, TextEnv
from fedse.envs.registry import env_class, env_names, make_env

__all__ = ["Outcome", "TextEnv", "env_class", "env_names", "make_env"]
