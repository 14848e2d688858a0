"""The round loop's runner in `orchestration.mode: workers`: each client's round is a run of its
organisation's own deployment (`fedse-client/<client>`, flows/client.py) on the organisation's own process.

Every client of a round is launched at once (`run_deployment`, not waiting), then the server waits for each
child run until `federation.client_timeout` (a finite default when null: a worker that died mid-run leaves its
run RUNNING forever), checks its final state, and reads the client's manifest from the run's artifact. A run
that failed, crashed or was late is that client missing from the round, with the reason; a late run is
cancelled. The server step (download, screen, aggregate, register) and the evaluation stay tasks of the
server's flow, exactly as in `inprocess` mode (`Tasks`).
"""

import json
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from fedse.config import Config
from fedse.federation import ClientJob, ClientOutcome, Federation
from flows.client import artifact_key, from_table, outcome_of
from flows.round_loop import Tasks

DEFAULT_TIMEOUT = 3600.0  # seconds a round waits for an organisation when federation.client_timeout is null


class WorkersError(RuntimeError):
    """A client's run that did not deliver: one line naming the client, the run and why."""


def check(cfg: Config) -> None:
    """What workers mode needs, refused in one line: a server (federated method) and an exchange every
    organisation can reach (S3, or a local folder named by transport.dir that they share)."""
    from fedse.methods import method

    how = method(cfg.federation.method)
    if not how.federated:
        raise ValueError(f"orchestration.mode workers: method {how.name} has no server; use mode inprocess")
    if cfg.transport.backend == "local" and cfg.transport.dir is None:
        raise ValueError("orchestration.mode workers: the organisations cannot reach the run folder's exchange; "
                         "use transport.backend s3 (make serve) or a shared folder in transport.dir")


class Workers(Tasks):
    """Clients on their organisations' workers; server step and evaluation as the flow's own tasks."""

    def __init__(self, cfg: Config, dvc_repo: str | None) -> None:
        check(cfg)
        super().__init__(cfg, dvc_repo)
        self.poll = 1.0

    def clients(self, fed: Federation, round: int, jobs: list[ClientJob],
                ) -> Iterator[tuple[str, ClientOutcome | Exception]]:
        from prefect.client.orchestration import get_client

        assert fed.exchange is not None  # check(): workers mode is federated
        launched = {job.name: self.launch(fed, round, job) for job in jobs}
        timeout = self.cfg.federation.client_timeout or DEFAULT_TIMEOUT
        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as api:
            for name, run_id in launched.items():
                try:
                    yield name, self.collect(api, fed, round, name, run_id, deadline, timeout)
                except Exception as exc:
                    yield name, exc

    def launch(self, fed: Federation, round: int, job: ClientJob) -> UUID:
        """Start the client's run on its organisation's deployment; returns the run's id at once."""
        from prefect.deployments import run_deployment

        settings = json.loads(self.cfg.model_dump_json())
        name = self.cfg.orchestration.client_deployment.format(client=job.name)
        run = run_deployment(name=name, timeout=0, as_subflow=True,
                             parameters={"experiment": fed.exchange.experiment, "round": round, "client": job.name,
                                         "settings": settings},
                             flow_run_name=f"{job.name}-round-{round}")
        return run.id

    def collect(self, api: Any, fed: Federation, round: int, name: str, run_id: UUID, deadline: float,
                timeout: float) -> ClientOutcome:
        """Wait for the client's run to end (or the deadline), then its manifest; raises why it did not
        deliver."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.states import Cancelling

        while True:
            run = api.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                api.set_flow_run_state(run_id, Cancelling(message="late for the round's deadline"), force=True)
                raise TimeoutError(f"no upload within federation.client_timeout = {timeout:g} s "
                                   f"(run {run.name} still {run.state.type.value if run.state else 'unknown'})")
            time.sleep(self.poll)
        if not run.state.is_completed():
            why = (run.state.message or "").strip().splitlines()
            raise WorkersError(f"run {run.name} of {name} ended {run.state.type.value}"
                               + (f": {why[0][:300]}" if why else ""))
        key = artifact_key(fed.exchange.experiment, name, round)
        found = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        mine = [a for a in found if a.flow_run_id == run_id]
        if not mine:
            raise WorkersError(f"run {run.name} of {name} completed without its manifest (artifact {key})")
        data = mine[0].data
        doc = from_table(json.loads(data) if isinstance(data, str) else data)
        if (doc.get("client"), doc.get("round"), doc.get("experiment")) != (name, round, fed.exchange.experiment):
            raise WorkersError(f"run {run.name}: its manifest describes {doc.get('client')} round {doc.get('round')}")
        return outcome_of(doc)
