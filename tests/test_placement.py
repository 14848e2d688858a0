"""Placement (fedse/placement.py, flows/placement.py): one client per device, then shared in turn; each client's
process sees its own device alone; the flow's driver loads no model. No GPU is needed: CUDA_VISIBLE_DEVICES is
what placement sets and what the probes read back, whether a driver stands behind it or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedse import placement
from fedse.config import ConfigError, OrchestrationConfig, load_config
from fedse.placement import assign, checked, parse_visible, placed_devices, tag, tagged, visible_devices

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the rules
def test_cuda_visible_devices_is_read_as_cuda_reads_it() -> None:
    assert parse_visible(None) is None
    assert parse_visible("0,1,2") == ["0", "1", "2"]
    assert parse_visible(" 2, 3 ") == ["2", "3"]
    assert parse_visible("GPU-8a3f,1") == ["GPU-8a3f", "1"]
    assert parse_visible("") == [] and parse_visible("-1") == []
    assert parse_visible("0,-1,2") == ["0"] and parse_visible("0,,2") == ["0"]  # CUDA stops at the first non-device


def test_visible_devices_prefer_the_setting_then_what_the_process_sees() -> None:
    assert visible_devices([0, "1"], {"CUDA_VISIBLE_DEVICES": "5"}, count=1) == ["0", "1"]
    assert visible_devices([], {"CUDA_VISIBLE_DEVICES": "5"}, count=1) == []
    assert visible_devices(None, {"CUDA_VISIBLE_DEVICES": "2,3"}, count=2) == ["2", "3"]
    assert visible_devices(None, {"CUDA_VISIBLE_DEVICES": "2,3,5"}, count=2) == ["2", "3"]
    assert visible_devices(None, {}, count=3) == ["0", "1", "2"]
    assert visible_devices(None, {"CUDA_VISIBLE_DEVICES": "0,1"}, count=0) == []  # listed, but no driver shows them


def test_one_client_per_device_then_shared_in_turn() -> None:
    clients = ["babyai", "webshop", "textcraft", "maze", "wordle"]
    own = assign(clients[:3], ["0", "1", "2"])
    assert own == {"babyai": "0", "webshop": "1", "textcraft": "2"}
    shared = assign(clients, ["0", "1"])
    assert list(shared.values()) == ["0", "1", "0", "1", "0"]
    assert assign(clients, ["0", "1"]) == shared  # deterministic
    assert assign(clients, []) == dict.fromkeys(clients)  # CPU: nothing pinned


def test_bad_device_entries_are_refused_in_one_line() -> None:
    assert checked([0, "GPU-8a3f"]) == ["0", "GPU-8a3f"]
    for bad, why in (([0, 0], "listed twice"), (["0,1"], "not a device"), ([""], "not a device"),
                     ([-1], "not a device")):
        with pytest.raises(ValueError, match=why):
            checked(bad)
    assert load_config(None, overrides=["orchestration.gpus=[0, 1]"]).orchestration.gpus == ["0", "1"]
    with pytest.raises(ConfigError, match=r"orchestration\.gpus: .*listed twice"):
        load_config(None, overrides=["orchestration.gpus=[1, 1]"])


def test_only_runners_of_several_processes_are_placed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "cuda_count", lambda: 2)  # a machine that shows two GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert placed_devices(OrchestrationConfig()) == []  # the thread pool: one process, one model
    assert placed_devices(OrchestrationConfig(mode="workers", task_runner="process")) == []  # organisations' own
    assert placed_devices(OrchestrationConfig(task_runner="process")) == ["4", "6"]
    assert placed_devices(OrchestrationConfig(mode="dask")) == ["4", "6"]
    assert placed_devices(OrchestrationConfig(mode="dask", dask_address="tcp://h:8786")) == []  # not this machine's
    assert placed_devices(OrchestrationConfig(mode="dask", dask_address="tcp://h:8786", gpus=[0])) == ["0"]
    assert placed_devices(OrchestrationConfig(task_runner="process", gpus=[])) == []


def test_a_device_process_is_pinned_before_its_own_initializer_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    seen: list[str] = []
    placement.started("2", lambda note: seen.append(f"{note} {os.environ['CUDA_VISIBLE_DEVICES']}"), ("init",))
    assert seen == ["init 2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2"


def test_tags_name_the_device_and_nothing_else() -> None:
    assert tagged({"gpu", tag("1")}) == "1" and tagged({tag("GPU-8a3f")}) == "GPU-8a3f"
    assert tagged({"gpu"}) is None and tagged(set()) is None


def test_the_cpu_path_keeps_prefects_own_runners() -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.placement import PlacedDask, PlacedProcessPool
    from flows.round_loop import task_runner

    assert type(task_runner("process", 2)) is ProcessPoolTaskRunner
    assert type(task_runner("dask", 2)) is DaskTaskRunner
    assert type(task_runner("thread", 2, devices=["0", "1"])) is ThreadPoolTaskRunner
    placed = task_runner("process", 2, devices=["0", "1"])
    assert isinstance(placed, PlacedProcessPool) and list(placed.pools) == ["0", "1"]
    assert isinstance(task_runner("dask", 2, devices=["0"]), PlacedDask)


def test_an_organisations_process_is_pinned_to_its_device() -> None:
    from flows import orgs

    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    assert orgs.environment(Path("/o"), "maze", base=base, device="2")["CUDA_VISIBLE_DEVICES"] == "2"
    assert orgs.environment(Path("/o"), "maze", base=base)["CUDA_VISIBLE_DEVICES"] == "0,1,2"  # not placed: as given


def test_the_model_is_named_from_its_spec_alone(micro_spec, micro_agent) -> None:
    from fedse.model import base_name

    assert base_name(micro_spec) == micro_agent.name
    assert base_name(micro_spec.model_copy(update={"preset": "Qwen/Qwen2.5-7B-Instruct"})) == "Qwen/Qwen2.5-7B-Instruct"


# ------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def probe_through(runner, placed: dict[str, str | None]) -> dict[str, dict]:
    """Each client's probe submitted through `runner` as its tasks are (tagged with its device)."""
    from prefect import flow

    from flows.round_loop import on
    from tasks.probe import probe

    @flow(task_runner=runner)
    def where() -> dict[str, dict]:
        futures = {client: on(probe, device).submit(client) for client, device in placed.items()}
        return {client: future.result() for client, future in futures.items()}

    return where()


@pytest.mark.parametrize("kind", ["process", "dask"])
def test_each_clients_process_sees_its_own_device_and_sharers_take_turns(
        prefect_api: None, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five clients on three devices: the first three each on a device of its own, the last two sharing the
    first two devices' processes (one process per device: one model, one task at a time), every process
    seeing its own device alone. The driver's own CUDA_VISIBLE_DEVICES, which Prefect's process pool hands
    every task, never reaches them."""
    from flows.round_loop import task_runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    devices, clients = ["0", "1", "2"], ["babyai", "webshop", "textcraft", "maze", "wordle"]
    placed = assign(clients, devices)
    seen = probe_through(task_runner(kind, 2, devices=devices), placed)
    assert {c: s["visible"] for c, s in seen.items()} == placed == {
        "babyai": "0", "webshop": "1", "textcraft": "2", "maze": "0", "wordle": "1"}
    pids = {device: {seen[c]["pid"] for c in clients if placed[c] == device} for device in devices}
    assert all(len(p) == 1 for p in pids.values())  # one process per device, shared by its clients
    assert len(set().union(*pids.values())) == len(devices)  # a process of its own for each device
    assert os.getpid() not in set().union(*pids.values())


def test_two_tasks_placed_on_one_card_never_run_at_once(prefect_api: None) -> None:
    """The Prefect limits placement creates: `gpu-<device>` of 1 (and `gpu` at least one per device). Two tasks
    tagged for card 0 on a thread pool, which would otherwise run them side by side, run one after the other."""
    import time

    from prefect import flow, get_client, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.placement import device_limits
    from flows.round_loop import on

    device_limits(["0", "1"], 1)
    with get_client(sync_client=True) as client:
        limits = {tag: client.read_concurrency_limit_by_tag(tag).concurrency_limit for tag in ("gpu", "gpu-0", "gpu-1")}
    assert limits == {"gpu": 2, "gpu-0": 1, "gpu-1": 1}

    @task
    def hold(name: str) -> tuple[float, float]:
        started = time.monotonic()
        time.sleep(1.0)
        return started, time.monotonic()

    @flow(task_runner=ThreadPoolTaskRunner(3))
    def both() -> list[tuple[float, float]]:
        futures = [on(hold, "0").submit("a"), on(hold, "0").submit("b")]
        return [f.result() for f in futures]

    first, second = sorted(both())
    assert first[1] <= second[0]  # the second waited for the first to leave the card
    with get_client(sync_client=True) as client:
        for name in ("gpu", "gpu-0", "gpu-1"):
            client.delete_concurrency_limit_by_tag(name)


DRIVER = """
import json, sys

def peak_mb():  # VmHWM: the high-water mark of this address space (ru_maxrss would start from pytest's RSS)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

def main():
    params, seeds, out, load = sys.argv[1:5]
    import tasks.agent
    from fedse.config import run_config
    from flows.round_loop import round_loop, task_runner

    sets = ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=6",
            "federation.explore_episodes=2", "federation.eval_episodes=2", "federation.rounds=1",
            "orchestration.task_runner=process", "orchestration.gpus=[0, 1]"]
    before = peak_mb()
    if load == "load":  # the control: what a model in this process costs
        with tasks.agent.borrowed(run_config(params, "smoke", "fedit", 0, sets)):
            pass
    else:  # on the test's Prefect API (PREFECT_API_URL)
        flow = round_loop.with_options(task_runner=task_runner("process", 2, devices=["0", "1"]))
        state = flow(method="fedit", profile="smoke", params=params, sets=sets, out=out, return_state=True)
        assert state.is_completed(), state
    print(json.dumps({"growth_mb": peak_mb() - before, "models": len(tasks.agent._agents)}))

if __name__ == "__main__":
    main()
"""


def test_the_flows_driver_loads_no_model(prefect_api: None, micro_params: Path, seeds: Path, tmp_path: Path) -> None:
    """A placed flow (two clients on two fake devices, process pool) run in a process of its own: its peak
    resident memory (VmHWM) grows by less than half of what loading the model grows the same process by (measured side
    by side: ~170 MB against ~15 MB on the 2-core machine), it holds no model, and each client's process saw
    its own device (placement.json)."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}

    def run(load: str) -> dict:
        done = subprocess.run([sys.executable, str(script), str(micro_params), str(seeds), str(tmp_path / "run"),
                               load], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    model = run("load")
    driver = run("flow")
    assert model["models"] == 1 and driver["models"] == 0
    assert driver["growth_mb"] < model["growth_mb"] / 2, (driver, model)
    seen = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert {c: (s["device"], s["visible"]) for c, s in seen.items()} == {"maze": ("0", "0"), "wordle": ("1", "1")}
    assert seen["maze"]["pid"] != seen["wordle"]["pid"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["complete"]
