"""The round loop's runner in `orchestration.mode: workers`: each client's round runs on its organisation's
own worker (flows/client.py), inside the organisation's boundary.

The server and the organisations share nothing but the object store. Each round the server posts a signed
round request to every participating client (`Transport.put_request`: the experiment, the round, the
client, the profile and the hyperparameter terms of fedse/request.py, nothing that says where data goes),
then waits until `federation.client_timeout` (a finite default when null: a worker that died never answers)
for each client's signed status next to its upload. A status that is refused or failed, that answers another
request, that reports other terms than the server's (`agreement`), or that never comes is that client missing
from the round, with the reason. The server step (download and verify each upload against the status,
screen, aggregate, register) and the evaluation stay tasks of the server's flow, exactly as in `inprocess`
mode (`Tasks`).
"""

import os
import time
from collections.abc import Iterator

from fedse.config import Config
from fedse.federation import ClientJob, ClientOutcome, Federation
from fedse.request import RoundRequest, agreement, terms_of
from fedse.transport import TransportError
from flows.client import outcome_of
from flows.round_loop import Tasks

DEFAULT_TIMEOUT = 3600.0  # seconds a round waits for an organisation when federation.client_timeout is null


class WorkersError(RuntimeError):
    """A client's round that did not deliver: one line naming the client and why."""


def check(cfg: Config) -> None:
    """What workers mode needs, refused in one line: a server (federated method), an exchange every
    organisation can reach (S3, or a local folder named by transport.dir that they share) and the server's own
    keyring (organisations verify its signature with the public key they were given)."""
    from fedse.methods import method

    how = method(cfg.federation.method)
    if not how.federated:
        raise ValueError(f"orchestration.mode workers: method {how.name} has no server; use mode inprocess")
    if cfg.transport.backend == "local" and cfg.transport.dir is None:
        raise ValueError("orchestration.mode workers: the organisations cannot reach the run folder's exchange; "
                         "use transport.backend s3 (make serve) or a shared folder in transport.dir")
    if cfg.transport.keyring is None and not os.environ.get("FEDSE_KEYS"):
        raise ValueError("orchestration.mode workers: the server signs its round requests and global adapters "
                         "with its own key; set transport.keyring (or env FEDSE_KEYS; make serve: .serve/keys)")


class Workers(Tasks):
    """Clients on their organisations' workers; server step and evaluation as the flow's own tasks."""

    def __init__(self, cfg: Config, dvc_repo: str | None) -> None:
        check(cfg)
        super().__init__(cfg, dvc_repo)
        self.poll = 1.0

    def clients(self, fed: Federation, round: int, jobs: list[ClientJob],
                ) -> Iterator[tuple[str, ClientOutcome | Exception]]:
        assert fed.exchange is not None  # check(): workers mode is federated
        terms, agreed = terms_of(self.cfg), agreement(self.cfg)
        sent = {}
        for job in jobs:
            request = RoundRequest(experiment=fed.exchange.experiment, round=round, client=job.name,
                                   profile=self.cfg.profile, terms=terms, issued=time.time())
            sent[job.name] = fed.exchange.put_request(round, job.name, request.model_dump())
        timeout = self.cfg.federation.client_timeout or DEFAULT_TIMEOUT
        deadline = time.monotonic() + timeout
        pending = list(sent)
        while pending:
            for name in list(pending):
                try:
                    got = self.collect(fed, round, name, sent[name], agreed)
                except (WorkersError, TransportError) as exc:
                    pending.remove(name)
                    yield name, exc
                    continue
                if got is not None:
                    pending.remove(name)
                    yield name, got
            if pending and time.monotonic() > deadline:
                for name in pending:
                    yield name, TimeoutError(f"no answer within federation.client_timeout = {timeout:g} s")
                return
            if pending:
                time.sleep(self.poll)

    def collect(self, fed: Federation, round: int, name: str, request: str, agreed: str) -> ClientOutcome | None:
        """The client's answer to this round's request, None while there is none; raises why it did not
        deliver."""
        assert fed.exchange is not None
        status = fed.exchange.get_status(round, name)
        if status is None or status.get("request") != request:  # nothing yet, or an answer to an older request
            return None
        if status.get("state") != "done":
            raise WorkersError(f"{name} {status.get('state', 'answered')}: {status.get('reason', '')}"[:400])
        if status.get("agreement") != agreed:
            raise WorkersError(f"{name} trained under other terms than the server's (agreement digest "
                               f"{str(status.get('agreement'))[:12]} against {agreed[:12]})")
        return outcome_of(status, name)
