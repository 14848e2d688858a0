"""Integration: the served stack (real Prefect server, real MLflow server, the served deployment) on
127.0.0.1 with free ports, a smoke run through `fedse/round-loop`, then `fedse compare`; stopped afterwards."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse.cli import app
from flows.stack import Stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("stack")
    Repo.init(str(root), no_scm=True).close()  # the served deployment versions buffers in its folder's DVC repo
    running = Stack(root=root, prefect_port=free_port(), mlflow_port=free_port(),
                    extra_env={"OMP_NUM_THREADS": "1"})
    running.up()
    try:
        yield running
    finally:
        stopped = running.down()
        assert set(stopped) == {"prefect", "mlflow", "deployment"}
        assert not (root / ".serve" / "pids.json").exists()


def test_deployment_run_completes_and_registers_versions(stack: Stack, micro_params: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    seeds = tmp_path / "seeds"
    runner = CliRunner()
    assert runner.invoke(app, ["seed", "--out", str(seeds), "--env", "maze", "--count", "4"]).exit_code == 0
    from prefect.deployments import run_deployment

    # Prefect reads its settings into a context once per process: set the API there, not only in os.environ
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}):
        flow_run = run_deployment("fedse/round-loop", timeout=600, parameters={
            "method": "fedse", "profile": "smoke", "seed": 2, "params": str(micro_params),
            "out": str(tmp_path / "run"),
            "sets": ["federation.clients=[maze]", f"seed_data.dir={seeds}", "federation.seeds_per_client=4",
                     "federation.explore_episodes=2", "federation.eval_episodes=2"]})
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["complete"] and len(doc["rounds"]) == 2

    result = runner.invoke(app, ["compare", "--json", "--tracking-uri", stack.mlflow_uri])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout) if r["seed"] == 2]
    assert [r["round"] for r in rows] == [0, 1] and all(r["method"] == "fedse" for r in rows)
    assert {r["adapter_sha256"] for r in rows} == {r["global"]["sha256"] for r in doc["rounds"]}
    assert sum("champion" in r["aliases"] for r in json.loads(result.stdout)) == 1
    from tasks.version_buffer import in_cache

    assert all(set(r["buffers"]) == {"maze"} and in_cache(str(stack.root), r["buffers"]["maze"]) for r in rows)
