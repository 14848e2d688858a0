"""How adapters travel between the clients and the server: one interface, two backends.

In a real federation the clients are separate organisations that share no disk; the only thing that leaves a
client is its adapter, through an object store the federation runs. `Transport` is that exchange, with the
same layout on either backend. Every object lies under the folder of the role that writes it ("writer
first"), so one rule per role covers everything it may write, and a store's glob `*` matching `/` (SeaweedFS)
cannot reach another role's folder:

    <prefix>client_<k>/<experiment>/round_<t>/adapter.safetensors    what client k sent after round t
    <prefix>client_<k>/<experiment>/round_<t>/adapter.json           its signed manifest, written last
    <prefix>client_<k>/<experiment>/round_<t>/status.json            its signed answer to the round request
    <prefix>server/<experiment>/round_<t>/global/adapter.safetensors what the server broadcast after round t
    <prefix>server/<experiment>/round_<t>/global/adapter.json        its signed manifest
    <prefix>server/<experiment>/round_<t>/client_<k>/request.json    the server's signed round request to k
    <prefix>server/inbox/client_<k>/request.json                     the newest request to k (what k polls)

Backends: a local folder (`local`, the embedded default: `fedse run` and `make run` need no server) and S3
through boto3 (`s3`: AWS S3, or the SeaweedFS server `make serve` runs on 127.0.0.1).

Integrity and authenticity: the tensors are written first, then a small manifest naming their sha256, byte
count, dtype, names, shapes and the metadata sent with them, signed (Ed25519, fedse/signing.py) by the
sender's role. A reader requires the manifest, verifies its signature against the key it trusts for the
expected sender (a manifest for another experiment, round or sender, or signed by anyone else, is refused),
then checks the tensors against it, so an upload cut off half way, altered, replayed from another round or
forged by another role is never read. Objects are size-capped before they are read (`max_adapter_bytes`,
`MAX_MANIFEST`).

Keys (`transport.keyring`): a folder of Ed25519 keys (`fedse keys`). Null: the run folder's `keys/`, where
every role's key is created on first use — a simulation on one machine, one trust domain. Across
organisations each holds only its own private key and trusts the others' public keys (`make serve` sets this
up under `.serve/keys` and `.orgs/<k>/keys`).

Credentials: every call acts as one role, `client_<k>` or `server`. On S3 each role can have its own keys
(a credentials file, see `S3Spec.credentials`), so the store itself enforces who may write where
(`write_scope`/`read_scope` are those rules as globs, for configuring the store).

Transfer size: `dtype` bf16 or fp16 halves the bytes on the wire; the receiver casts back to fp32 before
using the tensors, so averaging is unchanged apart from the rounding of what was sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.atomic import write_bytes
from fedse.signing import SIGNATURE_FIELD, Keyring, SigningError, sign_doc, verify_doc

AdapterState = dict[str, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT = "fedse-adapter/1"
DATA, MANIFEST, STATUS, REQUEST = "adapter.safetensors", "adapter.json", "status.json", "request.json"
GLOBAL, SERVER, INBOX = "global", "server", "inbox"
MAX_MANIFEST = 1 << 20  # bytes: a manifest, request or status is a few KB; anything bigger is refused unread
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class S3Spec(BaseModel):
    """Where the S3 backend connects. Each field left null is read from the environment, so the same params
    work against AWS and against `make serve`'s SeaweedFS."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(default=None, description="null: env FEDSE_S3_ENDPOINT, else AWS_ENDPOINT_URL, "
                                 "else AWS S3 itself")
    bucket: str | None = Field(default=None, description="null: env FEDSE_S3_BUCKET, else fedse")
    prefix: str | None = Field(default=None, description="key prefix inside the bucket; null: env "
                               "FEDSE_S3_PREFIX, else none")
    region: str = "us-east-1"
    credentials: Path | None = Field(default=None, description="JSON file of per-role keys; null: env "
                                     "FEDSE_S3_CREDENTIALS, else boto3's default chain for every role")


class TransportSpec(BaseModel):
    """The `transport:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "s3"] = "local"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    experiment: str | None = Field(default=None, description="name of the run in the store; null: the run "
                                   "folder's name plus a random suffix (never reuses a name)")
    dir: Path | None = Field(default=None, description="local backend: the exchange folder; null: "
                             "<run folder>/exchange")
    audit_dir: Path | None = Field(default=None, description="per-client egress logs "
                                   "<audit_dir>/<experiment>/client_<k>.jsonl; null: <run folder>/egress")
    s3: S3Spec = Field(default_factory=S3Spec)
    keyring: Path | None = Field(default=None, description="folder of Ed25519 keys (fedse keys); null: env "
                                 "FEDSE_KEYS, else <run folder>/keys with every role's key (one machine)")
    max_adapter_bytes: int = Field(default=1 << 30, ge=1024, description="largest adapter object read from "
                                   "the store; a bigger one is refused before it is downloaded")


class TransportError(ValueError):
    """An exchange that failed; the message is one line naming the store (endpoint and bucket, or folder)."""


@dataclass(frozen=True)
class Upload:
    """One object that left a sender: the manifest written next to the tensors (and the egress record)."""

    experiment: str
    round: int
    sender: str  # client_<k> or global
    key: str  # the tensors' object key, relative to the store's prefix
    sha256: str  # of the object's bytes
    bytes: int
    dtype: str
    tensors: dict[str, list[int]]
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    request: str | None = None  # sha256 of the round request this upload answers (workers mode)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Upload:
        try:
            return cls(**data)
        except TypeError as exc:
            raise TransportError(f"{where}: not a fedse adapter manifest ({exc})") from None


def client_role(client: str) -> str:
    """The role (and the prefix name) of a client: its uploads live under `client_<name>/`."""
    return f"client_{client}"


def write_scope(role: str, prefix: str = "") -> list[str]:
    """Keys a role may write, as globs relative to the bucket: its own folder and nothing else."""
    return [f"{_slash(prefix)}{role}/*"]


def read_scope(role: str, prefix: str = "") -> list[str]:
    """Keys a role may read: the server everything, a client the server's folder (global adapters and round
    requests, all signed by the server)."""
    return [f"{_slash(prefix)}*"] if role == SERVER else [f"{_slash(prefix)}{SERVER}/*"]


def client_folder(experiment: str, round: int, client: str) -> str:
    return f"{client_role(client)}/{experiment}/round_{round}"


def global_folder(experiment: str, round: int) -> str:
    return f"{SERVER}/{experiment}/round_{round}/{GLOBAL}"


def request_key(experiment: str, round: int, client: str) -> str:
    return f"{SERVER}/{experiment}/round_{round}/{client_role(client)}/{REQUEST}"


def inbox_key(client: str) -> str:
    return f"{SERVER}/{INBOX}/{client_role(client)}/{REQUEST}"


def _slash(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


# ------------------------------------------------------------------------------------------------ backends
class Backend(Protocol):
    """Whole-object storage. `get` of a missing key is None, of one over `limit` bytes a TransportError before
    it is read; every other failure raises TransportError."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str, limit: int) -> bytes | None: ...
    def keys(self, prefix: str) -> list[str]: ...
    def describe(self) -> str: ...


class LocalBackend:
    """A folder: objects are files under it, each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes) -> None:
        try:
            write_bytes(self.root / safe_key(key), data)
        except OSError as exc:
            raise TransportError(f"{self.describe()}: cannot write {key} ({exc.strerror or exc})") from None

    def get(self, key: str, limit: int) -> bytes | None:
        path = self.root / safe_key(key)
        if not path.is_file():
            return None
        if path.stat().st_size > limit:
            raise TransportError(f"{self.describe()}: {key} holds {path.stat().st_size} bytes, over the "
                                 f"{limit} allowed; refused unread")
        return path.read_bytes()

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".tmp"))

    def describe(self) -> str:
        return f"exchange folder {self.root}"


class S3Backend:
    """A bucket (and key prefix) on an S3 endpoint, acting as one role with that role's credentials."""

    def __init__(self, endpoint: str | None, bucket: str, prefix: str, region: str, role: str,
                 credentials: dict[str, str]) -> None:
        self.endpoint, self.bucket, self.prefix, self.role = endpoint, bucket, _slash(prefix), role
        self._client = s3_client(endpoint, region, credentials)

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + safe_key(key), Body=data)
        except Exception as exc:
            raise self._error("cannot upload", key, exc) from None

    def get(self, key: str, limit: int) -> bytes | None:
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.prefix + safe_key(key))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error("cannot download", key, exc) from None
        if int(got.get("ContentLength") or 0) > limit:
            got["Body"].close()
            raise TransportError(f"{self.describe()}: {self.prefix}{key} holds {got['ContentLength']} bytes, over "
                                 f"the {limit} allowed; refused unread")
        try:
            data = got["Body"].read(limit + 1)  # a server that under-reports the length still stops here
        except Exception as exc:
            raise self._error("cannot download", key, exc) from None
        if len(data) > limit:
            raise TransportError(f"{self.describe()}: {self.prefix}{key} is over the {limit} bytes allowed; "
                                 "refused")
        return data

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                            Prefix=self.prefix + prefix)
            for page in pages:
                found += [o["Key"].removeprefix(self.prefix) for o in page.get("Contents", [])]
        except Exception as exc:
            raise self._error("cannot list", prefix, exc) from None
        return sorted(found)

    def describe(self) -> str:
        return f"object store {self.endpoint or 'AWS S3 (default endpoint)'}, bucket {self.bucket}"

    def _error(self, action: str, key: str, exc: Exception) -> TransportError:
        return TransportError(f"{self.describe()}: {action} {self.prefix}{key} as {self.role}: {_reason(exc)}")


def safe_key(key: str) -> str:
    """A key made of plain names only: no empty, `.` or `..` part and no leading `/`, so no key can name a
    file outside the exchange folder (or an S3 key that a reader would resolve elsewhere)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise TransportError(f"object key {key!r}: only plain names separated by '/' are allowed")
    return key


def s3_client(endpoint: str | None, region: str, credentials: dict[str, str]) -> Any:
    """A boto3 S3 client that fails within seconds when the store is down (boto3 would retry for long)."""
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(region_name=region, **credentials)
    config = BotoConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=120,
                        s3={"addressing_style": "path"} if endpoint else {})
    return session.client("s3", endpoint_url=endpoint, config=config)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _reason(exc: Exception) -> str:
    """What went wrong, in words a user can act on (the boto3 message would be a traceback's worth)."""
    code = _code(exc)
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return f"the server does not answer ({name}); is it up (make serve)?"
    if name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
        return f"no credentials ({name})"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return f"credentials refused ({code})"
    if code in ("AccessDenied", "403", "Forbidden"):
        return "access denied (this role may not do that here)"
    if code == "NoSuchBucket":
        return "the bucket does not exist"
    return f"{name} {code}".strip()


# ------------------------------------------------------------------------------------------------ encoding
def encode(state: AdapterState, dtype: str) -> tuple[bytes, dict[str, list[int]]]:
    """The tensors in the transfer dtype as one safetensors object (nothing but names, shapes and values)."""
    from safetensors.torch import save

    cast = {k: state[k].detach().to("cpu", DTYPES[dtype]).contiguous() for k in sorted(state)}
    return save(cast), {k: list(v.shape) for k, v in cast.items()}


def decode(data: bytes, upload: Upload, where: str) -> AdapterState:
    """The tensors of a verified object, checked against its manifest, as fp32 (what training and averaging
    use whatever the transfer dtype)."""
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise TransportError(f"{where}: not a readable safetensors object ({type(exc).__name__})") from None
    shapes = {k: list(v.shape) for k, v in state.items()}
    if shapes != upload.tensors:
        raise TransportError(f"{where}: tensors do not match the manifest")
    wrong = [k for k, v in state.items() if v.dtype != DTYPES[upload.dtype]]
    if wrong:
        raise TransportError(f"{where}: tensor {wrong[0]} is {state[wrong[0]].dtype}, the manifest says "
                             f"{upload.dtype}")
    return {k: v.to(torch.float32) for k, v in state.items()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ the exchange
class Transport:
    """The exchange of one experiment: clients upload and fetch the broadcast, the server fetches the uploads
    and publishes the global adapter; in workers mode the server also posts round requests and reads each
    client's signed status. Every call names the role it acts as, and signs (or verifies) as that role."""

    def __init__(self, spec: TransportSpec, experiment: str, run_folder: Path) -> None:
        if not _NAME.match(experiment):
            raise TransportError(f"experiment name {experiment!r}: use letters, digits, '.', '_' and '-' only")
        self.spec, self.experiment = spec, experiment
        self.local_dir = Path(spec.dir or Path(run_folder) / "exchange")
        named = spec.keyring or os.environ.get("FEDSE_KEYS")
        self.simulated = named is None  # every role's key in the run folder: one machine, one trust domain
        self.keyring = Keyring(Path(named) if named else Path(run_folder) / "keys")
        self.answering: str | None = None  # digest of the round request a worker's uploads answer
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # boto3 clients and locks stay in their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_backends", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backends, self._lock = {}, threading.Lock()

    # ---- client side
    def upload(self, round: int, client: str, state: AdapterState, metadata: dict[str, Any],
               request: str | None = None) -> Upload:
        """Client `client` sends its adapter (and only the metadata given) for round `round`, answering the
        round request whose digest is `request` (workers mode)."""
        role = client_role(client)
        return self._send(role, round, client_folder(self.experiment, round, client), state, metadata,
                          request or self.answering)[0]

    def fetch_global(self, round: int, client: str) -> AdapterState:
        """Client `client` downloads the global adapter the server published after round `round`, verified as
        the server's."""
        return self._receive(client_role(client), round, global_folder(self.experiment, round), GLOBAL,
                             SERVER)[0]

    def put_status(self, round: int, client: str, status: dict[str, Any]) -> None:
        """Client `client`'s signed answer to its round request (done with its upload, refused, or failed)."""
        role = client_role(client)
        doc = {"experiment": self.experiment, "round": round, "client": client} | status
        key = f"{client_folder(self.experiment, round, client)}/{STATUS}"
        self._backend(role).put(key, _json(self._sign(role, doc)))

    def read_inbox(self, client: str) -> dict[str, Any] | None:
        """The newest round request to client `client`, verified as the server's (None when there is none)."""
        return self._read_signed(client_role(client), inbox_key(client), SERVER)

    # ---- server side
    def fetch_client(self, round: int, client: str) -> tuple[AdapterState, Upload]:
        """The server downloads client `client`'s upload of round `round`, verified against its signed
        manifest."""
        role = client_role(client)
        return self._receive(SERVER, round, client_folder(self.experiment, round, client), role, role)

    def publish_global(self, round: int, state: AdapterState, metadata: dict[str, Any]) -> tuple[AdapterState,
                                                                                                   Upload]:
        """The server publishes the global adapter; returns it as the clients will receive it (cast to the
        transfer dtype and back), so the server goes on with exactly what it broadcast."""
        upload, data = self._send(SERVER, round, global_folder(self.experiment, round), state, metadata, None)
        return decode(data, upload, upload.key), upload

    def put_request(self, round: int, client: str, request: dict[str, Any]) -> str:
        """The server's signed round request to `client`: kept under the round and posted to the client's
        inbox; returns its digest (what the client's upload must name)."""
        signed = self._sign(SERVER, request)
        data = _json(signed)
        backend = self._backend(SERVER)
        backend.put(request_key(self.experiment, round, client), data)
        backend.put(inbox_key(client), data)
        return digest(request)

    def get_status(self, round: int, client: str) -> dict[str, Any] | None:
        """Client `client`'s signed status for round `round`, verified as that client's (None: not yet)."""
        role = client_role(client)
        doc = self._read_signed(SERVER, f"{client_folder(self.experiment, round, client)}/{STATUS}", role)
        if doc is not None and (doc.get("experiment"), doc.get("round"), doc.get("client")) != (
                self.experiment, round, client):
            raise TransportError(f"status of {client} round {round} describes {doc.get('experiment')} round "
                                 f"{doc.get('round')} client {doc.get('client')}")
        return doc

    def unexpected(self, round: int, clients: list[str]) -> list[str]:
        """Keys under this round's folders that are not in its layout (each client's adapter, manifest and
        status), as the server lists them: the server never reads such objects, and reports them."""
        found = []
        for client in clients:
            base = client_folder(self.experiment, round, client)
            found += [k for k in self._backend(SERVER).keys(f"{base}/")
                      if k not in {f"{base}/{n}" for n in (DATA, MANIFEST, STATUS)}]
        return sorted(found)

    def check_fresh(self, clients: list[str]) -> None:
        """Refuse to start an experiment whose name already holds objects (a stale manifest would otherwise
        pass for a new upload)."""
        backend = self._backend(SERVER)
        found = [k for folder in [SERVER, *map(client_role, clients)]
                 for k in backend.keys(f"{folder}/{self.experiment}/")]
        if found:
            raise TransportError(f"{self.where(SERVER)}: experiment {self.experiment} already holds {len(found)} "
                                 "objects; choose another transport.experiment")

    def where(self, role: str = SERVER) -> str:
        return self._backend(role).describe()

    def uri(self) -> str:
        """Where this experiment's objects are, as a URI (metrics.json and the audit log name it)."""
        if self.spec.backend == "local":
            return self.local_dir.resolve().as_uri()
        s3 = self._s3_settings()
        return f"s3://{s3['bucket']}/{_slash(s3['prefix'])}"

    def destination(self) -> str:
        """Where an upload actually goes, endpoint included (what an organisation's egress log records)."""
        if self.spec.backend == "local":
            return self.uri()
        return f"{self._s3_settings()['endpoint'] or 'AWS S3'} {self.uri()}"

    # ---- the protocol
    def _sign(self, role: str, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            if self.simulated:
                self.keyring.init(role)
            return sign_doc(self.keyring, role, doc)
        except SigningError as exc:
            raise TransportError(f"cannot sign as {role}: {exc}") from None

    def _read_signed(self, role: str, key: str, signer: str) -> dict[str, Any] | None:
        raw = self._backend(role).get(key, MAX_MANIFEST)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise TransportError(f"{self.where(role)}: {key} is not a JSON object")
        return self._verify(doc, signer, key)

    def _verify(self, doc: dict[str, Any], signer: str, where: str) -> dict[str, Any]:
        try:
            if self.simulated:
                self.keyring.init(signer)
            return verify_doc(self.keyring, doc, signer)
        except SigningError as exc:
            raise TransportError(f"{where}: {exc}") from None

    def _send(self, role: str, round: int, folder: str, state: AdapterState, metadata: dict[str, Any],
              request: str | None) -> tuple[Upload, bytes]:
        data, tensors = encode(state, self.spec.dtype)
        sender = GLOBAL if role == SERVER else role
        upload = Upload(experiment=self.experiment, round=round, sender=sender, key=f"{folder}/{DATA}",
                        sha256=sha256(data), bytes=len(data), dtype=self.spec.dtype, tensors=tensors,
                        metadata=dict(metadata), request=request)
        if len(data) > self.spec.max_adapter_bytes:
            raise TransportError(f"adapter of {sender} round {round} is {len(data)} bytes, over "
                                 f"transport.max_adapter_bytes {self.spec.max_adapter_bytes}")
        manifest = _json(self._sign(role, upload.to_json()))
        backend = self._backend(role)
        backend.put(upload.key, data)
        backend.put(f"{folder}/{MANIFEST}", manifest)  # last: complete
        return upload, data

    def _receive(self, role: str, round: int, folder: str, sender: str, signer: str,
                 ) -> tuple[AdapterState, Upload]:
        backend = self._backend(role)
        doc = self._read_signed(role, f"{folder}/{MANIFEST}", signer)
        if doc is None:
            raise TransportError(f"{backend.describe()}: no complete upload at {folder}/ (manifest {MANIFEST} "
                                 "missing: the sender has not finished, or failed)")
        upload = Upload.from_json(doc, f"{folder}/{MANIFEST}")
        expected = (self.experiment, round, sender, f"{folder}/{DATA}")
        if (upload.experiment, upload.round, upload.sender, upload.key) != expected:
            raise TransportError(f"{backend.describe()}: {folder}/{MANIFEST} describes {upload.experiment} round "
                                 f"{upload.round} {upload.sender} ({upload.key}), not this round's {sender}: "
                                 "replayed or misplaced")
        data = backend.get(upload.key, self.spec.max_adapter_bytes)
        if data is None or len(data) != upload.bytes or sha256(data) != upload.sha256:
            got = "missing" if data is None else f"{len(data)} bytes, sha256 {sha256(data)[:12]}"
            raise TransportError(f"{backend.describe()}: {upload.key} does not match its manifest ({got}; expected "
                                 f"{upload.bytes} bytes, sha256 {upload.sha256[:12]}): incomplete or altered")
        return decode(data, upload, upload.key), upload

    def _backend(self, role: str) -> Backend:
        with self._lock:
            if role not in self._backends:
                self._backends[role] = self._open(role)
            return self._backends[role]

    def _open(self, role: str) -> Backend:
        if self.spec.backend == "local":
            return LocalBackend(self.local_dir)
        s3 = self._s3_settings()
        return S3Backend(s3["endpoint"], s3["bucket"], s3["prefix"], self.spec.s3.region, role,
                         role_credentials(s3["credentials"], role))

    def _s3_settings(self) -> dict[str, Any]:
        spec = self.spec.s3
        env = os.environ.get
        return {"endpoint": spec.endpoint or env("FEDSE_S3_ENDPOINT") or env("AWS_ENDPOINT_URL") or None,
                "bucket": spec.bucket or env("FEDSE_S3_BUCKET") or "fedse",
                "prefix": spec.prefix if spec.prefix is not None else env("FEDSE_S3_PREFIX", ""),
                "credentials": spec.credentials or env("FEDSE_S3_CREDENTIALS") or None}


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def digest(doc: dict[str, Any]) -> str:
    """sha256 of a document's canonical form, signature left out (how an upload and a status name the round
    request they answer)."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def experiment_name(spec: TransportSpec, run_folder: Path) -> str:
    """The run's name in the store: `transport.experiment`, else the run folder's name and a random suffix, so
    a rerun into a folder of the same name never meets the objects of the earlier one."""
    return spec.experiment or f"{Path(run_folder).name}-{uuid.uuid4().hex[:8]}"


def role_credentials(path: Path | str | None, role: str) -> dict[str, str]:
    """boto3 session arguments for a role, from a JSON file `{"roles": {role: {...}}}` whose entries are
    `{"access_key": ..., "secret_key": ...}` or `{"profile": <AWS profile>}`; no file: boto3's default chain
    (environment, ~/.aws, instance role) for every role."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TransportError(f"{path}: cannot read the S3 credentials file ({exc})") from None
    entry = data.get("roles", {}).get(role)
    if not isinstance(entry, dict):
        raise TransportError(f"{path}: no credentials for role {role}")
    if "profile" in entry:
        return {"profile_name": entry["profile"]}
    if not {"access_key", "secret_key"} <= set(entry):
        raise TransportError(f"{path}: role {role} needs access_key and secret_key (or profile)")
    return {"aws_access_key_id": entry["access_key"], "aws_secret_access_key": entry["secret_key"]}
