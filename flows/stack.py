"""The served stack on one machine: SeaweedFS (the federation's S3 object store), a Prefect server, an MLflow
server, the `round-loop` deployment, and one worker per client organisation (`orgs`: each serves its
`fedse-client/<client>` deployment from `.orgs/<client>/` with only its own seeds and keys, flows/orgs.py).

`python -m flows.stack up` starts each on 127.0.0.1 (state under the repository: `.seaweedfs/`, `.prefect/`,
`mlflow/`), waits until each answers, records their pids in `.serve/pids.json` and prints the URLs; `down`
stops exactly those processes (each was started in its own process group, which is what is signalled);
`rotate` (refused while the stack is up) mints every secret anew. `make serve`, `make stop` and `make rotate`
call these; the integration tests use `up`/`down` with free ports.

The control plane is authenticated (docs/security.md, "Control plane"): the Prefect API wants its auth string
(PREFECT_SERVER_API_AUTH_STRING on the server, PREFECT_API_AUTH_STRING on every client), the MLflow server runs
the basic-auth app (its admin, the server's flow, is the only writer; everyone else has no permission), both
stay on 127.0.0.1 for the operator; the S3 gateway, the one endpoint organisations reach, serves https with a
certificate of a local CA. Every secret lives in `.serve/` (mode 0700, files 0600, flows/private.py), is minted
once and reused by every `up`; `.serve/env.sh` holds the operator's exports (`source .serve/env.sh`).

The object store (flows/seaweed.py) holds three buckets: `fedse`, the adapter exchange, with one identity per
client and one for the server (keys in `.serve/s3-credentials.json`); `mlflow`, where the MLflow server keeps
artifacts (proxied: clients need no S3 keys); `dvc`, the repository's DVC remote (`.dvc/config.local`). The
served deployment exchanges adapters through it (flow parameter `transport=s3`).
"""

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fedse.config import Config, load_config
from fedse.placement import assign, visible_devices
from fedse.signing import Keyring
from fedse.transport import SERVER
from flows import orgs
from flows.private import private_dir, token, write_private, write_private_json
from flows.seaweed import DEFAULT_PORTS, DVC, MLFLOW, SeaweedFS, free_ports

ROOT = Path(__file__).resolve().parents[1]
DVC_REMOTE = "store"
MLFLOW_ADMIN = "fedse-admin"


@dataclass
class Stack:
    root: Path = ROOT
    prefect_port: int = 4200
    mlflow_port: int = 5000
    extra_env: dict[str, str] | None = None  # e.g. FEDSE_PARAMS for the served deployment
    s3_port: int = 8333
    seaweed_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    orgs: list[str] = field(default_factory=list)  # client organisations given a directory and a worker process
    org_params: Path | None = None  # the params file the organisations' org.yaml names; null: the repository's

    @classmethod
    def on_free_ports(cls, root: Path, orgs: list[str] | None = None, extra_env: dict[str, str] | None = None,
                      org_params: Path | None = None) -> "Stack":
        """A stack in `root` whose every server listens on a port free now (tests and benchmarks)."""
        prefect, mlflow, s3, master, volume, filer, admin = free_ports(7)
        return cls(root=root, prefect_port=prefect, mlflow_port=mlflow, s3_port=s3, orgs=list(orgs or []),
                   org_params=org_params,
                   extra_env={"OMP_NUM_THREADS": "1", **(extra_env or {})},
                   seaweed_ports={"master": master, "volume": volume, "filer": filer, "admin": admin})

    @property
    def orgs_root(self) -> Path:
        return self.root / ".orgs"

    @property
    def state(self) -> Path:
        return self.root / ".serve"

    def params(self) -> Config:
        """The served deployment's config (FEDSE_PARAMS, else the root's params.yaml, else the defaults)."""
        params = Path((self.extra_env or {}).get("FEDSE_PARAMS", self.root / "params.yaml"))
        return load_config(params if params.exists() else None)

    @property
    def seaweed(self) -> SeaweedFS:
        """The object store, with an identity for every client the params know of."""
        clients = self.params().envs.names
        return SeaweedFS(self.root / ".seaweedfs", self.state, clients, self.s3_port, self.seaweed_ports)

    def org_devices(self) -> dict[str, str | None]:
        """The device each local organisation's worker process is pinned to: one each in `orgs` order while
        this machine shows enough (or `orchestration.gpus` names them), then shared; None without a GPU."""
        return assign(self.orgs, visible_devices(self.params().orchestration.gpus))

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def control(self) -> Path:
        """The control plane's secrets: Prefect's auth string, the MLflow admin's password, Flask's key."""
        return self.state / "control.json"

    @property
    def mlflow_auth_config(self) -> Path:
        return self.state / "mlflow-auth.ini"

    @property
    def mlflow_auth_db(self) -> Path:
        return self.state / "mlflow-auth.db"

    @property
    def env_file(self) -> Path:
        return self.state / "env.sh"

    def secrets(self) -> dict[str, str]:
        """The control plane's secrets (minted by `prepare`)."""
        return json.loads(self.control.read_text())

    def prepare(self) -> dict[str, str]:
        """Every secret the stack needs, in `.serve/` (0700; files 0600): the ones there are reused, missing
        ones minted (S3 keys, TLS, SeaweedFS's JWT keys: flows/seaweed.py); then the MLflow auth config and
        `env.sh`, which follow from them. Returns the control plane's secrets."""
        private_dir(self.state)
        self.seaweed.prepare()
        if not self.control.exists():
            self._mint_control()
        self._write_derived()
        self._server_identity()
        return self.secrets()

    @property
    def server_keys(self) -> Path:
        """The server's Ed25519 keyring: its own key and the organisations' public keys (fedse keys)."""
        return self.state / "keys"

    @property
    def server_credentials(self) -> Path:
        """The server's S3 keys: its own role only (least privilege; workers mode)."""
        return self.state / "server-credentials.json"

    @property
    def simulation_credentials(self) -> Path:
        """The server's role and every client's: for runs that simulate the clients themselves (inprocess, dask
        modes: one machine, one trust domain), never handed to an organisation."""
        return self.state / "simulation-credentials.json"

    def _server_identity(self) -> None:
        """The server's keyring and its credentials files, derived from the store's keys."""
        Keyring(self.server_keys).init(SERVER)
        keys = json.loads(self.seaweed.credentials.read_text())
        roles = keys["roles"]
        write_private_json(self.server_credentials, keys | {"roles": {SERVER: roles[SERVER]}})
        write_private_json(self.simulation_credentials, keys | {"roles": {
            r: k for r, k in roles.items() if r == SERVER or r.startswith("client_")}})

    def rotate(self) -> None:
        """New secrets everywhere: S3 keys of every role, the local CA and its certificates, SeaweedFS's JWT
        keys, Prefect's auth string, the MLflow admin's password (also in its auth database), the server's
        Ed25519 signing key. Refused while the stack is up (its servers hold the old ones). Organisations need
        their new S3 keys, the CA and the server's public key afterwards (the local ones get them at `up`)."""
        if (self.state / "pids.json").exists():
            raise RuntimeError(f"the stack is up ({self.state / 'pids.json'}): make stop first, then rotate")
        private_dir(self.state)
        self.seaweed.rotate()
        self._mint_control()
        if self.mlflow_auth_db.exists():
            self._set_mlflow_admin_password()
        self._write_derived()
        keyring = Keyring(self.server_keys)
        if keyring.has(SERVER):  # the server's Ed25519 signing key (the old one retired in keys/retired/)
            keyring.rotate(SERVER)
        self._server_identity()  # the server's credentials files follow the new S3 keys

    def client_env(self) -> dict[str, str]:
        """What a client of the stack needs, secrets included (the operator's shell: `.serve/env.sh`; the
        served deployment; the tests): the Prefect API and its auth string, the MLflow server and its admin's
        credentials (the server's flow is the registry's only writer), the object store with its CA."""
        secrets = self.secrets()
        return {"PREFECT_API_URL": self.prefect_api, "PREFECT_API_AUTH_STRING": secrets["prefect_auth_string"],
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_TRACKING_USERNAME": secrets["mlflow_username"],
                "MLFLOW_TRACKING_PASSWORD": secrets["mlflow_password"]} | self.seaweed.environment()

    def mlflow_env(self) -> dict[str, str]:
        """The MLflow client variables alone (the tracking server and its admin's credentials)."""
        return {k: v for k, v in self.client_env().items() if k.startswith("MLFLOW_TRACKING_")}

    def prefect_settings(self) -> dict:
        """Prefect settings for a client in this process (`prefect.settings.temporary_settings(updates=...)`):
        Prefect reads its settings once per process, so exporting variables later is not enough."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        return {PREFECT_API_URL: self.prefect_api, PREFECT_API_AUTH_STRING: self.secrets()["prefect_auth_string"]}

    def secret_files(self) -> list[Path]:
        """Every file of `.serve/` that holds a secret (each must be mode 0600)."""
        store = self.seaweed
        return [self.control, self.mlflow_auth_config, self.env_file, store.config, store.credentials,
                self.server_credentials, self.simulation_credentials, store.security, *store.tls.files()]

    def env(self) -> dict[str, str]:
        """The environment of the served deployment: the caller's, without a Prefect Cloud key (it would
        take precedence over the auth string), plus the stack's client variables."""
        inherited = {k: v for k, v in os.environ.items() if k != "PREFECT_API_KEY"}
        served = {"FEDSE_S3_CREDENTIALS": str(self.server_credentials), "FEDSE_SERVER_KEYS": str(self.server_keys),
                  "FEDSE_S3_SIMULATION_CREDENTIALS": str(self.simulation_credentials)}
        return inherited | {"PREFECT_HOME": str(self.root / ".prefect"),
                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | self.client_env() | served | (
                                self.extra_env or {})

    def up(self, timeout: float = 180) -> dict[str, int]:
        if (self.state / "pids.json").exists():
            raise RuntimeError(f"{self.state / 'pids.json'}: a stack is already up (make stop first)")
        secrets = self.prepare()
        (self.root / "mlflow").mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent
        env = self.env()
        base = {k: v for k, v in env.items() if not k.startswith(("PREFECT_API_AUTH", "MLFLOW_TRACKING_"))}
        store = self.seaweed
        pids: dict[str, int] = {}
        try:
            store.data.mkdir(exist_ok=True)
            pids["seaweedfs"] = self._start("seaweedfs", store.command(), base)
            self._write(pids)
            store.wait(timeout)
            self._dvc_remote(store)
            pids["prefect"] = self._start("prefect", [str(bin_dir / "prefect"), "server", "start", "--host",
                                                      "127.0.0.1", "--port", str(self.prefect_port)],
                                          base | {"PREFECT_SERVER_API_AUTH_STRING": secrets["prefect_auth_string"],
                                                  "PREFECT_API_AUTH_STRING": secrets["prefect_auth_string"]})
            self._init_mlflow_db()
            pids["mlflow"] = self._start("mlflow", [
                str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                "--port", str(self.mlflow_port), "--backend-store-uri", self._db_uri(), "--serve-artifacts",
                "--artifacts-destination", f"s3://{MLFLOW}/artifacts", "--workers", "1"],
                base | store.role_environment(MLFLOW) | {
                    "MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_auth_config),
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["mlflow_flask_secret_key"]})
            self._wait(f"{self.prefect_api}/health", "Prefect server", timeout)
            self._wait(f"{self.mlflow_uri}/health", "MLflow server", timeout)
            if self.mlflow_auth_db.exists():
                os.chmod(self.mlflow_auth_db, 0o600)  # password hashes (the folder is 0700 already)
            pids["deployment"] = self._start("deployment", [sys.executable, "-m", "flows"], env)
            self._write(pids)
            for client in self.orgs:
                pids[f"org-{client}"] = self._start_org(client, store)
                self._write(pids)
            self._wait_deployment(timeout)
        except BaseException:
            self._write(pids)
            self.down()
            raise
        return pids

    def down(self) -> list[str]:
        """Stop the recorded processes (their process groups), newest first; returns what was stopped."""
        path = self.state / "pids.json"
        if not path.exists():
            return []
        pids = json.loads(path.read_text())
        stopped = []
        for name, pid in reversed(list(pids.items())):
            try:
                os.killpg(pid, signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                continue
        for pid in pids.values():
            _reap(pid)
        path.unlink()
        return stopped

    def _start_org(self, client: str, store: SeaweedFS) -> int:
        """The organisation's directory (its seeds, its S3 keys only, its Ed25519 key and the server's public
        key, its DVC repository, its org.yaml naming the store and its own params) and its worker process, with
        none of the server's variables: no Prefect API or auth string, no MLflow credentials. It reaches the
        object store over https and verifies it with its own copy of the CA's certificate (what a remote
        organisation is handed, with its keys), named in its org.yaml."""
        ca = orgs.folder(self.orgs_root, client) / "ca.crt"
        ca.parent.mkdir(parents=True, exist_ok=True)
        ca.write_bytes(store.ca_bundle.read_bytes())
        orgs.prepare(self.orgs_root, client, self.root / "data" / "seed", store.credentials,
                     endpoint=store.endpoint, ca_bundle=ca, server_keys=self.server_keys, params=self.org_params)
        env = orgs.environment(self.orgs_root, client, base=os.environ | (self.extra_env or {}),
                               device=self.org_devices().get(client))
        return orgs.start(self.orgs_root, client, env, self.state / f"org-{client}.log")

    def _dvc_remote(self, store: SeaweedFS) -> None:
        """The repository's default DVC remote becomes bucket `dvc` of the store, with the dvc role's keys and
        the CA to verify it with, in `.dvc/config.local` (git-ignored: keys and a local endpoint never reach a
        commit), which is never readable by anyone but its owner: DVC writes it under umask 077, and an older,
        wider one is narrowed before any key goes in."""
        keys = json.loads(store.credentials.read_text())["roles"][DVC]
        local = self.root / ".dvc" / "config.local"
        if local.exists():
            os.chmod(local, 0o600)
        dvc = str(Path(sys.executable).parent / "dvc")
        for args in (["remote", "add", "--local", "--force", "--default", DVC_REMOTE, f"s3://{DVC}/cache"],
                     ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", store.endpoint],
                     ["remote", "modify", "--local", DVC_REMOTE, "ssl_verify", str(store.ca_bundle)],
                     ["remote", "modify", "--local", DVC_REMOTE, "access_key_id", keys["access_key"]],
                     ["remote", "modify", "--local", DVC_REMOTE, "secret_access_key", keys["secret_key"]]):
            subprocess.run([dvc, *args], cwd=self.root, check=True, capture_output=True, umask=0o077)
        os.chmod(local, 0o600)

    def _mint_control(self) -> None:
        write_private_json(self.control, {
            "prefect_auth_string": f"operator:{token()}", "mlflow_username": MLFLOW_ADMIN,
            "mlflow_password": token(), "mlflow_flask_secret_key": token()})

    def _write_derived(self) -> None:
        """The MLflow auth config (its admin and password; nobody else may read or write anything) and the
        operator's `env.sh`, both 0600."""
        secrets = self.secrets()
        write_private(self.mlflow_auth_config, "\n".join([
            "# written by flows/stack.py from .serve/control.json: secret (mode 0600)", "[mlflow]",
            "default_permission = NO_PERMISSIONS", f"database_uri = sqlite:///{self.mlflow_auth_db}",
            f"admin_username = {secrets['mlflow_username']}", f"admin_password = {secrets['mlflow_password']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "grant_default_workspace_access = false", ""]))
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()]
        write_private(self.env_file, "\n".join(["# the served stack's endpoints and the operator's credentials: "
                                                "secret (mode 0600); `source` it, never commit or share it",
                                                *lines, ""]))

    def _set_mlflow_admin_password(self) -> None:
        """The admin's password in MLflow's auth database (the config's only counts for a new database); the
        password goes through stdin, never argv."""
        script = ("import json, sys\nfrom mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore\n"
                  "a = json.load(sys.stdin)\ns = SqlAlchemyStore()\ns.init_db(a['db'])\n"
                  "s.update_user(a['user'], password=a['password']) if s.has_user(a['user']) else None\n")
        secrets = self.secrets()
        subprocess.run([sys.executable, "-W", "ignore", "-c", script], check=True, capture_output=True, text=True,
                       input=json.dumps({"db": f"sqlite:///{self.mlflow_auth_db}", "user": secrets["mlflow_username"],
                                         "password": secrets["mlflow_password"]}))

    def _db_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow' / 'mlflow.db'}"

    def _init_mlflow_db(self) -> None:
        """Create or upgrade the schema once, before the server's workers touch the file."""
        subprocess.run([str(Path(sys.executable).parent / "mlflow"), "db", "upgrade", self._db_uri()], check=True,
                       capture_output=True)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> int:
        log = (self.state / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc.pid

    def _write(self, pids: dict[str, int]) -> None:
        (self.state / "pids.json").write_text(json.dumps(pids))

    def prefect_headers(self) -> dict[str, str]:
        """The Authorization header Prefect's clients send (the auth string, base64)."""
        auth = base64.b64encode(self.secrets()["prefect_auth_string"].encode()).decode()
        return {"Authorization": f"Basic {auth}"}

    def _wait(self, url: str, what: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s (log: {self.state})")

    def _wait_deployment(self, timeout: float) -> None:
        url = f"{self.prefect_api}/deployments/name/fedse/round-loop"
        self._wait(url, "deployment fedse/round-loop", timeout, self.prefect_headers())


def _reap(pid: int, timeout: float = 15) -> None:
    """Until the process group is gone (SIGKILL after `timeout`); a leader that is this process's own child is
    waited for, else it would linger as a zombie and the group would seem alive until the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (another process started it), or already reaped
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    from fedse.config import load_config

    params = Path(os.environ.get("FEDSE_PARAMS", ROOT / "params.yaml"))
    stack = Stack(prefect_port=int(os.environ.get("FEDSE_PREFECT_PORT", 4200)),
                  mlflow_port=int(os.environ.get("FEDSE_MLFLOW_PORT", 5000)),
                  s3_port=int(os.environ.get("FEDSE_S3_PORT", 8333)),
                  orgs=load_config(params if params.exists() else None).envs.names)
    if argv[:1] == ["up"]:
        try:
            stack.up()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        store = stack.seaweed
        print(f"Prefect UI/API  {stack.prefect_api.removesuffix('/api')} (127.0.0.1 only; API auth string in "
              f"{stack.env_file})\n"
              f"MLflow          {stack.mlflow_uri} (127.0.0.1 only; basic auth, admin {MLFLOW_ADMIN}; artifacts in "
              f"s3://{MLFLOW}/artifacts)\n"
              f"S3 (SeaweedFS)  {store.endpoint} (TLS, CA {store.ca_bundle}, SHA-256 {store.tls.fingerprint()}): "
              f"buckets fedse (adapter exchange), {MLFLOW}, {DVC} (DVC remote {DVC_REMOTE}); data .seaweedfs/, "
              f"keys per role {store.credentials}\n"
              f"deployment      fedse/round-loop (served, S3 transport; log .serve/deployment.log)\n"
              f"organisations   {', '.join(stack.orgs)}: a worker each from .orgs/<client>/ with its own keys and "
              f"the CA (logs .serve/org-<client>.log); a remote one is handed its s3-credentials.json and ca.crt\n"
              f"secrets         {stack.state}/ (0700, files 0600), reused by every start; `make rotate` mints anew\n"
              f"to use it:      source {stack.env_file}   (the exports, credentials included; mode 0600)")
        return 0
    if argv[:1] == ["down"]:
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if argv[:1] == ["rotate"]:
        try:
            stack.rotate()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"rotated: S3 keys of every role, the local CA and its certificates (SHA-256 "
              f"{stack.seaweed.tls.fingerprint()}), SeaweedFS's JWT keys, the Prefect auth string, the MLflow "
              f"admin's password, the server's signing key; a remote organisation needs its new "
              f"s3-credentials.json, ca.crt and the server's public key (local ones get them at `make serve`)")
        return 0
    print("usage: python -m flows.stack up|down|rotate", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
