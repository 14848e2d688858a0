"""The model tasks act and train with: loaded once per process, used by one task at a time.

Every client adapter is a swap of LoRA tensors into the same frozen base (as in `fedse.federation`), so a
task borrows the process's agent under a lock. With the thread pool the clients' model work is therefore
serialised (as on one device); a process pool gives each worker process its own copy.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedse.config import Config
from fedse.model import Agent, load_agent

_guard = threading.Lock()
_agents: dict[str, tuple[Agent, threading.Lock]] = {}


@contextmanager
def borrowed(cfg: Config) -> Iterator[Agent]:
    """The process's agent for this model spec, held exclusively for the `with` block."""
    key = f"{cfg.model.model_dump_json()}|{cfg.seed}"
    with _guard:
        if key not in _agents:
            _agents[key] = (load_agent(cfg.model, seed=cfg.seed), threading.Lock())
        agent, lock = _agents[key]
    with lock:
        yield agent
