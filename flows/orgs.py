"""Client organisations on one machine: a directory and a process each, holding only what is theirs.

`prepare(root, client, ...)` makes `<root>/<client>/` (under the repository, `.orgs/<client>/`): its expert
seed files (`data/seed/s<seed>/<env>.jsonl`, copied from the project's; on its own machine an organisation brings its
own), its S3 keys (`s3-credentials.json`, its role only), a DVC repository of its own (`.dvc/`, its buffer
versions' cache) and the environment its process starts with (`environment()`): the Prefect API, the object
store, its keys, `FEDSE_ORG`, and nothing of the server's (no MLflow, no other role's keys). `start()` runs
`python -m flows.client serve` there in its own process group; `flows/stack.py` (`make serve`) and the tests
call these, and a user on another machine runs the same command by hand (README, "Scale-out").
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedse.federation import env_of
from fedse.transport import client_role
from flows.client import ORG

SERVER_ONLY = ("AWS_", "MLFLOW_", "FEDSE_", "PREFECT_")  # variables an organisation's process never inherits


def folder(root: Path, client: str) -> Path:
    return Path(root) / client


def prepare(root: Path, client: str, seeds: Path, credentials: Path | None) -> Path:
    """The organisation's directory with its own seed file, keys (none: a shared local exchange folder) and DVC
    repository (idempotent)."""
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
    if credentials is not None:
        keys = json.loads(Path(credentials).read_text())
        role = client_role(client)
        own = {"endpoint": keys.get("endpoint"), "roles": {role: keys["roles"][role]}}
        path = home / "s3-credentials.json"
        path.write_text(json.dumps(own, indent=1))
        path.chmod(0o600)
    if not (home / ".dvc").is_dir():
        Repo.init(str(home), no_scm=True).close()
    return home


def environment(root: Path, client: str, prefect_api: str, s3_endpoint: str, bucket: str,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """What the organisation's process starts with: the shared services' addresses and its own identity."""
    home = folder(root, client)
    inherited = {k: v for k, v in (base if base is not None else os.environ).items()
                 if not k.startswith(SERVER_ONLY)}
    return inherited | {
        ORG: client, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FEDSE_S3_ENDPOINT": s3_endpoint, "FEDSE_S3_BUCKET": bucket,
        "FEDSE_S3_CREDENTIALS": str(home / "s3-credentials.json"), "OMP_NUM_THREADS": "1",
    }


def start(root: Path, client: str, env: dict[str, str], log: Path) -> int:
    """`python -m flows.client serve` in the organisation's directory, its own process group; returns the pid."""
    out = Path(log).open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.client", "serve"], cwd=folder(root, client), env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid
