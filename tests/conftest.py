"""Shared fixtures. The micro model is a real tiny build (tokenizer + Qwen3 + pretraining), just small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedse import kernels
from fedse.corpus import CorpusSpec
from fedse.model import Agent, ModelSpec, load_agent
from fedse.tiny import TinySpec

kernels.choose("portable")  # as every run does (model.kernels): before any test computes with torch

MICRO = TinySpec(d_model=64, layers=2, heads=2, kv_heads=1, vocab=600, context=1024,
                 corpus=CorpusSpec(episodes=6), pretrain_steps=3, batch=4, window=256)


@pytest.fixture(scope="session")
def micro_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return ModelSpec(preset="tiny", cache_dir=Path(tmp_path_factory.mktemp("cache")), tiny=MICRO)


@pytest.fixture()
def micro_agent(micro_spec: ModelSpec) -> Agent:
    """A fresh agent (base + zero-effect LoRA) on the cached micro base; built once per session."""
    return load_agent(micro_spec)


@pytest.fixture(scope="session")
def tiny_agent() -> Agent:
    """The committed tiny base (it solves some tasks, so episodes end at different turns; it writes `Action: …`
    replies and ends them), with a LoRA that has an effect. Shared: tests must not change its weights."""
    import torch

    agent = load_agent(ModelSpec())
    torch.manual_seed(3)
    for p in agent.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return agent


@pytest.fixture()
def micro_params(tmp_path: Path, micro_spec) -> Path:
    """The repository's params (profiles included), pointed at the session's micro model (same spec, cache)."""
    import yaml

    path = tmp_path / "params.yaml"
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["model"] = json.loads(micro_spec.model_dump_json())
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture()
def dp_config(micro_spec: ModelSpec, tmp_path: Path):
    """A factory of two-organisation smoke configs (maze, wordle; 4 seeds each, written once) on the micro model,
    with the given overrides: what the DP tests run, killed and resumed."""
    from fedse.config import load_config
    from fedse.seed import write_seed_file

    for env in ("maze", "wordle"):
        write_seed_file(env, 4, tmp_path / "seeds", seed=0)

    def make(overrides: list[str]):
        cfg = load_config("params.yaml", profile="smoke", overrides=[
            "federation.method=fedse", "federation.seeds_per_client=4", "federation.explore_episodes=2",
            "federation.eval_episodes=2", "envs.names=[maze, wordle]", f"seed_data.dir={tmp_path / 'seeds'}",
            *overrides])
        return cfg.model_copy(update={"model": micro_spec})

    return make


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on free 127.0.0.1 ports with one identity per role (flows/seaweed.py), its
    gateway on https with a local CA (AWS_CA_BUNDLE names it while it runs), stopped at the end of the session."""
    from flows.seaweed import on_free_ports, serving

    root = tmp_path_factory.mktemp("seaweedfs")
    clients = ["babyai", "webshop", "textcraft", "maze", "wordle"]
    with serving(on_free_ports(root / "data", root / "state", clients)) as store:
        yield store


def _digests(paths: list[Path]) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    """ONE served stack for the session (flows/stack.py: SeaweedFS over https, Prefect with its auth string,
    MLflow with basic auth, the served deployment) on free 127.0.0.1 ports, shared by tests/test_stack.py and
    tests/test_control_plane.py through `served_stack`; yields it, the digests of its secret files as `prepare`
    minted them before `up` (so a test can see that `up` reused them), and the function that stops it."""
    from dvc.repo import Repo

    from flows.stack import Stack

    root = tmp_path_factory.mktemp("stack")
    Repo.init(str(root), no_scm=True).close()  # the served deployment versions buffers in its folder's DVC repo
    # served as `make serve` serves the repository's params: the quick profile's process pool, so every task
    # argument (the S3 exchange among them) crosses into worker processes
    serving = root / "serve-params.yaml"
    serving.write_text("orchestration: {task_runner: process, workers: 2}\n")
    running = Stack.on_free_ports(root, extra_env={"FEDSE_PARAMS": str(serving)})
    running.prepare()
    minted = _digests(running.secret_files())
    stopped: list[str] = []

    def stop() -> None:
        if not stopped:
            stopped.extend(running.down() or ["nothing"])
            assert set(stopped) == {"seaweedfs", "prefect", "mlflow", "deployment"}
            assert not (root / ".serve" / "pids.json").exists()

    running.up()
    try:
        yield running, minted, stop
    finally:
        stop()


@pytest.fixture()
def served_stack(served, request: pytest.FixtureRequest):
    """The session's served stack (fixture `served`), stopped right after the last test of the session that
    uses it rather than at the session's end, so the tests after it get its cores and memory."""
    running, _, stop = served
    users = [item for item in request.session.items if "served_stack" in getattr(item, "fixturenames", ())]
    if users and request.node is users[-1]:
        request.addfinalizer(stop)
    return running


@pytest.fixture()
def served_minted(served, served_stack) -> dict[str, str]:
    """Digests of the served stack's secret files as `prepare` minted them, before `up`."""
    return served[1]


RUN_SEEDS = range(7)


@pytest.fixture()
def seeds(tmp_path: Path) -> Path:
    """Expert seed files for maze and wordle (6 trajectories each) of run seeds 0-6 (the seeds the flow tests
    run at), for runs of those two clients."""
    from typer.testing import CliRunner

    from fedse.cli import app

    folder = tmp_path / "seeds"
    for run_seed in RUN_SEEDS:
        result = CliRunner().invoke(app, ["seed", "--out", str(folder), "--seed", str(run_seed), "--env", "maze",
                                          "--env", "wordle", "--count", "6"])
        assert result.exit_code == 0, result.output
    return folder


# the fixtures that start real servers or whole runs of the pipeline: a test using one is `integration`
SERVERS = {"object_store", "served", "served_stack", "stack", "bench", "prefect_api"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts servers (SeaweedFS, Prefect, MLflow, the served stack, organisations' workers)
    or fault-injected runs as `integration`, so `make test-fast` (`-m "not integration"`) is the inner loop."""
    for item in items:
        if SERVERS & set(getattr(item, "fixturenames", ())) or "reliability" in item.path.parts:
            item.add_marker(pytest.mark.integration)


# xdist: tests that share an expensive module- or session-scoped fixture (a served stack, organisations' workers,
# a loaded SmolLM2) run in one worker, so the fixture starts once; every other test is scheduled on its own.
# Keyed by file because the controller sees node ids only. (xdist 3.8's own `xdist_group` marker does nothing
# under pytest 9.2: it renames `item._nodeid`, which pytest 9.2 no longer reads — measured, issue 27.)
SHARED = {"tests/test_stack.py": "served", "tests/test_control_plane.py": "served",
          "tests/test_workers.py": "workers", "tests/reliability/test_faults.py": "faults",
          "tests/test_exchange.py": "exchange", "tests/test_smollm2.py": "smollm2", "tests/test_flow.py": "flow",
          "tests/test_federation.py": "federation", "tests/test_tiny.py": "tiny",
          "tests/test_placement.py": "placement"}
FIRST = ["workers", "served", "faults", "flow"]  # the longest units start first, one per worker


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test`'s scheduler (pytest -n 2 --dist loadgroup): the groups above as units, longest first."""
    from xdist.scheduler import LoadScopeScheduling

    class Shared(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return SHARED.get(nodeid.split("::", 1)[0], nodeid)

        def _assign_work_unit(self, node: object) -> None:
            if not self.ordered:  # the queue is built by now; put the long units at its head
                for scope in reversed([s for s in FIRST if s in self.workqueue]):
                    self.workqueue.move_to_end(scope, last=False)
                self.ordered = True
            super()._assign_work_unit(node)

    return Shared(config, log) if config.getvalue("dist") == "loadgroup" else None
