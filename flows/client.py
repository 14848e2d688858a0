"""An organisation's worker: it obeys only its own settings, and the server can only ask it for a round.

`python -m flows.client serve --org .orgs/maze/org.yaml` runs inside the organisation's boundary, on its own
machine or directory. It never talks to the server's Prefect or MLflow: it polls its inbox in the object store
(`server/inbox/client_<k>/request.json`) for the server's signed round request (fedse/request.py), verifies
the server's signature with the public key it trusts, refuses what it must (one line, recorded in its egress
log and answered in its status), and otherwise runs the round as flow `fedse-client` on a Prefect of its own
(ephemeral, inside its boundary: its own UI and logs, invisible to the server and to the other
organisations): download the global adapter (verified as the server's) → rollout → filter → buffer → version
→ train → upload (signed as its own). Then it writes its signed status next to the upload: the request it
answers, the upload's manifest, counts, losses, buffer version and the digest of the terms it trained under.

Where its data goes and what code it runs — store endpoint, bucket, credentials, keys, model source and
paths, caches, seed and buffer locations — come from its `org.yaml` only (fedse/organisation.py); the request
can set hyperparameters and nothing else. A request for another client, an old round (replay), terms outside
what it accepts, or a signature it cannot verify is refused.

No `from __future__ import annotations` here: Prefect validates flow parameters from the annotations.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

from fedse import audit
from fedse.atomic import write_text
from fedse.config import Config, ConfigError
from fedse.federation import ClientJob, ClientOutcome, env_of
from fedse.kernels import choose as choose_kernels
from fedse.methods import method
from fedse.organisation import OrgSettings, load
from fedse.request import RequestError, RoundRequest, agreement
from fedse.signing import SIGNATURE_FIELD
from fedse.transport import Transport, TransportError, Upload, digest
from tasks.agent import fresh_adapter

FLOW = "fedse-client"
INBOX = "inbox"  # the experiment name of the worker's inbox-only exchange (never written to)


class OrgError(RuntimeError):
    """An organisation's worker that cannot start (one line, naming the fix)."""


def manifest(outcome: ClientOutcome) -> dict[str, Any]:
    """What crosses back to the server besides the adapter: the upload's manifest, the round's numbers and the
    buffer version; never a trajectory."""
    return {"weight": outcome.weight, "buffer_version": outcome.buffer_version, "stats": outcome.stats,
            "upload": outcome.upload.to_json() if outcome.upload else None}


def outcome_of(doc: dict[str, Any], client: str) -> ClientOutcome:
    """The server's view of a client's round from its status (the adapter itself is read from the store)."""
    upload = Upload.from_json(doc["upload"], f"status of {client}") if doc.get("upload") else None
    return ClientOutcome({}, doc["stats"], int(doc["weight"]), upload, doc.get("buffer_version"))


@flow(name=FLOW, log_prints=True)
def client_round(org: str, request: dict[str, Any], answering: str) -> dict[str, Any]:
    """The organisation's round as its own Prefect flow: the request's round under the organisation's own
    settings (`org`: its org.yaml); returns the manifest."""
    from flows.round_loop import submit_chain

    settings = load(Path(org))
    asked = RoundRequest.model_validate(request)
    cfg = settings.config(asked)
    choose_kernels(cfg.model.kernels)  # before this run's first tensor (the broadcast's download)
    how = method(cfg.federation.method)
    folder = settings.path(settings.runs) / asked.experiment
    exchange = Transport(cfg.transport, asked.experiment, folder)
    exchange.answering = answering
    start = fresh_adapter(cfg) if asked.round == 0 else None  # later rounds download the broadcast
    chain = submit_chain(cfg, how, exchange, folder, ClientJob(settings.client, [env_of(settings.client)], start),
                         asked.round, str(settings.path(settings.dvc_repo)) if settings.dvc_repo else _dvc(settings))
    doc = manifest(chain.outcome())
    print(f"{settings.client} round {asked.round}: uploaded {doc['upload']['key'] if doc['upload'] else 'nothing'}; "
          f"buffer {doc['stats']['buffer']} records (version {doc['buffer_version']})")
    return doc


def _dvc(settings: OrgSettings) -> str | None:
    """The organisation's own DVC repository (its folder, when it holds `.dvc/`): its buffer versions' cache."""
    return str(settings.home) if (settings.home / ".dvc").is_dir() else None


class Worker:
    """The organisation's loop: poll the inbox, check the request, run the round, answer with a status."""

    def __init__(self, settings: OrgSettings) -> None:
        self.settings = settings
        self.runs = settings.path(settings.runs)
        if settings.ca_bundle is not None:  # the store's CA, for every S3 client of this process (boto3 reads it)
            os.environ["AWS_CA_BUNDLE"] = str(settings.path(settings.ca_bundle))
        self.state_file = self.runs / ".worker.json"  # (experiment: last round answered): refuses replays
        self.last_seen: str | None = None

    def inbox(self) -> Transport:
        """An exchange on the organisation's own store and keys, for its inbox and its answers."""
        from fedse.transport import TransportSpec

        s = self.settings
        spec = TransportSpec(backend="s3" if s.store else "local", keyring=s.path(s.keys),
                             dir=s.path(s.exchange_dir) if s.exchange_dir else None)
        if s.store is not None:
            spec.s3 = s.store.model_copy(update={"credentials": s.path(s.store.credentials)
                                                 if s.store.credentials else None})
        return Transport(spec, INBOX, self.runs)

    def answered(self) -> dict[str, int]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def step(self, inbox: Transport) -> str | None:
        """Look at the inbox once; returns what was done (None: nothing new)."""
        try:
            doc = inbox.read_inbox(self.settings.client)
        except TransportError as exc:  # unsigned, forged, oversize: never acted on
            return self.refuse(None, f"request not verified: {exc}", None)
        if doc is None:
            return None
        seen = digest(doc)
        if seen == self.last_seen:
            return None
        self.last_seen = seen
        signed = dict(doc)
        signed.pop(SIGNATURE_FIELD, None)
        try:
            request = RoundRequest.model_validate(signed)
        except ValueError as exc:
            return self.refuse(signed, f"request refused: {_first_error(exc)}", None)
        cfg = self.check(request)
        if isinstance(cfg, str):
            return self.refuse(signed, cfg, request)
        return self.run(request, cfg, seen)

    def check(self, request: RoundRequest) -> Config | str:
        """The round's config under the organisation's own settings, or why this request must be refused."""
        if request.client != self.settings.client:
            return f"request for client {request.client}, this organisation is {self.settings.client}"
        done = self.answered().get(request.experiment)
        if done is not None and request.round <= done:
            return f"replay: round {request.round} of {request.experiment} was already answered (last {done})"
        try:
            cfg = self.settings.config(request)
        except (ConfigError, RequestError, ValueError) as exc:
            return f"request refused: {_first_error(exc)}"
        if not method(cfg.federation.method).federated:
            return f"method {cfg.federation.method} has no server: nothing to upload"
        return cfg

    def run(self, request: RoundRequest, cfg: Config, seen: str) -> str:
        settings = self.settings
        exchange = Transport(cfg.transport, request.experiment, self.runs / request.experiment)
        status: dict[str, Any] = {"request": seen, "agreement": agreement(cfg)}
        try:
            doc = client_round(str(settings.home / "org.yaml"), request.model_dump(), seen)
            status |= {"state": "done"} | doc
        except Exception as exc:  # the round failed: the server hears why, the worker keeps serving
            status |= {"state": "failed", "reason": _first_error(exc)[:500]}
        self._remember(request)
        exchange.put_status(request.round, settings.client, status)
        return f"{status['state']} {request.experiment} round {request.round}"

    def refuse(self, asked: dict[str, Any] | None, why: str, request: RoundRequest | None) -> str:
        """Record the refusal in the organisation's egress log and, when the request names this client's
        round, answer it (so the server does not wait for the deadline)."""
        experiment = request.experiment if request else INBOX
        round = request.round if request else -1
        audit.record_refusal(self.runs / experiment / "egress", experiment, f"client_{self.settings.client}",
                             round, why, asked)
        if request is not None and request.client == self.settings.client and not why.startswith("replay"):
            Transport(self.inbox().spec, request.experiment, self.runs / request.experiment).put_status(
                request.round, self.settings.client, {"state": "refused", "reason": why})
        print(f"{self.settings.client}: refused: {why}", file=sys.stderr, flush=True)
        return f"refused: {why}"

    def _remember(self, request: RoundRequest) -> None:
        done = self.answered() | {request.experiment: request.round}
        write_text(self.state_file, json.dumps(done, sort_keys=True))

    def serve(self, once: bool = False) -> None:
        inbox = self.inbox()
        print(f"organisation {self.settings.client}: serving; inbox {inbox.where(f'client_{self.settings.client}')}",
              flush=True)
        while True:
            done = self.step(inbox)
            if done:
                print(f"{self.settings.client}: {done}", flush=True)
            if once:
                return
            time.sleep(self.settings.poll)


def _first_error(exc: BaseException) -> str:
    """One line: a validation error's first field and message, else the exception's first lines."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"[:300]
    text = str(exc).strip().splitlines()
    return " ".join(text[:3])[:300] if text else type(exc).__name__


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.client",
                                     description="An organisation's worker: serve round requests from its inbox.")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--org", type=Path, default=Path("org.yaml"), help="its org.yaml (or its folder)")
    parser.add_argument("--once", action="store_true", help="look at the inbox once and exit")
    args = parser.parse_args(argv)
    try:
        settings = load(args.org)
        Worker(settings).serve(once=args.once)
    except (ConfigError, OrgError, TransportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
