"""Resuming a killed run (fedse/checkpoint.py): nothing finished is redone, and the result is bit for bit the
uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_federation import seeds, smoke  # noqa: F401  (seeds is a fixture)

import fedse.federation as federation
from fedse.buffer import Buffer
from fedse.checkpoint import ResumeError, differences, rewind
from fedse.federation import Federation
from fedse.model import load_agent
from fedse.trajectory import Trajectory, Turn


def traj(task: int) -> Trajectory:
    return Trajectory(env="maze", task_id=task, policy="agent", success=True, reward=1.0, instruction="go",
                      final_observation="done",
                      turns=[Turn(observation=f"o{task}", action="go north")])


def test_differences_name_each_changed_key_with_both_values() -> None:
    old = {"federation": {"rounds": 4, "clients": ["maze"]}, "seed": 0}
    new = {"federation": {"rounds": 6, "clients": ["maze"]}, "seed": 0, "extra": 1}
    assert differences(old, new) == ["extra: None in the run, 1 now", "federation.rounds: 4 in the run, 6 now"]


def test_a_setting_added_since_the_run_started_passes_only_at_its_default() -> None:
    """A run recorded before `privacy.record` existed behaved as its default (off), so it resumes after an
    upgrade; turning the new setting on, or a changed old one, is still a difference."""
    defaults = {"privacy": {"client": {"enabled": False}, "record": {"enabled": False, "clip": 1.0}}, "seed": 0}
    old = {"privacy": {"client": {"enabled": False}}, "seed": 0}
    assert differences(old, defaults, "", defaults) == []
    on = {"privacy": {"client": {"enabled": False}, "record": {"enabled": True, "clip": 1.0}}, "seed": 0}
    assert differences(old, on, "", defaults) == [
        "privacy.record: None in the run, {'enabled': True, 'clip': 1.0} now"]
    assert differences({**old, "seed": 1}, defaults, "", defaults) == ["seed: 1 in the run, 0 now"]
    assert differences(old, defaults) == [
        "privacy.record: None in the run, {'enabled': False, 'clip': 1.0} now"]  # no defaults given: strict


def test_rewind_keeps_the_records_a_manifest_counts_and_drops_later_manifests(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path)
    buffer.commit(0, buffer.add([traj(1), traj(2)]))
    buffer.commit(1, buffer.add([traj(3)]))
    buffer.add([traj(4)])  # round 2 added this, then the run died before its manifest
    buffer.commit(2, [])
    again = Buffer(tmp_path)
    rewind(again, 0)
    assert [t.task_id for t in again.records] == [1, 2] and [t.task_id for t in Buffer(tmp_path).records] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("manifest_*")) == ["manifest_0.json"]
    assert again.add([traj(3)])  # a record dropped by the rewind is new again
    rewind(again, -1)
    assert len(Buffer(tmp_path)) == 0 and not list(tmp_path.glob("manifest_*"))


class Killed(BaseException):
    """Stands for kill -9: nothing after the raise runs (not an Exception, so no client-failure handling)."""


def dies_at(monkeypatch, name: str, call: int) -> None:
    """Make `fedse.federation.<name>` raise Killed on its `call`-th call (0-based) from now on."""
    real, calls = getattr(federation, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call + 1:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(federation, name, dying)


def final_sha(doc: dict) -> str:
    return doc["rounds"][-1]["global"]["sha256"]


# 2 clients x 2 rounds = 4 client rounds; dying at training call k leaves k of them finished, dying at upload k
# leaves k finished and one trained but not uploaded (it is retrained: nothing of it left the client)
@pytest.mark.parametrize(("where", "call"), [("local_train", 1), ("local_train", 2), ("local_train", 3),
                                             ("send_update", 0), ("send_update", 3), ("publish", 1)])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_adapter(micro_spec, seeds, tmp_path, monkeypatch,  # noqa: F811
                                                                where: str, call: int) -> None:
    cfg = smoke(micro_spec, seeds, "fedse", rounds=2)
    clean = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "clean").run()
    with monkeypatch.context() as patch:
        dies_at(patch, where, call)
        with pytest.raises(Killed):
            Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "killed").run()
    trained: list[int] = []
    real = federation.local_train
    monkeypatch.setattr(federation, "local_train",
                        lambda agent, cfg, start, data, seed, advance=None: trained.append(seed) or
                        real(agent, cfg, start, data, seed, advance))
    resumed = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "killed", resume=True).run()
    assert final_sha(resumed) == final_sha(clean)
    assert [r["round"] for r in resumed["rounds"]] == [0, 1]
    finished = {"local_train": call, "send_update": call, "publish": 2 * (call + 1)}[where]
    assert len(trained) == 4 - finished  # no finished client round is trained again
    for a, b in zip(clean["rounds"], resumed["rounds"], strict=True):
        assert a["envs"] == b["envs"] and a["global"]["sha256"] == b["global"]["sha256"]
        assert {c: s["buffer"] for c, s in a["clients"].items()} == {c: s["buffer"] for c, s in b["clients"].items()}


def test_local_clients_resume_from_their_own_adapters(micro_spec, seeds, tmp_path, monkeypatch) -> None:  # noqa: F811
    cfg = smoke(micro_spec, seeds, "local", rounds=2)
    clean = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "clean").run()
    with monkeypatch.context() as patch:
        dies_at(patch, "local_train", 3)
        with pytest.raises(Killed):
            Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "killed").run()
    resumed = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path / "killed", resume=True).run()
    own = [{c: s["adapter_sha256"] for c, s in doc["rounds"][-1]["clients"].items()} for doc in (clean, resumed)]
    assert own[0] == own[1] and clean["rounds"][-1]["envs"] == resumed["rounds"][-1]["envs"]


def test_resuming_with_other_parameters_or_no_run_is_one_line(micro_spec, seeds, tmp_path) -> None:  # noqa: F811
    cfg = smoke(micro_spec, seeds, "fedse", rounds=1)
    agent = load_agent(cfg.agent_spec(), seed=cfg.seed)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(ResumeError, match=r"no run\.json there"):
        Federation(agent, cfg, tmp_path / "other", resume=True)
    Federation(agent, cfg, tmp_path / "nothing", resume=True)  # killed before it wrote anything: starts afresh
    assert (tmp_path / "nothing" / "run.json").exists()
    Federation(agent, cfg, tmp_path / "run").run()
    other = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 3})})
    with pytest.raises(ResumeError, match=r"parameters differ from the run's: federation.rounds: 1 in the run, 3 now"):
        Federation(agent, other, tmp_path / "run", resume=True)
    (tmp_path / "run" / "run.json").write_text("{not json")
    with pytest.raises(ResumeError, match=r"run\.json is unreadable"):
        Federation(agent, cfg, tmp_path / "run", resume=True)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["complete"]


def test_resuming_a_finished_run_redoes_nothing(micro_spec, seeds, tmp_path, monkeypatch) -> None:  # noqa: F811
    cfg = smoke(micro_spec, seeds, "fedse", rounds=1)
    first = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path).run()
    monkeypatch.setattr(federation, "local_train", lambda *a, **k: pytest.fail("retrained a finished round"))
    again = Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path, resume=True).run()
    assert again["rounds"] == first["rounds"]
