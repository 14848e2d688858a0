"""Task `aggregate`: the server's step (FedAvg of the uploads, or the method's no-server rule), and the new
global adapter written to the run folder in PEFT format."""

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.aggregate import state_bytes
from fedse.config import Config
from fedse.federation import AdapterState, next_global
from fedse.methods import method
from fedse.model import save_adapter, set_adapter_state
from tasks.agent import borrowed


@task(name="aggregate", cache_policy=NO_CACHE, task_run_name="aggregate-round-{round}")
def aggregate(cfg: Config, updates: list[tuple[str, AdapterState, int]], global_state: AdapterState,
              round: int, out: str) -> tuple[AdapterState, dict[str, Any] | None]:
    how = method(cfg.federation.method)
    new = next_global(how, updates, global_state)
    if not (how.federated or how.pooled):
        return new, None
    with borrowed(cfg) as agent:
        set_adapter_state(agent, new, origin="global adapter")
        folder = Path(out) / "adapters" / f"round_{round}"
        digest = save_adapter(agent, folder, {"method": how.name, "round": round, "seed": cfg.seed})
    return new, {"sha256": digest, "bytes": state_bytes(new), "path": str(folder)}
