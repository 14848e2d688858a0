"""The model tasks act and train with: loaded once per process, used by one task at a time.

Every client adapter is a swap of LoRA tensors into the same frozen base (as in `fedse.federation`), so a
task borrows the process's agent under a lock. With the thread pool the clients' model work is therefore
serialised (as on one device); a process pool gives each worker process its own copy. A served deployment
runs many flow runs in one process: each starts from the freshly initialised adapter kept here, never from
whatever the previous run left in the model.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedse.config import Config
from fedse.federation import initial_state
from fedse.model import Agent, adapter_state, load_agent

_guard = threading.Lock()
_agents: dict[str, tuple[Agent, threading.Lock, dict[str, torch.Tensor]]] = {}


def _entry(cfg: Config) -> tuple[Agent, threading.Lock, dict[str, torch.Tensor]]:
    spec = cfg.agent_spec()  # the LoRA the run's aggregation rule needs (rank, frozen A)
    key = f"{spec.model_dump_json()}|{cfg.seed}"
    with _guard:
        if key not in _agents:
            agent = load_agent(spec, seed=cfg.seed)
            _agents[key] = (agent, threading.Lock(), adapter_state(agent))
        return _agents[key]


@contextmanager
def borrowed(cfg: Config) -> Iterator[Agent]:
    """The process's agent for this model spec and seed, held exclusively for the `with` block."""
    agent, lock, _ = _entry(cfg)
    with lock:
        yield agent


def fresh_adapter(cfg: Config) -> dict[str, torch.Tensor]:
    """A copy of the adapter as initialised (seeded LoRA init: A random, B zero), where every run starts
    (A orthonormalised under fedsvd: `fedse.federation.initial_state`)."""
    return initial_state(cfg, {name: t.clone() for name, t in _entry(cfg)[2].items()})
