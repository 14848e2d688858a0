"""Task `aggregate`: the server's step (`fedse.federation.server_round`). For a federated method it downloads
every delivered client's upload through the exchange (verified against its manifest), screens and averages
them, and publishes the new global adapter there; otherwise it applies the method's no-server rule to the
updates it is given. The global adapter is also written to the run folder in PEFT format, through the
process's model."""

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState, server_round
from fedse.methods import method
from fedse.model import save_adapter, set_adapter_state
from fedse.transport import Transport, Upload
from tasks.agent import borrowed


@task(name="aggregate", cache_policy=NO_CACHE, task_run_name="aggregate-round-{round}")
def aggregate(cfg: Config, updates: list[tuple[str, AdapterState, int]], global_state: AdapterState,
              round: int, out: str, exchange: Transport | None = None,
              senders: dict[str, Upload | None] | None = None,
              momentum: AdapterState | None = None, missing: dict[str, str] | None = None,
              ) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None, dict[str, Any]]:
    """`updates` for a method without server; `exchange` and `senders` (the clients to download, each with
    the upload it reported) otherwise;
    `missing` names the clients that failed or timed out, and why (they count against the quorum).
    Returns the new global adapter, its record (None without a server), the server's momentum buffer for the
    next round, and what the aggregation rule logged (its relative error, the energy an SVD kept)."""
    def save(state: AdapterState, folder: Path, meta: dict[str, Any]) -> str:
        with borrowed(cfg) as agent:
            set_adapter_state(agent, state, origin="global adapter")
            return save_adapter(agent, folder, meta)

    return server_round(cfg, method(cfg.federation.method), round, Path(out), exchange, updates, senders or {},
                        global_state, momentum, missing or {}, save)
