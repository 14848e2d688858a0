"""Attacks on the federation from one organisation's position, against the real stack `make serve` starts.

The stack (flows/stack.py: SeaweedFS over https with per-role keys, Prefect with its auth string, MLflow with
basic auth, two organisations' workers, maze and wordle) runs on free 127.0.0.1 ports. The attacker is
organisation maze, holding exactly what it is given: its org.yaml, its S3 keys (role client_maze), its
Ed25519 key and the server's public key, the store's CA certificate, and the network (every port of the
stack). Its victim is organisation wordle. Each row carries out the attack for real and records what
happened; `blocked` is true only when the attack's effect did not happen (the store refused, the API refused,
the victim's worker or the server refused and nothing changed).

    python bench/attacks.py [--json] [--out reports/security/attacks.json]

Columns: attack, blocked, by (what stopped it), evidence (the line the component answered with). Also
writes reports/security/attacks.md, the same table for people.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedse import audit  # noqa: E402
from fedse.organisation import load  # noqa: E402
from fedse.signing import Keyring, SigningError, sign_doc, verify_doc  # noqa: E402
from fedse.transport import (  # noqa: E402
    S3Spec,
    Transport,
    TransportError,
    TransportSpec,
    client_folder,
    global_folder,
    inbox_key,
    role_credentials,
    s3_client,
)
from flows.stack import Stack  # noqa: E402

EXPERIMENT = "victim-run"
Row = dict[str, Any]


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
            "layers.0.q_proj.lora_B.weight": torch.randn(16, 4, generator=g)}


class World:
    """The running stack seen from each party: the attacker maze, the victim wordle, the server."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.store = stack.seaweed
        self.maze_home, self.wordle_home = stack.orgs_root / "maze", stack.orgs_root / "wordle"
        os.environ["AWS_CA_BUNDLE"] = str(self.store.ca_bundle)  # every party verifies the gateway with the CA
        self.maze = self.org_transport("maze")
        self.wordle = self.org_transport("wordle")
        spec = TransportSpec(backend="s3", keyring=stack.server_keys, max_adapter_bytes=1 << 20,
                             s3=S3Spec(endpoint=self.store.endpoint, bucket="fedse",
                                       credentials=stack.server_credentials))
        self.server = Transport(spec, EXPERIMENT, Path(tempfile.mkdtemp()) / "server-run")
        self.raw_maze = s3_client(self.store.endpoint, "us-east-1",
                                  role_credentials(self.maze_home / "s3-credentials.json", "client_maze"))

    def org_transport(self, client: str) -> Transport:
        settings = load(self.stack.orgs_root / client)
        assert settings.store is not None
        spec = TransportSpec(backend="s3", keyring=settings.path(settings.keys),
                             s3=settings.store.model_copy(update={"credentials": settings.path(
                                 settings.store.credentials)}))
        return Transport(spec, EXPERIMENT, settings.path(settings.runs) / EXPERIMENT)

    def victim_round(self) -> None:
        """What honest parties did before the attacks: the server published round 0's global adapter and
        asked both clients for round 1; wordle and maze uploaded round 0."""
        self.server.publish_global(0, adapter(0), {"method": "fedse"})
        self.wordle.upload(0, "wordle", adapter(1), {})
        self.maze.upload(0, "maze", adapter(2), {})

    def put(self, key: str, body: bytes = b"x") -> str:
        """maze writes a key with its own S3 keys; returns what the store said."""
        try:
            self.raw_maze.put_object(Bucket="fedse", Key=key, Body=body)
            return "stored"
        except Exception as exc:
            return _code(exc)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or type(exc).__name__


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
         ) -> str:
    """An unauthenticated HTTP call; returns the status (or why there was none)."""
    import ssl

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer ({type(getattr(exc, 'reason', exc)).__name__})"


def refused(fn: Callable[[], Any]) -> str | None:
    """The one-line refusal `fn` raised (None: it went through)."""
    try:
        fn()
    except (TransportError, SigningError, ValueError) as exc:
        return str(exc).splitlines()[0][:240]
    return None


def row(attack: str, blocked: bool, by: str, evidence: str) -> Row:
    return {"attack": attack, "blocked": bool(blocked), "by": by, "evidence": evidence}


# ------------------------------------------------------------------------------------------------ the attacks
def run_another_orgs_round(w: World) -> Row:
    """maze asks wordle to run a round (as the server would), through the store or the server's Prefect."""
    asked = {"experiment": EXPERIMENT, "round": 1, "client": "wordle"}
    store = w.put(inbox_key("wordle"), json.dumps(asked).encode())
    prefect = http(f"{w.stack.prefect_api}/deployments/filter", "POST", b"{}", {"Content-Type": "application/json"})
    return row("run another organisation's round (its inbox; the server's Prefect API)",
               store == "AccessDenied" and prefect == "HTTP 401",
               "store policy (inbox writable by the server only); Prefect auth string",
               f"PUT {inbox_key('wordle')}: {store}; POST /api/deployments/filter without auth: {prefect}")


def redirect_upload(w: World) -> Row:
    """A round request (signed by the real server, the worst case) asking wordle to upload to another
    endpoint; wordle's running worker must refuse it and record the refusal."""
    doc = {"experiment": EXPERIMENT, "round": 5, "client": "wordle", "profile": None, "issued": time.time(),
           "terms": {"transport.s3.endpoint": "https://attacker.example:8333"}}
    w.server.put_request(5, "wordle", doc)
    log = w.wordle_home / "runs" / "inbox" / "egress" / "inbox" / "client_wordle.jsonl"
    seen = _wait(lambda: log.exists() and "attacker.example" in log.read_text())
    line = [json.loads(x) for x in log.read_text().splitlines()][-1] if seen else {}
    uploads = [k for k in _keys(w, "client_wordle/") if "/round_5/" in k]
    return row("redirect its upload (a request naming another store endpoint)", seen and not uploads,
               "the worker's typed round request (terms allow-list; the store comes from org.yaml only)",
               f"wordle's egress log: {line.get('reason', 'no refusal recorded')}")


def choose_start_adapter(w: World) -> Row:
    """maze plants the global adapter wordle starts round 1 from."""
    store = w.put(f"{global_folder(EXPERIMENT, 0)}/adapter.safetensors")
    forged = sign_doc(Keyring(w.maze_home / "keys"), "client_maze", {"experiment": EXPERIMENT, "round": 0})
    why = refused(lambda: verify_doc(Keyring(w.wordle_home / "keys"), forged, "server"))
    start = refused(lambda: w.wordle.fetch_global(0, "wordle"))
    return row("choose its start adapter (plant the global adapter)",
               store == "AccessDenied" and why is not None and start is None,
               "store policy (server/ writable by the server only); clients verify the broadcast's signature",
               f"PUT server/…/global/adapter.safetensors: {store}; a maze-signed global at wordle: {why}")


def read_logs_parameters_manifests(w: World) -> Row:
    """maze reads wordle's manifest, the server's run parameters and logs, the registry."""
    manifest = f"{client_folder(EXPERIMENT, 0, 'wordle')}/adapter.json"
    try:
        w.raw_maze.get_object(Bucket="fedse", Key=manifest)
        store = "read"
    except Exception as exc:
        store = _code(exc)
    try:
        w.raw_maze.list_objects_v2(Bucket="fedse", Prefix="client_wordle/")
        listing = "listed"
    except Exception as exc:
        listing = _code(exc)
    prefect = http(f"{w.stack.prefect_api}/flow_runs/filter", "POST", b"{}", {"Content-Type": "application/json"})
    logs = http(f"{w.stack.prefect_api}/logs/filter", "POST", b"{}", {"Content-Type": "application/json"})
    mlflow = http(f"{w.stack.mlflow_uri}/api/2.0/mlflow/runs/search", "POST", b"{}",
                  {"Content-Type": "application/json"})
    ok = store == "AccessDenied" and listing == "AccessDenied" and {prefect, logs, mlflow} == {"HTTP 401"}
    return row("read its logs, parameters or manifests", ok,
               "store policy (a client reads server/ only); Prefect auth string; MLflow basic auth; wordle's "
               "own logs stay in its own ephemeral Prefect",
               f"GET {manifest}: {store}; LIST client_wordle/: {listing}; Prefect flow_runs {prefect}, logs "
               f"{logs}; MLflow runs/search {mlflow}")


def forge_manifest(w: World) -> Row:
    """maze writes a manifest as wordle's, or signs one claiming wordle's name in its own folder."""
    store = w.put(f"{client_folder(EXPERIMENT, 1, 'wordle')}/adapter.json", b"{}")
    w.maze._send("client_maze", 1, client_folder(EXPERIMENT, 1, "maze"), adapter(3), {}, None)
    doc = w.maze._sign("client_maze", {"experiment": EXPERIMENT, "round": 1, "sender": "client_wordle",
                                       "key": f"{client_folder(EXPERIMENT, 1, 'maze')}/adapter.safetensors",
                                       "sha256": "0" * 64, "bytes": 1, "dtype": "fp32", "tensors": {},
                                       "metadata": {}, "format": "fedse-adapter/1", "request": None})
    w.raw_maze.put_object(Bucket="fedse", Key=f"{client_folder(EXPERIMENT, 1, 'maze')}/adapter.json",
                          Body=json.dumps(doc).encode())
    as_wordle = refused(lambda: w.server.fetch_client(1, "wordle"))
    as_maze = refused(lambda: w.server.fetch_client(1, "maze"))
    return row("forge a manifest (as wordle's, or naming wordle in its own)",
               store == "AccessDenied" and as_wordle is not None and as_maze is not None,
               "store policy; signed manifests checked against sender, round and key",
               f"PUT client_wordle/…/adapter.json: {store}; the server reading maze's: {as_maze}")


def overwrite_global_or_upload(w: World) -> Row:
    keys = [f"{global_folder(EXPERIMENT, 0)}/adapter.json",
            f"{client_folder(EXPERIMENT, 0, 'wordle')}/adapter.safetensors"]
    before = w.server.fetch_client(0, "wordle")[1].sha256
    said = []
    for key in keys:
        said.append(f"PUT {key}: {w.put(key)}")
        try:
            w.raw_maze.delete_object(Bucket="fedse", Key=key)
            said.append(f"DELETE {key}: deleted")
        except Exception as exc:
            said.append(f"DELETE {key}: {_code(exc)}")
    after = w.server.fetch_client(0, "wordle")[1].sha256
    ok = all(s.endswith("AccessDenied") for s in said) and before == after and w.wordle.fetch_global(0, "wordle")
    return row("overwrite or delete the global adapter or another upload", bool(ok),
               "store policy (writer-first layout)", "; ".join(said))


def stray_key(w: World) -> Row:
    keys = ["stray.txt", f"{EXPERIMENT}/round_0/global/adapter.json", "client_maze-2/x", "client_wordlex/x",
            "server/inbox/client_maze/request.json"]
    said = {k: w.put(k) for k in keys}
    return row("write a stray key (outside its own folder)", set(said.values()) == {"AccessDenied"},
               "store policy: each role writes <role>/* only, so '*' matching '/' stays inside its folder",
               "; ".join(f"{k}: {v}" for k, v in said.items()))


def replay_old_adapter(w: World) -> Row:
    """maze copies its round-0 upload (tensors and signed manifest) into its round-2 folder."""
    for name in ("adapter.safetensors", "adapter.json"):
        body = w.server._backend("server").get(f"{client_folder(EXPERIMENT, 0, 'maze')}/{name}", 1 << 20)
        assert body is not None
        w.raw_maze.put_object(Bucket="fedse", Key=f"{client_folder(EXPERIMENT, 2, 'maze')}/{name}", Body=body)
    why = refused(lambda: w.server.fetch_client(2, "maze"))
    return row("replay an old adapter", why is not None, "the signed manifest names its round",
               f"server reading maze round 2: {why}")


def oversize(w: World) -> Row:
    big = {"w.lora_A.weight": torch.zeros(700, 1000)}  # 2.8 MB; the server reads at most 1 MiB here
    maze = Transport(w.maze.spec.model_copy(update={"max_adapter_bytes": 1 << 30}), EXPERIMENT, w.maze.local_dir)
    maze.keyring = w.maze.keyring
    maze.upload(3, "maze", big, {})
    why = refused(lambda: w.server.fetch_client(3, "maze"))
    w.raw_maze.put_object(Bucket="fedse", Key=f"{client_folder(EXPERIMENT, 4, 'maze')}/adapter.json",
                          Body=b" " * (2 << 20))
    manifest = refused(lambda: w.server.fetch_client(4, "maze"))
    return row("upload an oversize object (adapter, manifest)", why is not None and manifest is not None,
               "size caps checked before reading (transport.max_adapter_bytes, 1 MiB for a manifest)",
               f"adapter: {why}; manifest: {manifest}")


def path_traversal(w: World) -> Row:
    """A key that climbs out of maze's folder into wordle's, through the store and through fedse."""
    key = f"client_maze/../{client_folder(EXPERIMENT, 0, 'wordle')}/adapter.json"
    store = w.put(key, b"{}")
    intact = refused(lambda: w.server.fetch_client(0, "wordle")) is None
    library = refused(lambda: w.maze.upload(0, "../client_wordle", adapter(5), {}))
    name = refused(lambda: Transport(TransportSpec(), "../victim", Path(tempfile.mkdtemp())))
    return row("a path-traversing name", (store != "stored" or intact) and library is not None and name is not None,
               "the store's policy (or a literal key); fedse refuses '..' in keys and names",
               f"PUT {key}: {store}, wordle's upload intact: {intact}; fedse: {library}; {name}")


def no_credentials(w: World) -> Row:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    anonymous = boto3.client("s3", endpoint_url=w.store.endpoint, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
    try:
        anonymous.get_object(Bucket="fedse", Key=f"{global_folder(EXPERIMENT, 0)}/adapter.json")
        s3 = "read"
    except Exception as exc:
        s3 = _code(exc)
    plain = http(w.store.endpoint.replace("https://", "http://") + "/fedse")
    calls = {"Prefect /api/flows/filter": http(f"{w.stack.prefect_api}/flows/filter", "POST", b"{}",
                                                {"Content-Type": "application/json"}),
             "MLflow registered-models/search":
                 http(f"{w.stack.mlflow_uri}/api/2.0/mlflow/registered-models/search"),
             "S3 anonymous GET": s3, "S3 over plain http": plain}
    ports = w.store.ports
    calls["filer HTTP write"] = http(f"http://127.0.0.1:{ports['filer']}/fedse-probe.txt", "POST", b"x")
    calls["volume HTTP write"] = http(f"http://127.0.0.1:{ports['volume']}/1,01637037d6", "POST", b"x")
    ok = (calls["Prefect /api/flows/filter"] == calls["MLflow registered-models/search"] == "HTTP 401"
          and s3 == "AccessDenied" and not plain.startswith("HTTP 2")
          and not calls["filer HTTP write"].startswith("HTTP 2")
          and not calls["volume HTTP write"].startswith("HTTP 2"))
    return row("call each API without credentials", ok,
               "Prefect auth string; MLflow basic auth; S3 signatures over TLS; SeaweedFS JWT on filer/volume",
               "; ".join(f"{k}: {v}" for k, v in calls.items()))


def server_as_organisation(w: World) -> Row:
    """The server (or whoever holds its files) tries to act as wordle: its keys are its own role only."""
    creds = json.loads(Path(w.stack.server_credentials).read_text())["roles"]
    sign = refused(lambda: w.server.upload(6, "wordle", adapter(6), {}))
    return row("the server acting as an organisation", list(creds) == ["server"] and sign is not None,
               "least privilege: the server holds its own S3 role and Ed25519 key only",
               f"server's S3 roles: {list(creds)}; signing as client_wordle: {sign}")


def hide_an_upload(w: World) -> Row:
    """Deleting a line of an organisation's egress log (to hide where an upload went) shows."""
    from fedse.audit import record

    folder = audit.egress_dir(None, w.maze_home / "runs" / EXPERIMENT)
    for round in (7, 8):  # what maze's worker writes for every upload (flows/client.py via send_update)
        record(folder, w.maze.upload(round, "maze", adapter(round), {}), w.maze.destination())
    log = audit.log_path(folder, EXPERIMENT, "client_maze")
    if not log.exists():
        return row("hide an upload in the egress log", False, "hash chain", f"{log}: no egress log written")
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[1:]) + "\n")
    problems = audit.verify(log)
    return row("hide an upload in the egress log", bool(problems), "each line carries the hash of the line before",
               problems[0] if problems else "chain reads intact")


ATTACKS = [run_another_orgs_round, redirect_upload, choose_start_adapter, read_logs_parameters_manifests,
           forge_manifest, overwrite_global_or_upload, stray_key, replay_old_adapter, oversize, path_traversal,
           no_credentials, server_as_organisation, hide_an_upload]


def _keys(w: World, prefix: str) -> list[str]:
    return w.server._backend("server").keys(prefix)


def _wait(check: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def run_all(stack: Stack) -> list[Row]:
    """Every attack against a running stack whose organisations include maze and wordle (tests reuse theirs)."""
    world = World(stack)
    world.victim_round()
    rows: list[Row] = []
    for attack in ATTACKS:
        try:
            rows.append(attack(world))
        except Exception as exc:  # an attack that crashed the harness is reported, not hidden
            rows.append(row(attack.__name__.replace("_", " "), False, "harness error",
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        print(f"{'blocked' if rows[-1]['blocked'] else 'NOT BLOCKED'}: {rows[-1]['attack']}", file=sys.stderr)
    return rows


def seeds(root: Path, clients: list[str]) -> None:
    from typer.testing import CliRunner

    from fedse.cli import app

    for client in clients:
        done = CliRunner().invoke(app, ["seed", "--out", str(root / "data" / "seed"), "--seed", "0", "--env",
                                        client, "--count", "2"])
        if done.exit_code != 0:
            raise RuntimeError(done.output)


def markdown(rows: list[Row]) -> str:
    lines = ["| attack | blocked | by | evidence |", "|---|---|---|---|"]
    lines += [f"| {r['attack']} | {'yes' if r['blocked'] else '**no**'} | {r['by']} | "
              f"{r['evidence'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "security" / "attacks.json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fedse-attacks-"))
    from dvc.repo import Repo

    Repo.init(str(root), no_scm=True).close()
    clients = ["maze", "wordle"]
    seeds(root, clients)
    started = time.monotonic()
    stack = Stack.on_free_ports(root, orgs=clients)
    stack.up()
    try:
        rows = run_all(stack)
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    doc = {"stack": "flows.stack.Stack.on_free_ports (what make serve starts), organisations maze and wordle",
           "attacker": "organisation maze: its org.yaml, S3 keys, Ed25519 key, the store's CA, the network",
           "blocked": sum(r["blocked"] for r in rows), "attacks": len(rows),
           "seconds": round(time.monotonic() - started), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"{doc['blocked']} of {doc['attacks']} attacks blocked "
                                           f"(`python bench/attacks.py`).\n\n" + markdown(rows))
    print(json.dumps(doc, indent=1) if args.json else markdown(rows))
    return 0 if doc["blocked"] == doc["attacks"] else 1


if __name__ == "__main__":
    sys.exit(main())
