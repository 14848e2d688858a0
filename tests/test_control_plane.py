"""The served stack's control plane (docs/security.md, "Control plane"), attacked from outside on the session's
one running stack (fixture `served_stack`, conftest; the same one tests/test_stack.py runs flows through):
Prefect's API wants its auth string, MLflow wants the admin's credentials and lets nobody else write, the S3
gateway is https that verifies only with the local CA, SeaweedFS's internal HTTP ports want JWTs and its gRPC
ports a client certificate, every secret file is 0600 in a 0700 folder. Secrets are reused across restarts,
and `rotate` (refused while up) re-mints them: on stopped stacks in a temporary folder, no servers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from flows.stack import Stack


def call(url: str, data: dict | None = None, auth: str | None = None,
         headers: dict[str, str] | None = None, method: str | None = None) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; `auth` is "user:password" for Basic authentication."""
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json", **(headers or {})}, method=method)
    if auth is not None:
        request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_prefect_api_answers_only_with_the_auth_string(served_stack: Stack) -> None:
    api = served_stack.prefect_api
    secret = served_stack.secrets()["prefect_auth_string"]
    assert call(f"{api}/flows/filter", {})[0] == 401  # no Authorization header
    assert call(f"{api}/deployments/name/fedse/round-loop")[0] == 401
    assert call(f"{api}/flows/filter", {}, auth="operator:guess")[0] == 401
    assert call(f"{api}/flows/filter", {}, headers={"Authorization": "Bearer " + secret})[0] == 401
    assert call(f"{api}/flows/filter", {}, auth=secret)[0] == 200
    assert call(f"{api}/deployments/name/fedse/round-loop", auth=secret)[0] == 200
    assert call(f"{api}/health")[0] == 200  # the one open route: a liveness probe, no data


def test_mlflow_answers_only_with_credentials_and_only_the_admin_writes(served_stack: Stack) -> None:
    uri = served_stack.mlflow_uri
    creds = served_stack.mlflow_env()
    admin = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
    rest = f"{uri}/api/2.0/mlflow"
    assert call(f"{rest}/experiments/search?max_results=1")[0] == 401
    assert call(f"{rest}/experiments/search?max_results=1", auth=f"{creds['MLFLOW_TRACKING_USERNAME']}:guess"
                )[0] == 401
    assert call(f"{rest}/experiments/search?max_results=1", auth=admin)[0] == 200

    model, user = f"probe-{uuid.uuid4().hex[:8]}", f"viewer-{uuid.uuid4().hex[:8]}"
    other = f"{user}:{uuid.uuid4().hex}"
    assert call(f"{rest}/registered-models/create", {"name": model}, auth=admin)[0] == 200
    experiment = json.loads(call(f"{rest}/experiments/create", {"name": model}, auth=admin)[1])["experiment_id"]
    assert call(f"{rest}/users/create", {"username": user, "password": other.split(":", 1)[1]}, auth=admin
                )[0] == 200
    try:
        run = json.loads(call(f"{rest}/runs/create", {"experiment_id": experiment}, auth=admin)[1])["run"]["info"]
        version = {"name": model, "source": f"runs:/{run['run_id']}/adapter", "run_id": run["run_id"]}
        assert call(f"{rest}/model-versions/create", version)[0] == 401  # no credentials at all
        assert call(f"{rest}/model-versions/create", version, auth=other)[0] == 403  # a user, not the admin
        assert call(f"{rest}/runs/create", {"experiment_id": experiment}, auth=other)[0] == 403
        # default_permission NO_PERMISSIONS: a user the admin did not grant anything cannot even read
        assert call(f"{rest}/experiments/get?experiment_id={experiment}", auth=other)[0] == 403
        assert call(f"{rest}/registered-models/get?name={model}", auth=other)[0] == 403
        assert call(f"{rest}/model-versions/create", version, auth=admin)[0] == 200  # the server's flow writes
    finally:
        call(f"{rest}/users/delete", {"username": user}, auth=admin, method="DELETE")
        call(f"{rest}/registered-models/delete", {"name": model}, auth=admin, method="DELETE")
        call(f"{rest}/experiments/delete", {"experiment_id": experiment}, auth=admin)


def test_s3_gateway_is_https_trusted_through_the_local_ca_only(served_stack: Stack,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = served_stack.seaweed
    assert store.endpoint.startswith("https://127.0.0.1:")
    env = served_stack.client_env()
    assert env["FEDSE_S3_ENDPOINT"] == store.endpoint and env["AWS_CA_BUNDLE"] == str(store.ca_bundle)
    assert {b["Name"] for b in store.client().list_buckets()["Buckets"]} >= {"fedse", "mlflow", "dvc"}

    def handshake(context: ssl.SSLContext) -> dict:
        with socket.create_connection(("127.0.0.1", store.s3_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.getpeercert()

    cert = handshake(ssl.create_default_context(cafile=str(store.ca_bundle)))
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(ssl.create_default_context(cafile=None))  # the system's authorities do not vouch for it
    import boto3
    from botocore.exceptions import SSLError

    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)  # a client that was not handed the CA
    from botocore.config import Config

    plain = boto3.client("s3", endpoint_url=store.endpoint, region_name="us-east-1", aws_access_key_id="x",
                         aws_secret_access_key="y", config=Config(retries={"max_attempts": 1}))
    with pytest.raises(SSLError, match="certificate verify failed"):
        plain.list_buckets()
    with pytest.raises(urllib.error.URLError):  # plain http on the S3 port gets no S3 answer
        urllib.request.urlopen(f"http://127.0.0.1:{store.s3_port}/", timeout=10)


def test_seaweedfs_internal_ports_refuse_writes_without_jwt_and_grpc_without_a_client_certificate(
        served_stack: Stack) -> None:
    store = served_stack.seaweed
    filer, volume, master = store.ports["filer"], store.ports["volume"], store.ports["master"]
    status, body = call(f"http://127.0.0.1:{filer}/buckets/fedse/planted.txt", {"x": 1}, method="PUT")
    assert status == 401 and b"jwt" in body
    assert call(f"http://127.0.0.1:{filer}/buckets/fedse/")[0] == 401  # reads too
    status, body = call(f"http://127.0.0.1:{master}/dir/assign")
    fid = json.loads(body)["fid"]
    status, body = call(f"http://127.0.0.1:{volume}/{fid}", {"x": 1}, method="PUT")
    assert status == 401 and b"jwt" in body
    assert "planted.txt" not in {o["Key"] for o in store.client().list_objects_v2(Bucket="fedse").get("Contents", [])}

    context = ssl.create_default_context(cafile=str(store.ca_bundle))  # trusts the server, shows no certificate
    context.set_alpn_protocols(["h2"])
    for port in (master + 10000, volume + 10000, filer + 10000):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    tls.recv(1)  # TLS 1.3: the server's "certificate required" alert arrives here


def test_secret_files_are_private_and_up_reused_what_prepare_minted(served_stack: Stack, served_minted) -> None:
    stack, minted = served_stack, served_minted
    assert stat.S_IMODE(os.stat(stack.state).st_mode) == 0o700
    for folder in (stack.seaweed.tls.folder, stack.seaweed.config_dir):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for path in [*stack.secret_files(), stack.mlflow_auth_db]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    local = stack.root / ".dvc" / "config.local"
    assert stat.S_IMODE(os.stat(local).st_mode) == 0o600 and "secret_access_key" in local.read_text()
    assert f"ssl_verify = {stack.seaweed.ca_bundle}" in local.read_text()
    env = stack.env_file.read_text()
    assert stack.secrets()["prefect_auth_string"] in env and "AWS_CA_BUNDLE" in env
    assert digests(stack.secret_files()) == minted  # `up` minted nothing: it used what was there


def test_rotate_is_refused_while_the_stack_is_up(served_stack: Stack, served_minted) -> None:
    stack, minted = served_stack, served_minted
    with pytest.raises(RuntimeError, match="make stop first"):
        stack.rotate()
    assert digests(stack.secret_files()) == minted


def digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def stopped_stack(root: Path) -> Stack:
    params = root / "params.yaml"
    params.write_text("envs: {names: [maze, wordle]}\n")
    return Stack(root=root, extra_env={"FEDSE_PARAMS": str(params)})


def test_secrets_are_minted_private_under_any_umask_reused_and_rotated(tmp_path: Path) -> None:
    stack = stopped_stack(tmp_path)
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        stack.prepare()
    finally:
        os.umask(old)
    first = digests(stack.secret_files())
    assert stat.S_IMODE(os.stat(stack.state).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in stack.secret_files())
    keys = json.loads(stack.seaweed.credentials.read_text())["roles"]
    assert set(keys) >= {"admin", "server", "mlflow", "dvc", "client_maze", "client_wordle"}

    stack.prepare()  # what every `up` does: after a `down`, the same secrets
    assert digests(stack.secret_files()) == first

    from fedse.signing import Keyring

    signing = Keyring(stack.server_keys).fingerprint("server")
    stack.rotate()
    assert Keyring(stack.server_keys).fingerprint("server") != signing
    rotated = digests(stack.secret_files())
    assert all(rotated[p] != first[p] for p in first), [p for p in first if rotated[p] == first[p]]
    new = json.loads(stack.seaweed.credentials.read_text())["roles"]
    assert all(new[r]["secret_key"] != keys[r]["secret_key"] for r in keys)
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in stack.secret_files())


def test_a_new_organisation_gets_keys_without_changing_anyone_elses(tmp_path: Path) -> None:
    stack = stopped_stack(tmp_path)
    stack.prepare()
    before = json.loads(stack.seaweed.credentials.read_text())["roles"]
    (tmp_path / "params.yaml").write_text("envs: {names: [maze, wordle, textcraft]}\n")
    stack.prepare()
    after = json.loads(stack.seaweed.credentials.read_text())["roles"]
    assert {r: after[r] for r in before} == before and "client_textcraft" in after


def test_rotate_changes_the_mlflow_admin_password_in_its_auth_database(tmp_path: Path) -> None:
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    stack = stopped_stack(tmp_path)
    old = stack.prepare()
    auth = SqlAlchemyStore()
    auth.init_db(f"sqlite:///{stack.mlflow_auth_db}")
    auth.create_user(old["mlflow_username"], old["mlflow_password"], is_admin=True)  # as the server did at start
    stack.rotate()
    new = stack.secrets()
    assert new["mlflow_password"] != old["mlflow_password"]
    assert auth.authenticate_user(new["mlflow_username"], new["mlflow_password"])
    assert not auth.authenticate_user(old["mlflow_username"], old["mlflow_password"])
    assert f"admin_password = {new['mlflow_password']}" in stack.mlflow_auth_config.read_text()


def test_an_organisation_gets_the_ca_and_the_https_endpoint_and_no_control_plane_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo

    from flows import orgs

    stack = stopped_stack(tmp_path)
    secrets = stack.prepare()
    for run_seed in ("s0", "s1"):
        (tmp_path / "data" / "seed" / run_seed).mkdir(parents=True)
        (tmp_path / "data" / "seed" / run_seed / "maze.jsonl").write_text("{}\n")
    Repo.init(str(tmp_path), no_scm=True).close()
    started = {}
    monkeypatch.setattr(orgs, "start", lambda root, client, env, log: started.setdefault(client, env) and 0)
    for name, value in stack.client_env().items():  # even from an operator's shell that holds every secret
        monkeypatch.setenv(name, value)
    stack._start_org("maze", stack.seaweed)
    env, home = started["maze"], orgs.folder(stack.orgs_root, "maze")
    settings = yaml.safe_load((home / "org.yaml").read_text())  # what the organisation obeys
    assert settings["store"]["endpoint"] == stack.seaweed.endpoint and settings["store"]["endpoint"].startswith(
        "https://127.0.0.1:")
    ca = Path(settings["ca_bundle"])  # its own copy of the CA, as a remote organisation is handed it
    assert ca.parent == home and ca.read_bytes() == stack.seaweed.ca_bundle.read_bytes()
    assert not [k for k in env if k.startswith(("MLFLOW_", "PREFECT_API_AUTH", "PREFECT_SERVER_API_AUTH"))]
    assert not [k for k, v in env.items() if any(s in v for s in secrets.values() if len(s) > 20)]
    own = json.loads((ca.parent / "s3-credentials.json").read_text())["roles"]
    assert list(own) == ["client_maze"]
