"""Client organisations on one machine: a directory and a process each, holding only what is theirs.

`prepare(root, client, ...)` makes `<root>/<client>/` (under the repository, `.orgs/<client>/`): its expert
seed files (`data/seed/s<seed>/<env>.jsonl`, copied from the project's; on its own machine an organisation
brings its own), its S3 keys (`s3-credentials.json`, its role only), its keyring (`keys/`: its own Ed25519
key; the server's public key, trusted as `server`; the server's keyring trusts the organisation's public key
in return), a DVC repository of its own (`.dvc/`, its buffer versions' cache) and `org.yaml`, the settings its
worker obeys (fedse/organisation.py). `environment()` is what its process starts with: nothing of the
server's (no Prefect API or auth, no MLflow, no other role's keys; its own Prefect is ephemeral, inside its
directory). `start()` runs `python -m flows.client serve` there in its own process group; `flows/stack.py`
(`make serve`) and the tests call these, and a user on another machine runs the same command by hand
(docs/scale-out.md).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fedse.federation import env_of
from fedse.placement import pinned
from fedse.signing import Keyring
from fedse.transport import SERVER, client_role
from flows.private import write_private

SERVER_ONLY = ("AWS_", "MLFLOW_", "FEDSE_", "PREFECT_")  # variables an organisation's process never inherits


def folder(root: Path, client: str) -> Path:
    return Path(root) / client


def prepare(root: Path, client: str, seeds: Path, credentials: Path | None, *, server_keys: Path | None = None,
            endpoint: str | None = None, bucket: str = "fedse", ca_bundle: Path | None = None,
            params: Path | None = None, exchange_dir: Path | None = None) -> Path:
    """The organisation's directory with its own seed files, S3 keys (none: a shared local exchange folder,
    `exchange_dir`), keyring, DVC repository and org.yaml (idempotent: keys that exist are kept)."""
    from dvc.repo import Repo

    home = folder(root, client)
    env = env_of(client)  # <env>-<k>: one of several organisations of that environment
    sources = sorted(Path(seeds).glob(f"s*/{env}.jsonl"))
    if not sources:
        raise FileNotFoundError(f"{seeds}/s<seed>/{env}.jsonl: no expert seeds for organisation {client} "
                                "(run `dvc repro seed`)")
    for source in sources:  # every run seed's draw, each in its own s<seed>/ folder
        (home / "data" / "seed" / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, home / "data" / "seed" / source.parent.name / f"{env}.jsonl")
    role = client_role(client)
    store = None
    if credentials is not None:
        keys = json.loads(Path(credentials).read_text())
        own = {"endpoint": keys.get("endpoint"), "roles": {role: keys["roles"][role]}}
        write_private(home / "s3-credentials.json", json.dumps(own, indent=1))
        store = {"endpoint": endpoint or keys.get("endpoint"), "bucket": bucket,
                 "credentials": "s3-credentials.json"}
    if server_keys is not None:
        exchange_keys(Keyring(Path(server_keys)), Keyring(home / "keys"), role)
    settings = {"client": client, "params": str(Path(params or Path(__file__).resolve().parents[1] / "params.yaml")
                                                 .resolve()),
                "store": store, "keys": "keys", "seed_dir": "data/seed", "runs": "runs",
                "cache_dir": ".cache/fedse", "ca_bundle": str(ca_bundle) if ca_bundle else None,
                "exchange_dir": str(exchange_dir) if exchange_dir else None}
    (home / "org.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    if not (home / ".dvc").is_dir():
        Repo.init(str(home), no_scm=True).close()
    return home


def exchange_keys(server: Keyring, org: Keyring, role: str) -> None:
    """Each side's own key (created if absent) and the other's public key: the server trusts the
    organisation's role, the organisation trusts the server. What two parties on different machines do by
    hand with `fedse keys init` and `fedse keys trust`."""
    server.init(SERVER)
    org.init(role)
    org.trust(SERVER, server.public_hex(SERVER), replace=True)
    server.trust(role, org.public_hex(role), replace=True)


def environment(root: Path, client: str, prefect_api: str | None = None, s3_endpoint: str | None = None,
                bucket: str | None = None, base: dict[str, str] | None = None,
                device: str | None = None) -> dict[str, str]:
    """What the organisation's process starts with: its own Prefect home (an ephemeral API inside its
    directory), the one accelerator it is placed on (`device`: CUDA_VISIBLE_DEVICES names it alone;
    fedse/placement.py) and nothing of the server's. The store's address and keys are in its org.yaml, not
    here; `prefect_api`, `s3_endpoint` and `bucket` are accepted for the callers' sake and ignored."""
    home = folder(root, client)
    inherited = {k: v for k, v in (base if base is not None else os.environ).items()
                 if not k.startswith(SERVER_ONLY)}
    own = {"PREFECT_HOME": str(home / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "OMP_NUM_THREADS": "1"}
    return inherited | own | pinned(device)


def start(root: Path, client: str, env: dict[str, str], log: Path) -> int:
    """`python -m flows.client serve` in the organisation's directory, its own process group; returns the pid."""
    out = Path(log).open("w")
    code = str(Path(__file__).resolve().parents[1])
    env = env | {"PYTHONPATH": os.pathsep.join(p for p in (code, env.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.client", "serve", "--org", "org.yaml"],
                            cwd=folder(root, client), env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc.pid

