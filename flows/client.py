"""Flow `fedse-client`: one round of one client organisation, run by that organisation's own process.

The server's flow (flows/round_loop.py, `orchestration.mode: workers`) starts a run of deployment
`fedse-client/<client>` for every client of a round and waits for it. The run executes on the organisation's
process (`python -m flows.client serve`, started in the organisation's own directory, e.g. by `make serve`
under `.orgs/<client>/`): download the global adapter → rollout → filter → buffer → version the buffer →
train → upload, the same task chain the server's flow runs in-process (`submit_chain`). What the
organisation holds never travels: its seed data (`data/seed/`), its buffers and egress log (`runs/`), its
DVC cache and its S3 keys are all read from its own working directory and environment when its process
starts (`FEDSE_ORG` names the client it is; a run for another client is refused). Only the adapter leaves,
through the object store, and the run returns a small manifest (upload key and sha256, counts, losses,
buffer version), also kept as the run's table artifact `fedse-manifest-…`, which the server reads through
the Prefect API.

    cd .orgs/maze && FEDSE_ORG=maze PREFECT_API_URL=... FEDSE_S3_ENDPOINT=... FEDSE_S3_CREDENTIALS=keys.json \\
        python -m flows.client serve

No `from __future__ import annotations` here: Prefect validates flow parameters from the annotations.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from fedse.config import Config
from fedse.federation import ClientJob, ClientOutcome, env_of
from fedse.kernels import choose as choose_kernels
from fedse.methods import method
from fedse.transport import Transport, Upload
from tasks.agent import fresh_adapter

ROOT = Path(__file__).resolve().parents[1]
FLOW = "fedse-client"
ORG = "FEDSE_ORG"


class OrgError(RuntimeError):
    """An organisation's process asked to do what it is not set up for (one line, naming the fix)."""


def own_config(settings: dict[str, Any], org: Path) -> Config:
    """The server's run settings with this organisation's own places: its seed data under its directory
    (`data/seed`, or FEDSE_SEED_DIR), its S3 keys from its environment (FEDSE_S3_CREDENTIALS), its egress log
    in its run folder, its model cache; the committed tiny bases from the checkout it runs. Every
    hyperparameter stays the server's, so each client trains as it would in-process."""
    data = json.loads(json.dumps(settings))  # a copy
    models = Path(data["model"]["models_dir"])  # committed bases ship with the code this process runs
    data["model"]["models_dir"] = str(models if models.is_absolute() else ROOT / models)
    data["seed_data"]["dir"] = os.environ.get("FEDSE_SEED_DIR", str(org / "data" / "seed"))
    data["transport"]["s3"]["credentials"] = None
    data["transport"]["audit_dir"] = None
    return Config.model_validate(data)


def manifest(client: str, round: int, experiment: str, outcome: ClientOutcome) -> dict[str, Any]:
    """What crosses back to the server besides the adapter: the upload's manifest, the round's numbers and the
    buffer version; never a trajectory."""
    return {"client": client, "round": round, "experiment": experiment, "weight": outcome.weight,
            "buffer_version": outcome.buffer_version, "stats": outcome.stats,
            "upload": outcome.upload.to_json() if outcome.upload else None}


def outcome_of(doc: dict[str, Any]) -> ClientOutcome:
    """The server's view of a client's round from its manifest (the adapter itself is read from the store)."""
    upload = Upload.from_json(doc["upload"], f"manifest of {doc['client']}") if doc.get("upload") else None
    return ClientOutcome({}, doc["stats"], int(doc["weight"]), upload, doc.get("buffer_version"))


def artifact_key(experiment: str, client: str, round: int) -> str:
    """The manifest's artifact key (lowercase letters, digits and dashes only, as the flow's own keys)."""
    from flows.round_loop import _key

    return _key(f"fedse-manifest-{experiment}-{client}-round-{round}")


def as_table(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The manifest as (field, JSON value) rows: readable in the Prefect UI, exact when read back."""
    return [{"field": k, "value": json.dumps(v, sort_keys=True)} for k, v in doc.items()]


def from_table(rows: list[dict[str, str]]) -> dict[str, Any]:
    return {row["field"]: json.loads(row["value"]) for row in rows}


def dvc_repo(org: Path) -> str | None:
    """The organisation's DVC repository (FEDSE_DVC_REPO, else its directory when it holds `.dvc/`): where its
    buffer versions are cached; none, and buffers are not versioned."""
    named = os.environ.get("FEDSE_DVC_REPO")
    if named:
        return named
    return str(org) if (org / ".dvc").is_dir() else None


@flow(name=FLOW, log_prints=True)
def client_round(experiment: str, round: int, client: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Client `client`'s round `round` of experiment `experiment` (the exchange's name), under the server's
    `settings`; returns the manifest."""
    from flows.round_loop import submit_chain

    me = os.environ.get(ORG)
    if me != client:
        raise OrgError(f"this process is organisation {me!r} (env {ORG}), asked to run client {client!r}: "
                       f"start one `python -m flows.client serve` per organisation with {ORG} set")
    org = Path.cwd()
    cfg = own_config(settings, org)
    choose_kernels(cfg.model.kernels)  # before this run's first tensor (the broadcast's download)
    how = method(cfg.federation.method)
    if not how.federated:
        raise OrgError(f"method {how.name} has no server: nothing for an organisation's worker to do")
    folder = org / "runs" / experiment
    exchange = Transport(cfg.transport, experiment, folder)
    start = fresh_adapter(cfg) if round == 0 else None  # later rounds download the broadcast
    chain = submit_chain(cfg, how, exchange, folder, ClientJob(client, [env_of(client)], start), round, dvc_repo(org))
    doc = manifest(client, round, experiment, chain.outcome())
    create_table_artifact(as_table(doc), key=artifact_key(experiment, client, round),
                          description=f"{client} round {round}: what crossed to the server (besides the adapter)")
    print(f"{client} round {round}: uploaded {doc['upload']['key'] if doc['upload'] else 'nothing'}; "
          f"buffer {doc['stats']['buffer']} records (version {doc['buffer_version']})")
    return doc


def serve() -> None:
    """Serve this organisation's deployment `fedse-client/<FEDSE_ORG>` from its own directory (the cwd)."""
    from prefect.deployments.runner import EntrypointType

    me = os.environ.get(ORG)
    if not me:
        raise OrgError(f"set {ORG} to the client this organisation is (e.g. {ORG}=maze)")
    client_round.serve(name=me, entrypoint_type=EntrypointType.MODULE_PATH,
                       description=f"Fed-SE client organisation {me}: one round of its client")


def main(argv: list[str]) -> int:
    if argv[:1] != ["serve"]:
        print("usage: python -m flows.client serve   (in the organisation's directory, FEDSE_ORG set)",
              file=sys.stderr)
        return 2
    try:
        serve()
    except OrgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
