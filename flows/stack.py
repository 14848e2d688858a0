"""The served stack on one machine: SeaweedFS (the federation's S3 object store), a Prefect server, an MLflow
server, the `round-loop` deployment, and one worker per client organisation (`orgs`: each serves its
`fedse-client/<client>` deployment from `.orgs/<client>/` with only its own seeds and keys, flows/orgs.py).

`python -m flows.stack up` starts each on 127.0.0.1 (state under the repository: `.seaweedfs/`, `.prefect/`,
`mlflow/`), waits until each answers, records their pids in `.serve/pids.json` and prints the URLs; `down`
stops exactly those processes (each was started in its own process group, which is what is signalled).
`make serve` and `make stop` call these; the integration tests use `up`/`down` with free ports.

The object store (flows/seaweed.py) holds three buckets: `fedse`, the adapter exchange, with one identity per
client and one for the server (keys in `.serve/s3-credentials.json`); `mlflow`, where the MLflow server keeps
artifacts (proxied: clients need no S3 keys); `dvc`, the repository's DVC remote (`.dvc/config.local`). The
served deployment exchanges adapters through it (flow parameter `transport=s3`).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flows import orgs
from flows.seaweed import DEFAULT_PORTS, DVC, EXCHANGE, MLFLOW, SeaweedFS, free_ports

ROOT = Path(__file__).resolve().parents[1]
DVC_REMOTE = "store"


@dataclass
class Stack:
    root: Path = ROOT
    prefect_port: int = 4200
    mlflow_port: int = 5000
    extra_env: dict[str, str] | None = None  # e.g. FEDSE_PARAMS for the served deployment
    s3_port: int = 8333
    seaweed_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    orgs: list[str] = field(default_factory=list)  # client organisations given a directory and a worker process

    @classmethod
    def on_free_ports(cls, root: Path, orgs: list[str] | None = None, extra_env: dict[str, str] | None = None,
                      ) -> "Stack":
        """A stack in `root` whose every server listens on a port free now (tests and benchmarks)."""
        prefect, mlflow, s3, master, volume, filer, admin = free_ports(7)
        return cls(root=root, prefect_port=prefect, mlflow_port=mlflow, s3_port=s3, orgs=list(orgs or []),
                   extra_env={"OMP_NUM_THREADS": "1", **(extra_env or {})},
                   seaweed_ports={"master": master, "volume": volume, "filer": filer, "admin": admin})

    @property
    def orgs_root(self) -> Path:
        return self.root / ".orgs"

    @property
    def state(self) -> Path:
        return self.root / ".serve"

    @property
    def seaweed(self) -> SeaweedFS:
        """The object store, with an identity for every client the params know of."""
        from fedse.config import load_config

        params = Path((self.extra_env or {}).get("FEDSE_PARAMS", self.root / "params.yaml"))
        clients = load_config(params if params.exists() else None).envs.names
        return SeaweedFS(self.root / ".seaweedfs", self.state, clients, self.s3_port, self.seaweed_ports)

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """What every process of the stack (and a user's shell) needs to talk to it."""
        return os.environ | {
            "PREFECT_HOME": str(self.root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_uri,
        } | self.seaweed.environment() | (self.extra_env or {})

    def up(self, timeout: float = 180) -> dict[str, int]:
        if (self.state / "pids.json").exists():
            raise RuntimeError(f"{self.state / 'pids.json'}: a stack is already up (make stop first)")
        self.state.mkdir(exist_ok=True)
        (self.root / "mlflow").mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent
        env = self.env()
        store = self.seaweed
        pids: dict[str, int] = {}
        try:
            store.write_identities()
            store.data.mkdir(exist_ok=True)
            pids["seaweedfs"] = self._start("seaweedfs", store.command(), env)
            self._write(pids)
            store.wait(timeout)
            self._dvc_remote(store)
            pids["prefect"] = self._start("prefect", [str(bin_dir / "prefect"), "server", "start", "--host",
                                                      "127.0.0.1", "--port", str(self.prefect_port)], env)
            self._init_mlflow_db()
            pids["mlflow"] = self._start("mlflow", [
                str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                "--backend-store-uri", self._db_uri(), "--serve-artifacts", "--artifacts-destination",
                f"s3://{MLFLOW}/artifacts", "--workers", "1"], env | store.role_environment(MLFLOW))
            self._wait(f"{self.prefect_api}/health", "Prefect server", timeout)
            self._wait(f"{self.mlflow_uri}/health", "MLflow server", timeout)
            pids["deployment"] = self._start("deployment", [sys.executable, "-m", "flows"], env)
            self._write(pids)
            for client in self.orgs:
                pids[f"org-{client}"] = self._start_org(client, store)
                self._write(pids)
            self._wait_deployment(timeout)
            for client in self.orgs:
                self._wait(f"{self.prefect_api}/deployments/name/fedse-client/{client}",
                           f"organisation {client}'s deployment fedse-client/{client}", timeout)
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
        """The organisation's directory (its seeds, its keys only, its DVC repository) and its worker process,
        which serves deployment fedse-client/<client> with none of the server's variables."""
        orgs.prepare(self.orgs_root, client, self.root / "data" / "seed", store.credentials)
        env = orgs.environment(self.orgs_root, client, self.prefect_api, store.endpoint, EXCHANGE,
                               base=os.environ | (self.extra_env or {}))
        return orgs.start(self.orgs_root, client, env, self.state / f"org-{client}.log")

    def _dvc_remote(self, store: SeaweedFS) -> None:
        """The repository's default DVC remote becomes bucket `dvc` of the store, with the dvc role's keys, in
        `.dvc/config.local` (git-ignored: keys and a local endpoint never reach a commit)."""
        keys = json.loads(store.credentials.read_text())["roles"][DVC]
        dvc = str(Path(sys.executable).parent / "dvc")
        for args in (["remote", "add", "--local", "--force", "--default", DVC_REMOTE, f"s3://{DVC}/cache"],
                     ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", store.endpoint],
                     ["remote", "modify", "--local", DVC_REMOTE, "access_key_id", keys["access_key"]],
                     ["remote", "modify", "--local", DVC_REMOTE, "secret_access_key", keys["secret_key"]]):
            subprocess.run([dvc, *args], cwd=self.root, check=True, capture_output=True)

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

    def _wait(self, url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s (log: {self.state})")

    def _wait_deployment(self, timeout: float) -> None:
        url = f"{self.prefect_api}/deployments/name/fedse/round-loop"
        self._wait(url, "deployment fedse/round-loop", timeout)


def _reap(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
        exports = " ".join(f"{k}={v}" for k, v in store.environment().items())
        print(f"Prefect UI/API  {stack.prefect_api.removesuffix('/api')}\nMLflow          {stack.mlflow_uri} "
              f"(artifacts in s3://{MLFLOW}/artifacts)\n"
              f"S3 (SeaweedFS)  {store.endpoint}: buckets fedse (adapter exchange), {MLFLOW}, {DVC} (DVC remote "
              f"{DVC_REMOTE}); data .seaweedfs/, keys per role {store.credentials}\n"
              f"deployment      fedse/round-loop (served, S3 transport; log .serve/deployment.log)\n"
              f"organisations   {', '.join(stack.orgs)}: a worker each serving fedse-client/<client> from "
              f".orgs/<client>/ with its own keys (logs .serve/org-<client>.log); used when a run sets "
              f"orchestration.mode=workers\n"
              f"to use it:       export PREFECT_API_URL={stack.prefect_api} MLFLOW_TRACKING_URI={stack.mlflow_uri} "
              f"{exports}")
        return 0
    if argv[:1] == ["down"]:
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    print("usage: python -m flows.stack up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
