"""Task `aggregate`: the server's step. For a federated method it downloads every client's upload through
the exchange (verified against its manifest), averages them, and publishes the new global adapter there;
otherwise it applies the method's no-server rule to the updates it is given. The global adapter is also
written to the run folder in PEFT format."""

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState, foreign_objects, global_record, next_global, publish, receive_update
from fedse.methods import method
from fedse.model import save_adapter, set_adapter_state
from fedse.transport import Transport
from tasks.agent import borrowed


@task(name="aggregate", cache_policy=NO_CACHE, task_run_name="aggregate-round-{round}")
def aggregate(cfg: Config, updates: list[tuple[str, AdapterState, int]], global_state: AdapterState,
              round: int, out: str, exchange: Transport | None = None, senders: list[str] | None = None,
              momentum: AdapterState | None = None, missing: dict[str, str] | None = None,
              ) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None, dict[str, Any]]:
    """`updates` for a method without server; `exchange` and `senders` (the clients to download) otherwise;
    `missing` names the clients that failed or timed out, and why (they count against the quorum).

    Returns the new global adapter, its record (None without a server), the server's momentum buffer for the
    next round, and what the aggregation rule logged (its relative error, the energy an SVD kept)."""
    how = method(cfg.federation.method)
    received = [receive_update(exchange, round, name) for name in senders or []] if exchange else updates
    step = next_global(cfg, how, received, global_state, momentum, round, missing)
    if exchange is not None:
        step.info |= foreign_objects(exchange, cfg, round)
    new = step.state
    sent = None
    if exchange is not None:
        new, sent = publish(exchange, how, round, new)
    if not (how.federated or how.pooled):
        return new, None, step.momentum, step.info
    with borrowed(cfg) as agent:
        set_adapter_state(agent, new, origin="global adapter")
        folder = Path(out) / "adapters" / f"round_{round}"
        digest = save_adapter(agent, folder, {"method": how.name, "round": round, "seed": cfg.seed})
    return new, global_record(digest, new, sent) | {"path": str(folder)}, step.momentum, step.info
