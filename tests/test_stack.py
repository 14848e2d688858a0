"""Integration: the served stack (real SeaweedFS S3 server over https, real Prefect server behind its auth
string, real MLflow server with basic auth storing artifacts in S3, the served deployment) on 127.0.0.1 with
free ports, shared with tests/test_control_plane.py (fixture `served_stack`, conftest); a 2-round smoke run
through `fedse/round-loop` with the S3 transport, then `fedse compare` and `fedse audit`; the bucket holds
adapters only, a client cannot overwrite another's adapter or the global one, a canary planted in a client's
buffer is found nowhere in the store or MLflow, buffer versions go to the DVC remote and back. The tests are
clients like the operator's shell: the credentials come from the stack (`prefect_settings`, `mlflow_env`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse.cli import app
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl
from flows.stack import Stack


@pytest.fixture()
def stack(served_stack: Stack) -> Stack:
    return served_stack


def as_operator(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process becomes an MLflow client of the stack (its URI and the admin's credentials)."""
    for name, value in stack.mlflow_env().items():
        monkeypatch.setenv(name, value)


def plant_canary(seeds: Path, env: str) -> str:
    """Rewrite the env's seed file with a canary string in its first trajectory; returns the canary."""
    canary = f"CANARY-{uuid.uuid4().hex}"
    records = list(read_jsonl(seeds / f"{env}.jsonl"))
    first = records[0].model_dump()
    first["turns"][0]["observation"] += f" {canary}"
    write_jsonl(seeds / f"{env}.jsonl", [Trajectory.model_validate(first | {"content_hash": ""}), *records[1:]])
    return canary


def objects(stack: Stack, bucket: str) -> dict[str, bytes]:
    s3 = stack.seaweed.client()
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            found[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return found


def test_deployment_run_exchanges_through_s3_and_registers_versions(stack: Stack, micro_params: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    as_operator(stack, monkeypatch)
    seeds = tmp_path / "seeds"
    runner = CliRunner()
    for env in ("maze", "wordle"):  # run seed 2's draw: the run below is seed 2
        assert runner.invoke(app, ["seed", "--out", str(seeds), "--seed", "2", "--env", env, "--count", "4"]
                             ).exit_code == 0
    canary = plant_canary(seeds / "s2", "maze")
    egress = tmp_path / "egress"

    # Prefect reads its settings into a context once per process: set the API and its auth string there
    with temporary_settings(updates=stack.prefect_settings()):
        flow_run = run_deployment("fedse/round-loop", timeout=600, parameters={  # transport: the deployment's s3
            "method": "fedse", "profile": "smoke", "seed": 2, "params": str(micro_params),
            "out": str(tmp_path / "run"),
            "sets": ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=4",
                     "federation.explore_episodes=2", "federation.eval_episodes=2", f"transport.audit_dir={egress}"]})
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["complete"] and len(doc["rounds"]) == 2
    experiment = doc["exchange"]["experiment"]
    assert doc["exchange"] == {"backend": "s3", "dtype": "fp32", "experiment": experiment,
                               "uri": "s3://fedse/"}
    assert all(c["bytes_sent"] > 0 for r in doc["rounds"] for c in r["clients"].values())

    # the exchange bucket holds adapters (tensors + manifest) only, laid out per round and sender
    exchange = objects(stack, "fedse")
    # writer first (fedse/transport.py): each client's uploads under its own folder, the server's under server/
    layout = re.compile(rf"(client_maze|client_wordle|server)/{experiment}/round_[01]/(global/)?"
                        r"adapter\.(json|safetensors)")
    assert len(exchange) == 12 and all(layout.fullmatch(k) for k in exchange)
    for r, record in enumerate(doc["rounds"]):
        for client, stats in record["clients"].items():
            manifest = json.loads(exchange[f"client_{client}/{experiment}/round_{r}/adapter.json"])
            assert manifest["sha256"] == stats["upload_sha256"] and manifest["metadata"] == {}
    # MLflow keeps its artifacts in bucket mlflow (through the server), the registered adapters among them
    artifacts = objects(stack, "mlflow")
    assert artifacts and all(k.startswith("artifacts/") for k in artifacts)
    assert sum(k.endswith("adapter/adapter_model.safetensors") for k in artifacts) == 2
    assert any(k.endswith("/metrics.json") for k in artifacts)

    # the canary was in maze's buffer, and is nowhere in the store (any bucket) or MLflow
    buffer = b"".join(p.read_bytes() for p in (tmp_path / "run" / "buffers" / "maze").rglob("*.jsonl"))
    assert canary.encode() in buffer
    stored = {f"s3://{b}/{k}": v for b in ("fedse", "mlflow", "dvc") for k, v in objects(stack, b).items()}
    mlflow_files = [p for p in (stack.root / "mlflow").rglob("*") if p.is_file()]
    assert [k for k, v in stored.items() if canary.encode() in v] == []
    assert [p for p in mlflow_files if canary.encode() in p.read_bytes()] == []

    # isolation on the served store: client maze cannot overwrite wordle's adapter or the global one
    maze = stack.seaweed.client("client_maze")
    for key in (f"client_wordle/{experiment}/round_1/adapter.safetensors",
                f"server/{experiment}/round_1/global/adapter.json"):
        with pytest.raises(Exception, match="AccessDenied"):
            maze.put_object(Bucket="fedse", Key=key, Body=b"overwrite")
        assert objects(stack, "fedse")[key] == exchange[key]

    # what left each client, per round
    audit = runner.invoke(app, ["audit", "--dir", str(egress), "-e", experiment, "--json"])
    assert audit.exit_code == 0, audit.output
    assert [(e["round"], e["sender"]) for e in json.loads(audit.stdout)] == [
        (0, "client_maze"), (0, "client_wordle"), (1, "client_maze"), (1, "client_wordle")]

    result = runner.invoke(app, ["compare", "--json", "--tracking-uri", stack.mlflow_uri])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout) if r["seed"] == 2]
    assert [r["round"] for r in rows] == [0, 1] and all(r["method"] == "fedse" for r in rows)
    assert {r["adapter_sha256"] for r in rows} == {r["global"]["sha256"] for r in doc["rounds"]}
    every = json.loads(result.stdout)
    for scored_on in {r["task_set"] for r in every}:  # one champion per task set, among its own versions
        holders = [r for r in every if f"champion-{scored_on}" in r["aliases"]]
        assert len(holders) == 1 and holders[0]["task_set"] == scored_on
    from tasks.version_buffer import in_cache, pull, push

    assert all(set(r["buffers"]) == {"maze", "wordle"} and in_cache(str(stack.root), r["buffers"]["maze"])
               for r in rows)

    # DVC's remote is bucket dvc of the same store: a buffer version goes there and comes back
    version = rows[-1]["buffers"]["wordle"]
    assert push(str(stack.root), version) > 0 and objects(stack, "dvc")
    shutil.rmtree(stack.root / ".dvc" / "cache")
    assert not in_cache(str(stack.root), version)
    assert pull(str(stack.root), version) > 0 and in_cache(str(stack.root), version)


def test_two_experiments_on_one_stack_keep_to_their_own_keys_runs_and_buffers(stack: Stack, micro_params: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of the same settings and seed started together on the served deployment: each writes only
    under its own exchange prefix, its own MLflow parent run and its own buffers, and each ends exactly where
    it would alone (the same global adapters), which cross-talk of any kind would break."""
    import time

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    as_operator(stack, monkeypatch)
    seeds = tmp_path / "seeds"
    for env in ("maze", "wordle"):  # run seed 5's draw
        assert CliRunner().invoke(app, ["seed", "--out", str(seeds), "--seed", "5", "--env", env, "--count", "4"]
                                  ).exit_code == 0
    before = set(objects(stack, "fedse"))
    sets = ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=4",
            "federation.explore_episodes=2", "federation.eval_episodes=2", f"transport.audit_dir={tmp_path / 'egress'}"]
    with temporary_settings(updates=stack.prefect_settings()):
        started = [run_deployment("fedse/round-loop", timeout=0, parameters={
            "method": "fedse", "profile": "smoke", "seed": 5, "params": str(micro_params), "sets": sets,
            "out": str(tmp_path / name), "experiment": "fedse-two-at-once"}) for name in ("a", "b")]
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 900
            runs = [client.read_flow_run(r.id) for r in started]
            while not all(r.state is not None and r.state.is_final() for r in runs) and time.monotonic() < deadline:
                time.sleep(3)
                runs = [client.read_flow_run(r.id) for r in started]
    assert all(r.state is not None and r.state.is_completed() for r in runs), [r.state for r in runs]
    docs = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    prefixes = [d["exchange"]["experiment"] for d in docs]
    assert prefixes[0] != prefixes[1]

    # keys: each run's 12 objects under its own prefix, their manifests naming its own uploads
    exchange = {k: v for k, v in objects(stack, "fedse").items() if k not in before}
    assert sorted({k.split("/")[1] for k in exchange}) == sorted(prefixes)
    for doc, prefix in zip(docs, prefixes, strict=True):
        mine = {k: v for k, v in exchange.items() if k.split("/")[1] == prefix}
        assert len(mine) == 12
        for r, record in enumerate(doc["rounds"]):
            for name, stats in record["clients"].items():
                manifest = json.loads(mine[f"client_{name}/{prefix}/round_{r}/adapter.json"])
                assert manifest["sha256"] == stats["upload_sha256"]

    # buffers: in each run's own folder, the same records; and the same global adapters as each other
    def buffer(name: str, client: str) -> bytes:
        return (tmp_path / name / "buffers" / client / "buffer.jsonl").read_bytes()

    assert all(buffer("a", c) == buffer("b", c) for c in ("maze", "wordle"))
    assert [r["global"]["sha256"] for r in docs[0]["rounds"]] == [r["global"]["sha256"] for r in docs[1]["rounds"]]

    # runs: two parent runs in the experiment, one per flow run, each with its own two round runs and versions
    mlflow = MlflowClient(stack.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("fedse-two-at-once")
    every = mlflow.search_runs([experiment.experiment_id], max_results=100)
    parents = {r.info.run_id: r for r in every if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(r.data.tags["prefect.flow_run_id"] for r in parents.values()) == sorted(str(r.id) for r in runs)
    for parent in parents:
        rounds = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent]
        assert sorted(r.data.tags["round"] for r in rounds) == ["0", "1"]
        versions = mlflow.search_model_versions(f"name='fedse-global' and tag.parent_run_id = '{parent}'")
        assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in rounds)


def test_prefect_and_mlflow_uis_show_the_served_run(stack: Stack, micro_params: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The two web UIs a user opens after a served run, in a real headless browser (Debian's chromium,
    driven by Playwright): Prefect's page of the flow run shows its name, its flow, its final state and the
    per-round lines it logged; MLflow's page of the registered model lists the run's versions, and a
    version's page names the round run it came from."""
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    browser_path = os.environ.get("FEDSE_BROWSER", "/usr/bin/chromium")
    if not Path(browser_path).exists():
        if os.environ.get("FEDSE_BROWSER"):  # make test installs it and names it: missing there is a failure
            pytest.fail(f"FEDSE_BROWSER={browser_path}: no such browser (make browser installs Debian's chromium)")
        pytest.skip(f"no browser at {browser_path}; `make browser` installs one (make test does)")
    as_operator(stack, monkeypatch)
    seeds = tmp_path / "seeds"
    for env in ("maze", "wordle"):  # run seed 7's draw
        assert CliRunner().invoke(app, ["seed", "--out", str(seeds), "--seed", "7", "--env", env, "--count", "4"]
                                  ).exit_code == 0
    with temporary_settings(updates=stack.prefect_settings()):
        flow_run = run_deployment("fedse/round-loop", timeout=600, parameters={
            "method": "fedse", "profile": "smoke", "seed": 7, "params": str(micro_params),
            "out": str(tmp_path / "run"), "experiment": "fedse-ui",
            "sets": ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=4",
                     "federation.explore_episodes=2", "federation.eval_episodes=2",
                     f"transport.audit_dir={tmp_path / 'egress'}"]})
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    tracked = json.loads((tmp_path / "run" / "tracking.json").read_text())
    versions = MlflowClient(stack.mlflow_uri).search_model_versions(
        f"name='fedse-global' and tag.parent_run_id = '{tracked['run_id']}'")
    assert len(versions) == 2
    newest = max(versions, key=lambda v: int(v.version))
    round_name = MlflowClient(stack.mlflow_uri).get_run(newest.run_id).info.run_name

    ui = stack.prefect_api.removesuffix("/api")
    model = f"{stack.mlflow_uri}/#/models/fedse-global"
    pages = [(f"{ui}/runs/flow-run/{flow_run.id}", [flow_run.name, "fedse", "Completed", "round 1 of 2  macro"]),
             (model, ["fedse-global", *(f"Version {v.version}" for v in versions)]),
             (f"{model}/versions/{newest.version}", [f"Version {newest.version}", round_name])]
    shown = page_texts(browser_path, pages, stack)
    for (url, expected), text in zip(pages, shown, strict=True):
        missing = [e for e in expected if e not in text]
        assert not missing, f"{url} does not show {missing}; it shows: {text[:1500]}"


def page_texts(browser: str, pages: list[tuple[str, list[str]]], stack: Stack, timeout_ms: int = 90_000) -> list[str]:
    """Each page's visible text once the browser has rendered every expected string (or the timeout passed);
    the flags keep chromium off the network this machine does not have (background services, QUIC). The browser
    logs in as the operator does: Prefect's UI keeps the auth string (base64) in its origin's localStorage,
    MLflow answers 401 with a Basic challenge that the context's credentials (for its origin only) meet."""
    import base64
    import time

    from playwright.sync_api import TimeoutError as PageTimeout
    from playwright.sync_api import sync_playwright

    prefect_origin = stack.prefect_api.removesuffix("/api")
    auth = base64.b64encode(stack.secrets()["prefect_auth_string"].encode()).decode()
    login = (f"if (window.location.origin === {json.dumps(prefect_origin)}) "
             f"window.localStorage.setItem('prefect-password', {json.dumps(auth)});")
    mlflow = stack.mlflow_env()

    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    texts = []
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=browser, args=flags, headless=True)
        try:
            context = chromium.new_context(viewport={"width": 1600, "height": 1200}, http_credentials={
                "username": mlflow["MLFLOW_TRACKING_USERNAME"], "password": mlflow["MLFLOW_TRACKING_PASSWORD"],
                "origin": stack.mlflow_uri})
            context.add_init_script(login)
            page = context.new_page()
            for url, expected in pages:
                page.goto(url, wait_until="domcontentloaded")
                page.mouse.move(1000, 800)  # over the page's main column, where a wheel scrolls the list
                deadline = time.monotonic() + timeout_ms / 1000
                for text in expected:
                    while time.monotonic() < deadline:
                        try:
                            page.get_by_text(text, exact=False).first.wait_for(state="attached", timeout=2000)
                            break
                        except PageTimeout:  # a long list (a flow run's logs) loads further rows as it scrolls
                            page.mouse.wheel(0, 3000)
                texts.append(page.inner_text("body"))  # the assertion names what is missing, with what it shows
        finally:
            chromium.close()
    return texts
