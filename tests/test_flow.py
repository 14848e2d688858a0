"""The Prefect flow `fedse` on the micro model: a real (harness) Prefect API and a real MLflow SQLite store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import task
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def smoke_sets(seeds: Path) -> list[str]:
    return ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=6",
            "federation.explore_episodes=2", "federation.eval_episodes=2"]


def test_flow_completes_writes_metrics_and_registers_each_round(micro_params: Path, seeds: Path,
                                                                tmp_path: Path) -> None:
    from dvc.repo import Repo
    from mlflow import MlflowClient

    from flows.round_loop import round_loop
    from tasks.version_buffer import in_cache

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Repo.init(str(tmp_path / "dvc"), no_scm=True).close()
    state = round_loop(method="fedse", profile="smoke", seed=1, params=str(micro_params), sets=smoke_sets(seeds),
                       out=str(tmp_path / "run"), tracking_uri=uri, experiment="t", return_state=True,
                       dvc_repo=str(tmp_path / "dvc"))
    assert state.is_completed()
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["complete"] and doc["method"] == "fedse" and len(doc["rounds"]) == 2
    assert set(doc["rounds"][1]["clients"]) == {"maze", "wordle"} and doc["envs"] == ["maze", "wordle"]
    assert all(c["explore_decisions"] > 0 for c in doc["rounds"][1]["clients"].values())  # pace through the tasks
    assert doc["rounds"][1]["eval_decisions"] > 0 and doc["rounds"][1]["envs"]["maze"]["task_ids"]
    assert (tmp_path / "run" / "buffers" / "maze" / "manifest_1.json").exists()
    # adapters went through the (default, local) exchange, and each client logged what it sent
    exchange = doc["exchange"]
    assert exchange["backend"] == "local" and exchange["uri"].startswith((tmp_path / "run" / "exchange").as_uri())
    root, experiment = tmp_path / "run" / "exchange", exchange["experiment"]
    sent = [root / "client_maze" / experiment / "round_1", root / "client_wordle" / experiment / "round_1",
            root / "server" / experiment / "round_1" / "global"]
    assert all(sorted(p.name for p in f.iterdir()) == ["adapter.json", "adapter.safetensors"] for f in sent)
    log = tmp_path / "run" / "egress" / exchange["experiment"] / "client_wordle.jsonl"
    assert [json.loads(line)["round"] for line in log.read_text().splitlines()] == [0, 1]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["method"] == "fedse" and parent.data.params["clients"] == "maze,wordle"
    assert {r.data.tags["round"] for r in runs if "round" in r.data.tags} == {"0", "1"}
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "macro")] == [0, 1]
    versions = client.search_model_versions("name='fedse-global'")
    assert sorted(v.tags["round"] for v in versions) == ["0", "1"]
    shas = {r["global"]["sha256"] for r in doc["rounds"]}
    assert {v.tags["adapter_sha256"] for v in versions} == shas
    # lineage: each version names the DVC version of every client buffer that fed it, and the cache holds it
    for v in versions:
        lineage = {k.removeprefix("buffer."): h for k, h in v.tags.items() if k.startswith("buffer.")}
        assert set(lineage) == {"maze", "wordle"}
        assert lineage == doc["rounds"][int(v.tags["round"])]["buffers_dvc"]
        assert all(in_cache(str(tmp_path / "dvc"), h) for h in lineage.values())
    assert doc["rounds"][0]["buffers_dvc"]["maze"] != doc["rounds"][1]["buffers_dvc"]["maze"]  # it grew
    # rounds 0 and 1 were scored on the same tasks here, so they compete for one champion alias
    (scored_on,) = {v.tags["task_set"] for v in versions}
    assert scored_on.startswith("smoke-test-2x1-")
    champion = client.get_registered_model("fedse-global").aliases[f"champion-{scored_on}"]
    best = max(versions, key=lambda v: float(v.tags["macro"]))
    assert champion == best.version


@task(name="train")
def broken_train(*args, **kwargs):
    raise RuntimeError("client crashed")


def test_a_failing_client_fails_the_flow(micro_params: Path, seeds: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    import flows.round_loop as loop

    monkeypatch.setattr(loop, "train", broken_train)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = loop.round_loop(method="fedit", profile="smoke", params=str(micro_params), sets=smoke_sets(seeds),
                            out=str(tmp_path / "run"), return_state=True, tracking_uri=uri, experiment="t")
    assert state.is_failed()
    assert not (tmp_path / "run" / "metrics.json").exists()  # no round was recorded as complete
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert parent.info.status == "FAILED"  # not left RUNNING
    assert parent.data.tags["failure"].startswith("AggregationError: round 0: 0 usable upload(s)")


def test_an_interrupted_flow_marks_its_runs_killed_nested_ones_too(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from tasks.track import Tracking, close_unfinished, ended_as

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t")
    parent = client.create_run(exp).info.run_id
    nested = client.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
    done = client.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
    client.set_terminated(done)
    status = ended_as(KeyboardInterrupt())
    close_unfinished(Tracking(uri, exp, parent, "t"), status, "KeyboardInterrupt")
    assert [client.get_run(r).info.status for r in (parent, nested, done)] == ["KILLED", "KILLED", "FINISHED"]
    assert ended_as(RuntimeError("x")) == "FAILED"


def test_an_upstream_failure_fails_the_flow_with_its_own_error(micro_params: Path, tmp_path: Path) -> None:
    """A client without seed data: the flow run fails with the buffer's message, not a downstream 'not ready'."""
    from flows.round_loop import round_loop

    empty = tmp_path / "no-seeds"
    empty.mkdir()
    state = round_loop(method="fedit", profile="smoke", params=str(micro_params), sets=smoke_sets(empty),
                       out=str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    assert "seed trajectories of run seed 0 not found" in str(state.result(raise_on_failure=False))


def test_a_second_run_in_the_same_process_starts_from_the_fresh_adapter(micro_params: Path, seeds: Path,
                                                                       tmp_path: Path) -> None:
    """A served deployment runs many flow runs in one process; none may inherit the previous one's adapter."""
    from flows.round_loop import round_loop

    docs = []
    for name in ("a", "b"):
        round_loop(method="fedit", profile="smoke", seed=4, params=str(micro_params), sets=smoke_sets(seeds),
                   out=str(tmp_path / name))
        docs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert [r["global"]["sha256"] for r in docs[0]["rounds"]] == [r["global"]["sha256"] for r in docs[1]["rounds"]]


def test_the_process_pool_and_dask_runners_give_the_same_adapters(micro_params: Path, seeds: Path,
                                                                   tmp_path: Path) -> None:
    """orchestration.task_runner=process (the quick profile's) and mode dask (a local cluster of 2 worker processes):
    every worker loads its own model from the same seed, so the run is the thread runner's, adapter for adapter,
    and its buffer versions reach the DVC cache (every task argument crosses the process boundary pickled).
    One torch thread everywhere: a Dask worker has one (OMP_NUM_THREADS=1), and float sums in another order are
    other bits."""
    from dvc.repo import Repo

    from flows.round_loop import round_loop, task_runner
    from tasks.version_buffer import in_cache

    docs = []
    for kind in ("thread", "process", "dask"):
        repo = tmp_path / f"dvc-{kind}"
        Repo.init(str(repo), no_scm=True).close()
        flow = round_loop.with_options(task_runner=task_runner(kind, 2))
        state = flow(method="fedit", profile="smoke", seed=5, params=str(micro_params),
                     sets=[*smoke_sets(seeds), "learner.threads=1", "policy.threads=1"],
                     out=str(tmp_path / kind), dvc_repo=str(repo), return_state=True)
        assert state.is_completed(), state
        docs.append(json.loads((tmp_path / kind / "metrics.json").read_text()))
        versions = docs[-1]["rounds"][-1]["buffers_dvc"]
        assert set(versions) == {"maze", "wordle"} and all(in_cache(str(repo), v) for v in versions.values())
    shas = [[r["global"]["sha256"] for r in doc["rounds"]] for doc in docs]
    assert shas[0] == shas[1] == shas[2]
    assert [doc["rounds"][-1]["macro"] for doc in docs] == [docs[0]["rounds"][-1]["macro"]] * 3


def test_the_mode_picks_the_flows_task_runner() -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from fedse.config import OrchestrationConfig
    from flows.round_loop import configured

    assert isinstance(configured(OrchestrationConfig(mode="dask", task_runner="process")).task_runner, DaskTaskRunner)
    assert isinstance(configured(OrchestrationConfig(task_runner="process")).task_runner, ProcessPoolTaskRunner)
    assert isinstance(configured(OrchestrationConfig(mode="workers")).task_runner, ThreadPoolTaskRunner)


def test_tracking_without_the_server_into_a_served_experiment_is_one_clear_error(tmp_path: Path) -> None:
    """An experiment the served MLflow made keeps its artifacts behind the server (bucket mlflow); a run tracked
    straight into the database could not log there, so it stops before its first round, in one line."""
    from mlflow import MlflowClient

    from fedse.config import load_config
    from tasks.track import open_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("served", artifact_location="mlflow-artifacts:/artifacts/1")
    with pytest.raises(ValueError, match="keeps its artifacts behind the MLflow server"):
        open_experiment.fn(load_config("params.yaml", profile="smoke"), uri, "served", "flow-run")


def test_a_round_without_some_clients_says_who_and_why_in_mlflow_and_the_artifact() -> None:
    from flows.round_loop import _table
    from tasks.track import absence_tags, round_metrics

    record = {"round": 2, "envs": {"maze": {"success": 0.5, "n": 4}}, "micro": 0.5, "macro": 0.5,
              "aggregation": {"clients": 1, "agg_error": 0.1,
                              "rejected": [{"client": "wordle", "reason": "update norm 9.1 is 120.0x ..."}],
                              "missing": {"textcraft": "timed out after 60 s"}}}
    assert absence_tags(record) == {"rejected.wordle": "update norm 9.1 is 120.0x ...",
                                    "missing.textcraft": "timed out after 60 s"}
    metrics = round_metrics(record)
    assert metrics["aggregation.rejected"] == 1.0 and metrics["aggregation.clients"] == 1.0
    rows = _table(record)
    assert rows[-2:] == [{"env": "rejected: wordle", "success": "update norm 9.1 is 120.0x ...", "n": ""},
                         {"env": "missing: textcraft", "success": "timed out after 60 s", "n": ""}]
    assert absence_tags({"round": 0}) == {}


def test_a_client_is_retried_and_one_that_keeps_failing_is_missing_from_a_quorum_round(
        micro_params: Path, seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.round_loop as loop
    from tasks.train import train as real_train

    attempts: dict[str, int] = {}

    @task(name="train")
    def flaky_train(cfg, start, data, round, name, own=None):
        attempts[name] = attempts.get(name, 0) + 1
        if name == "wordle" or attempts[name] == 1:  # maze fails once, wordle every time
            raise RuntimeError(f"{name} crashed")
        return real_train.fn(cfg, start, data, round, name, own)

    monkeypatch.setattr(loop, "train", flaky_train)
    sets = [*smoke_sets(seeds), "federation.rounds=1", "federation.quorum=1", "orchestration.retries=2",
            "orchestration.retry_delay=0"]
    state = loop.round_loop(method="fedse", profile="smoke", params=str(micro_params), sets=sets,
                            out=str(tmp_path / "run"), return_state=True)
    assert state.is_completed()
    assert attempts == {"maze": 2, "wordle": 3}  # one retry healed maze; wordle used all of its retries
    r0 = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][0]
    assert r0["aggregation"]["missing"] == {"wordle": "RuntimeError: wordle crashed"}
    assert r0["aggregation"]["clients"] == 1 and r0["clients"]["wordle"] == {"failed": "RuntimeError: wordle crashed"}


def test_a_client_that_hangs_past_the_deadline_is_missing(micro_params: Path, seeds: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import flows.round_loop as loop
    from tasks.train import train as real_train

    @task(name="train")
    def hanging_train(cfg, start, data, round, name, own=None):
        if name == "wordle":
            time.sleep(45)  # never delivers within the deadline; it holds no model while it hangs
        return real_train.fn(cfg, start, data, round, name, own)

    monkeypatch.setattr(loop, "train", hanging_train)
    sets = [*smoke_sets(seeds), "federation.rounds=1", "federation.quorum=1", "federation.client_timeout=20"]
    state = loop.round_loop(method="fedse", profile="smoke", params=str(micro_params), sets=sets,
                            out=str(tmp_path / "run"), return_state=True)
    assert state.is_completed()
    r0 = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][0]
    assert r0["aggregation"]["missing"] == {
        "wordle": "TimeoutError: no upload within federation.client_timeout = 20 s"}
    assert r0["clients"]["maze"]["steps"] > 0


def test_versions_scored_on_other_task_sets_never_compete_for_one_alias(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tasks.register import register, task_set
    from tasks.track import Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    tracking = Tracking(uri, exp, client.create_run(exp).info.run_id, "t")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    def scored(tasks: int, macro: float) -> dict:
        return {"envs": {"maze": {"success": macro, "task_ids": list(range(tasks))}}, "micro": macro, "macro": macro}

    smoke, quick = scored(4, 0.9), scored(25, 0.3)
    sets = [task_set("smoke", "test", 1, smoke), task_set("quick", "test", 2, quick)]
    assert sets[0].startswith("smoke-test-4x1-") and sets[1].startswith("quick-test-25x2-")
    assert task_set("quick", "test", 2, scored(25, 0.1)) == sets[1]  # the same tasks: the same set
    assert task_set("quick", "test", 1, quick) != sets[1] and task_set("quick", "val", 2, quick) != sets[1]
    for record, scored_on in [(smoke, sets[0]), (quick, sets[1]), (scored(25, 0.5), sets[1])]:
        run = client.create_run(exp).info.run_id
        register.fn(tracking, run, 0, "fedse", 0, {"path": str(adapter), "sha256": "x", "bytes": 1}, record, {},
                    scored_on)
    aliases = client.get_registered_model("fedse-global").aliases
    assert aliases == {f"champion-{sets[0]}": 1, f"champion-{sets[1]}": 3}  # the smoke model's 0.9 wins nothing


def test_a_failed_flow_resumed_ends_as_an_uninterrupted_one_and_tracks_each_round_once(
        micro_params: Path, seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1 fails (wordle's training breaks, below the quorum) after maze delivered; `resume` continues the
    folder: maze is not retrained, the final adapter is the uninterrupted run's, and MLflow holds one parent
    run, one nested run and one registered version per round."""
    from mlflow import MlflowClient

    import flows.round_loop as loop
    from tasks.train import train as real_train

    sets = [*smoke_sets(seeds), "orchestration.retries=0"]
    clean = loop.round_loop(method="fedse", profile="smoke", seed=6, params=str(micro_params), sets=sets,
                            out=str(tmp_path / "clean"))
    calls: list[tuple[str, int]] = []
    broken = [True]

    @task(name="train")
    def breaking(cfg, start, data, round, name, own=None):
        calls.append((name, round))
        if (name, round) == ("wordle", 1) and broken[0]:
            raise RuntimeError("out of memory")
        return real_train.fn(cfg, start, data, round, name, own)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "train", breaking)
    failed = loop.round_loop(method="fedse", profile="smoke", seed=6, params=str(micro_params), sets=sets,
                             out=str(run), tracking_uri=uri, experiment="t", return_state=True)
    assert failed.is_failed() and "below the quorum of 2" in str(failed.result(raise_on_failure=False))
    assert len(json.loads((run / "metrics.json").read_text())["rounds"]) == 1

    calls.clear()
    broken[0] = False
    resumed = loop.round_loop(method="fedse", profile="smoke", seed=6, params=str(micro_params), sets=sets,
                              resume=str(run), tracking_uri=uri, experiment="t")
    assert calls == [("wordle", 1)]  # maze's round-1 upload was already in the exchange
    assert [r["global"]["sha256"] for r in resumed["rounds"]] == [r["global"]["sha256"] for r in clean["rounds"]]

    client = MlflowClient(uri)
    every = client.search_runs([client.get_experiment_by_name("t").experiment_id], max_results=50)
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["round"] for r in nested) == ["0", "1"]
    versions = client.search_model_versions(f"name='fedse-global' and tag.parent_run_id = '{parents[0].info.run_id}'")
    assert sorted(v.tags["round"] for v in versions) == ["0", "1"]


def test_resume_of_a_folder_with_other_settings_is_refused_in_one_line(micro_params: Path, seeds: Path,
                                                                       tmp_path: Path) -> None:
    from flows.round_loop import round_loop

    sets = [*smoke_sets(seeds), "federation.rounds=1"]
    round_loop(method="fedit", profile="smoke", seed=0, params=str(micro_params), sets=sets, out=str(tmp_path / "r"))
    state = round_loop(method="fedit", profile="smoke", seed=1, params=str(micro_params), sets=sets,
                       resume=str(tmp_path / "r"), return_state=True)
    assert state.is_failed() and "seed" in str(state.result(raise_on_failure=False))
