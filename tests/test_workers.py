"""Integration: `orchestration.mode: workers` through real processes on 127.0.0.1 — SeaweedFS, a Prefect server,
an MLflow server, the served round loop, and three client organisations, each a worker process in its own
directory (`.orgs/<client>/`) with its own seeds, keys and DVC repository (flows/orgs.py, flows/client.py).

The server's run folder holds no buffer or trajectory; each organisation holds only its own client's data; a
canary planted in one organisation's seeds is found nowhere outside it (store, MLflow, the Prefect database,
the server's run folder, the other organisations); the registry names each client's buffer version as its
manifest reported it, and that version is in the organisation's own DVC cache. Killing one organisation's
worker mid-round is survived by the quorum: the round aggregates the other two, and names the missing one.
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
def stack(tmp_path_factory: pytest.TempPathFactory, canary: str) -> Iterator[Stack]:
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
    running = Stack.on_free_ports(root, orgs=CLIENTS, extra_env={"FEDSE_PARAMS": str(serving)})
    running.up()
    try:
        yield running
    finally:
        running.down()
        assert not (root / ".serve" / "pids.json").exists()


def sets(timeout: int, extra: list[str]) -> list[str]:
    return [*extra, f"federation.clients=[{', '.join(CLIENTS)}]", "federation.seeds_per_client=4",
            "federation.explore_episodes=2", "federation.eval_episodes=2", "orchestration.mode=workers",
            f"federation.client_timeout={timeout}"]


def serve_run(stack: Stack, params: Path, out: Path, seed: int, timeout: int, wait: bool = True,
              extra: list[str] | None = None):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}):
        return run_deployment("fedse/round-loop", timeout=900 if wait else 0, parameters={
            "method": "fedse", "profile": "smoke", "seed": seed, "params": str(params), "out": str(out),
            "sets": sets(timeout, extra or [])})


def files_with(root: Path, needle: bytes, skip: Path | None = None) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (skip is None or skip not in p.parents)
            and needle in p.read_bytes()]


def test_clients_run_on_their_own_workers_and_only_adapters_and_manifests_cross(
        stack: Stack, micro_params: Path, tmp_path: Path, canary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from tasks.version_buffer import in_cache

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    out = tmp_path / "server"
    run = serve_run(stack, micro_params, out, seed=3, timeout=600)
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
    assert files_with(stack.root / ".prefect", needle) == []  # the Prefect database: runs, params, artifacts
    assert files_with(stack.root / "mlflow", needle) == []
    assert files_with(stack.root / ".seaweedfs", needle) == []  # every bucket's data
    for other in ("textcraft", "wordle"):
        assert files_with(stack.orgs_root / other, needle) == []

    # provenance: each registered global adapter names the buffer versions its clients' manifests reported
    client = MlflowClient(stack.mlflow_uri)
    versions = [v for v in client.search_model_versions("name='fedse-global'") if v.tags.get("seed") == "3"]
    assert len(versions) == 2
    for v in versions:
        record = doc["rounds"][int(v.tags["round"])]
        assert {c: v.tags[f"buffer.{c}"] for c in CLIENTS} == record["buffers_dvc"]


def test_a_worker_killed_mid_round_is_missing_and_the_quorum_carries_the_round(
        stack: Stack, micro_params: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    out = tmp_path / "server"
    started = serve_run(stack, micro_params, out, seed=4, timeout=90, wait=False, extra=["federation.rounds=1"])
    pids = json.loads((stack.state / "pids.json").read_text())
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as api:
        deadline = time.monotonic() + 600
        killed = False
        while time.monotonic() < deadline:
            parent = api.read_flow_run(started.id)
            if not killed:
                children = api.read_flow_runs(flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=["wordle-round-0"])))
                if any(c.state is not None and c.state.is_running() for c in children):
                    os.killpg(pids["org-wordle"], signal.SIGKILL)  # the worker and the run it executes
                    killed = True
            if parent.state is not None and parent.state.is_final():
                break
            time.sleep(1)
    assert killed, "wordle's round-0 run never started"
    assert parent.state.is_completed(), parent.state
    doc = json.loads((out / "metrics.json").read_text())
    first = doc["rounds"][0]
    assert sorted(k for k, c in first["clients"].items() if "failed" not in c) == ["maze", "textcraft"]
    assert first["clients"]["wordle"]["failed"].startswith("TimeoutError: no upload within")
    assert first["aggregation"]["missing"]["wordle"].startswith("TimeoutError")
    assert doc["complete"] and "global" in first
