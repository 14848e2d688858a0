"""Integration: `orchestration.mode: workers` through real processes on 127.0.0.1 — SeaweedFS over https, a
Prefect server and an MLflow server behind their credentials, the served round loop, and three client
organisations, each a worker process in its own directory (`.orgs/<client>/`) with its own org.yaml, seeds,
S3 keys, Ed25519 key, DVC repository and its own ephemeral Prefect (flows/orgs.py, flows/client.py).

The server and the organisations share nothing but the store: signed round requests go in, signed uploads and
statuses come back. The server's run folder holds no buffer or trajectory; each organisation holds only its own
client's data; a canary planted in one organisation's seeds is found nowhere outside it (store, MLflow, the
server's Prefect database, the server's run folder, the other organisations); the registry names each client's
buffer version as its status reported it, and that version is in the organisation's own DVC cache; the global
adapters are bit for bit those of the same run in-process. Killing one organisation's worker mid-round is
survived by the quorum: the round aggregates the other two, and names the missing one.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedse.cli import app
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl
from flows.stack import Stack

CLIENTS = ["textcraft", "maze", "wordle"]
RUN_SEEDS = (3, 4)



@pytest.fixture(scope="module")
def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory, micro_spec) -> Path:
    """The repository's params on the session's micro model: the server's and every organisation's own."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    data = yaml.safe_load(Path("params.yaml").read_text())
    data["model"] = json.loads(micro_spec.model_dump_json())
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, canary: str, params: Path) -> Iterator[Stack]:
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("orgs-stack")
    Repo.init(str(root), no_scm=True).close()  # the stack makes bucket dvc its folder's DVC remote
    seeds = root / "data" / "seed"
    for run_seed in RUN_SEEDS:  # the runs below are seeds 3 and 4; each organisation gets every draw
        for env in CLIENTS:
            done = CliRunner().invoke(app, ["seed", "--out", str(seeds), "--seed", str(run_seed), "--env", env,
                                            "--count", "4"])
            assert done.exit_code == 0, done.output
        path = seeds / f"s{run_seed}" / "maze.jsonl"
        records = list(read_jsonl(path))
        first = records[0].model_dump()
        first["turns"][0]["observation"] += f" {canary}"
        write_jsonl(path, [Trajectory.model_validate(first | {"content_hash": ""}), *records[1:]])
    serving = root / "serve-params.yaml"
    serving.write_text("orchestration: {task_runner: thread, workers: 2}\n")
    running = Stack.on_free_ports(root, orgs=CLIENTS, extra_env={"FEDSE_PARAMS": str(serving)}, org_params=params)
    running.up()
    try:
        yield running
    finally:
        running.down()
        assert not (root / ".serve" / "pids.json").exists()


def sets(timeout: int, extra: list[str], mode: str = "workers") -> list[str]:
    return [*extra, f"federation.clients=[{', '.join(CLIENTS)}]", "federation.seeds_per_client=4",
            "federation.explore_episodes=2", "federation.eval_episodes=2", f"orchestration.mode={mode}",
            f"federation.client_timeout={timeout}"]


def serve_run(stack: Stack, params: Path, out: Path, seed: int, timeout: int, wait: bool = True,
              extra: list[str] | None = None, mode: str = "workers"):
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    with temporary_settings(updates=stack.prefect_settings()):
        return run_deployment("fedse/round-loop", timeout=900 if wait else 0, parameters={
            "method": "fedse", "profile": "smoke", "seed": seed, "params": str(params), "out": str(out),
            "sets": sets(timeout, extra or [], mode)})


def files_with(root: Path, needle: bytes, skip: Path | None = None) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (skip is None or skip not in p.parents)
            and needle in p.read_bytes()]


def test_clients_run_on_their_own_workers_and_only_adapters_and_statuses_cross(
        stack: Stack, params: Path, tmp_path: Path, canary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from tasks.version_buffer import in_cache

    for key, value in stack.mlflow_env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "server"
    run = serve_run(stack, params, out, seed=3, timeout=600)
    assert run.state is not None and run.state.is_completed(), run.state
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["complete"] and len(doc["rounds"]) == 2
    experiment = doc["exchange"]["experiment"]
    for record in doc["rounds"]:
        assert sorted(record["clients"]) == sorted(CLIENTS)
        assert all(c["bytes_sent"] > 0 and "failed" not in c for c in record["clients"].values())
        assert sorted(record["buffers_dvc"]) == sorted(CLIENTS)

    # the server's run folder: adapters, metrics, markers; no buffer, no trajectory
    assert not (out / "buffers").exists() or not any((out / "buffers").rglob("*.jsonl"))
    assert [p for p in out.rglob("*.jsonl")] == []
    # each organisation holds its own client's seeds, buffer and egress log, and nothing of the others'
    for client in CLIENTS:
        home = stack.orgs_root / client
        assert sorted(str(p.relative_to(home / "data" / "seed")) for p in (home / "data" / "seed").rglob("*")
                      if p.is_file()) == [f"s{k}/{client}.jsonl" for k in RUN_SEEDS]
        assert sorted(p.name for p in (home / "runs" / experiment / "buffers").iterdir()) == [client]
        assert sorted(p.name for p in (home / "runs" / experiment / "egress" / experiment).iterdir()) == \
            [f"client_{client}.jsonl"]
        keys = json.loads((home / "s3-credentials.json").read_text())["roles"]
        assert list(keys) == [f"client_{client}"]
        for record in doc["rounds"]:  # the version the registry names is in the org's own cache
            assert in_cache(str(home), record["buffers_dvc"][client])
            assert not in_cache(str(stack.orgs_root / ("wordle" if client != "wordle" else "maze")),
                                record["buffers_dvc"][client])

    # what left each client, from the organisations' own egress logs gathered by `fedse audit --dir .orgs`
    audit = CliRunner().invoke(app, ["audit", "--dir", str(stack.orgs_root), "-e", experiment, "--json"])
    assert audit.exit_code == 0, audit.output
    assert [(e["round"], e["sender"]) for e in json.loads(audit.stdout)] == \
        [(r, f"client_{c}") for r in (0, 1) for c in sorted(CLIENTS)]

    # the canary planted in maze's seeds: in maze's organisation only
    needle = canary.encode()
    assert files_with(stack.orgs_root / "maze", needle)
    assert files_with(out, needle) == []
    assert files_with(stack.root / ".prefect", needle) == []  # the server's Prefect: runs, params, artifacts
    assert files_with(stack.root / "mlflow", needle) == []
    assert files_with(stack.root / ".seaweedfs", needle) == []  # every bucket's data
    for other in ("textcraft", "wordle"):
        assert files_with(stack.orgs_root / other, needle) == []

    # the server held its own role only; every organisation's egress log chain is intact
    assert list(json.loads(stack.server_credentials.read_text())["roles"]) == ["server"]
    verified = CliRunner().invoke(app, ["audit", "--dir", str(stack.orgs_root), "-e", experiment, "--verify"])
    assert verified.exit_code == 0 and "chain intact" in verified.output

    # provenance: each registered global adapter names the buffer versions its clients' statuses reported
    client = MlflowClient(stack.mlflow_uri)
    versions = [v for v in client.search_model_versions("name='fedse-global'") if v.tags.get("seed") == "3"]
    assert len(versions) == 2
    for v in versions:
        record = doc["rounds"][int(v.tags["round"])]
        assert {c: v.tags[f"buffer.{c}"] for c in CLIENTS} == record["buffers_dvc"]

    # then the same run in-process (the round loop runs every client itself) publishes the same global adapters
    inproc = tmp_path / "inprocess"
    done = serve_run(stack, params, inproc, seed=3, timeout=600, mode="inprocess")
    assert done.state is not None and done.state.is_completed(), done.state
    same = json.loads((inproc / "metrics.json").read_text())
    assert [r["global"]["sha256"] for r in same["rounds"]] == [r["global"]["sha256"] for r in doc["rounds"]]


def test_a_worker_killed_mid_round_is_missing_and_the_quorum_carries_the_round(
        stack: Stack, params: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in stack.mlflow_env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "server"
    runs = stack.orgs_root / "textcraft" / "runs"  # (wordle's worker stays up for the attacks below)
    before = set(runs.iterdir()) if runs.exists() else set()
    started = serve_run(stack, params, out, seed=4, timeout=90, wait=False, extra=["federation.rounds=1"])
    pids = json.loads((stack.state / "pids.json").read_text())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # textcraft's worker took the request: its round's folder appears
        fresh = [p for p in runs.iterdir() if p not in before and p.name != "inbox"] if runs.exists() else []
        if fresh:
            os.killpg(pids["org-textcraft"], signal.SIGKILL)  # the worker and the round it executes
            break
        time.sleep(0.5)
    assert fresh, "textcraft's worker never started its round"
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    with temporary_settings(updates=stack.prefect_settings()), get_client(sync_client=True) as api:
        while time.monotonic() < deadline:
            parent = api.read_flow_run(started.id)
            if parent.state is not None and parent.state.is_final():
                break
            time.sleep(1)
    assert parent.state.is_completed(), parent.state
    doc = json.loads((out / "metrics.json").read_text())
    first = doc["rounds"][0]
    assert sorted(k for k, c in first["clients"].items() if "failed" not in c) == ["maze", "wordle"]
    assert first["clients"]["textcraft"]["failed"].startswith("TimeoutError: no answer within")
    assert first["aggregation"]["missing"]["textcraft"].startswith("TimeoutError")
    assert doc["complete"] and "global" in first


def test_every_attack_from_an_organisations_position_is_blocked(stack: Stack,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/attacks.py's table against this module's stack (last: it leaves requests in the inboxes)."""
    import importlib.util

    monkeypatch.setenv("AWS_CA_BUNDLE", str(stack.seaweed.ca_bundle))  # restored afterwards

    spec = importlib.util.spec_from_file_location("attacks", Path(__file__).parents[1] / "bench" / "attacks.py")
    attacks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attacks)
    rows = attacks.run_all(stack)
    assert len(rows) == len(attacks.ATTACKS) >= 12
    assert [r["attack"] for r in rows if not r["blocked"]] == [], rows
    assert all(r["evidence"] and "\n" not in r["evidence"] for r in rows)
