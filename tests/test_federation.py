"""The round loop on the micro model: every method is a configuration of it, and its numbers add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedse.aggregate import AggregationError
from fedse.config import Config, ConfigError, load_config
from fedse.envs.registry import env_class
from fedse.federation import Federation, explore_task_ids, keep
from fedse.methods import method
from fedse.model import ModelSpec, load_agent, read_adapter
from fedse.seed import write_seed_file
from fedse.trajectory import Trajectory, Turn, read_jsonl

ENVS = ["maze", "wordle"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    for env in ENVS:
        write_seed_file(env, 6, folder, seed=0)
    return folder


def smoke(micro_spec: ModelSpec, seeds: Path, method: str, **federation: object) -> Config:
    cfg = load_config("params.yaml", profile="smoke", overrides=[f"federation.method={method}"])
    fed = cfg.federation.model_copy(update={"seeds_per_client": 6, "explore_episodes": 3, "eval_episodes": 2,
                                            **federation})
    return cfg.model_copy(update={"model": micro_spec, "federation": fed,
                                  "envs": cfg.envs.model_copy(update={"names": ENVS}),
                                  "seed_data": cfg.seed_data.model_copy(update={"dir": seeds})})


def run(cfg: Config, out: Path) -> dict:
    return Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, out).run()


def with_aggregation(cfg: Config, **aggregation: object) -> Config:
    return cfg.model_copy(update={"aggregation": cfg.aggregation.model_copy(update=aggregation)})


def test_fedse_rounds_grow_the_buffer_and_publish_a_global_adapter(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "fedse"), tmp_path)
    assert doc["complete"] and [r["round"] for r in doc["rounds"]] == [0, 1]
    assert json.loads((tmp_path / "metrics.json").read_text()) == doc
    r0, r1 = doc["rounds"]
    for env in ENVS:
        c0, c1 = r0["clients"][env], r1["clients"][env]
        assert c0["explored"] == c1["explored"] == 3
        assert c0["buffer"] == 6 + c0["added"] - 6 == c0["trained_on"] and c0["added"] >= 6
        assert c1["buffer"] == c0["buffer"] + c1["added"] == c1["trained_on"]
        assert c1["bytes_sent"] > 0 and c1["tokens"] > 0
        manifest = json.loads((tmp_path / "buffers" / env / "manifest_1.json").read_text())
        assert manifest["count"] == c1["buffer"] and manifest["sources"]["expert"] == 6
        own = manifest["sources"].get("agent", 0)
        assert c1["self_share"] == manifest["self_share"] == own / c1["buffer"]
        assert c0["self_added"] + c1["self_added"] == own
        assert (c1["length_ratio"] is None) == (c1["self_added"] == 0)
        assert r1["envs"][env]["n"] == 2
        assert c1["explore_decisions"] >= 3 and c1["explore_seconds"] > 0  # the exploration's pace
        assert r1["envs"][env]["episodes"] == 2 and len(r1["envs"][env]["task_success"]) == 2
    assert r1["eval_decisions"] >= 2 * len(ENVS) and r1["eval_seconds"] > 0
    g0, g1 = (read_adapter(tmp_path / "adapters" / f"round_{t}") for t in (0, 1))
    assert r0["global"]["sha256"] != r1["global"]["sha256"] and any(not (g0[k] == g1[k]).all() for k in g0)
    assert (tmp_path / "adapters" / "round_1" / "fedse.json").exists()
    assert 0 <= r1["macro"] <= 1 and r1["macro_ci95"][0] <= r1["macro"] <= r1["macro_ci95"][1]


def test_no_history_trains_only_on_this_rounds_data(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "no_history", rounds=3, final_eval_episodes=3), tmp_path)
    for env in ENVS:
        c1 = doc["rounds"][1]["clients"][env]
        assert c1["trained_on"] == c1["added"] < c1["buffer"]
        # the first and last rounds are evaluated on more test tasks than the ones between, which only draw the
        # curve, on validation tasks
        assert [r["envs"][env]["n"] for r in doc["rounds"]] == [3, 2, 3]
        assert [r["split"] for r in doc["rounds"]] == ["test", "val", "test"]
        assert {env_class(env).split_of(i) for i in doc["rounds"][1]["envs"][env]["task_ids"]} == {"val"}
        assert {env_class(env).split_of(i) for r in (0, 2) for i in doc["rounds"][r]["envs"][env]["task_ids"]} \
            == {"test"}


def test_static_baselines_neither_explore_nor_mix(micro_spec, seeds, tmp_path: Path) -> None:
    fedit = run(smoke(micro_spec, seeds, "fedit", rounds=1), tmp_path / "fedit")
    assert all(c["explored"] == 0 and c["trained_on"] == 6 for c in fedit["rounds"][0]["clients"].values())
    local = run(smoke(micro_spec, seeds, "local", rounds=1), tmp_path / "local")
    assert "global" not in local["rounds"][0]
    assert all(c["bytes_sent"] == 0 for c in local["rounds"][0]["clients"].values())
    central = run(smoke(micro_spec, seeds, "centralized", rounds=1), tmp_path / "central")
    assert list(central["rounds"][0]["clients"]) == ["pooled"]
    assert central["rounds"][0]["clients"]["pooled"]["trained_on"] == 12
    base = run(smoke(micro_spec, seeds, "pretrained"), tmp_path / "base")
    assert len(base["rounds"]) == 1 and "clients" not in base["rounds"][0]


def test_local_se_explores_and_trains_alone_without_a_server(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "local_se"), tmp_path)
    r0, r1 = doc["rounds"]
    assert "global" not in r1 and "exchange" not in doc and not (tmp_path / "exchange").exists()
    for env in ENVS:
        c0, c1 = r0["clients"][env], r1["clients"][env]
        assert c0["explored"] == c1["explored"] == 3 and c1["bytes_sent"] == 0
        assert c1["buffer"] == c0["buffer"] + c1["added"] == c1["trained_on"]
    # without a server each client evaluates its own adapter, never an average
    assert r1["clients"]["maze"]["adapter_sha256"] != r1["clients"]["wordle"]["adapter_sha256"]


def test_best_of_k_exploration_keeps_one_shortest_success_per_task(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "fedse", explore_episodes=4, explore_attempts=2), tmp_path)
    assert doc["settings"]["explore_attempts"] == 2
    for env in ENVS:
        agent = [t for t in read_jsonl(tmp_path / "buffers" / env / "buffer.jsonl") if t.policy == "agent"]
        for round in (0, 1):
            assert doc["rounds"][round]["clients"][env]["explored"] == 4  # 2 tasks x 2 attempts
            mine = [t.task_id for t in agent if t.round == round]
            assert len(mine) == len(set(mine)) <= 2


def test_keep_applies_best_of_k_only_to_successes_and_only_with_several_attempts() -> None:
    def episode(task: int, turns: int, success: bool) -> Trajectory:
        return Trajectory(env="maze", task_id=task, instruction="go", final_observation="end",
                          turns=[Turn(observation="o", action=f"a{i}") for i in range(turns)],
                          reward=float(success), success=success, policy="agent", round=0)
    fresh = [episode(1, 6, True), episode(1, 3, True), episode(1, 1, False), episode(2, 4, True)]
    assert [len(t.turns) for t in keep(fresh, method("fedse"), attempts=2)] == [3, 4]
    assert [len(t.turns) for t in keep(fresh, method("fedse"))] == [6, 3, 4]  # the paper's filter
    assert len(keep(fresh, method("no_filter"), attempts=2)) == 4


def test_explore_episodes_must_be_a_multiple_of_the_attempts() -> None:
    with pytest.raises(ValueError, match="not a multiple of explore_attempts"):
        load_config("params.yaml", overrides=["federation.explore_episodes=5", "federation.explore_attempts=2"])


@pytest.mark.parametrize(("rule", "rank"), [("exact", 2 * 8), ("fedsvd", 8)])
def test_exact_rules_run_end_to_end_and_log_no_aggregation_error(micro_spec, seeds, tmp_path: Path, rule: str,
                                                                 rank: int) -> None:
    cfg = with_aggregation(smoke(micro_spec, seeds, "fedse"), rule=rule, server_lr=1.5)
    doc = run(cfg, tmp_path)
    assert doc["aggregation"]["rule"] == rule and doc["aggregation"]["server_lr"] == 1.5
    for record in doc["rounds"]:
        info = record["aggregation"]
        assert info["rule"] == rule
        if rule == "fedsvd":  # B̄A is exact: A is shared
            assert info["agg_error"] < 1e-4
        else:  # clients train every rank-K·r component, so the mean's tail beyond K·r is cut (and logged)
            assert info["retained_energy"] > 0.99 and info["agg_error"] == pytest.approx(
                (1 - info["retained_energy"]) ** 0.5, rel=1e-3)
    g = read_adapter(tmp_path / "adapters" / "round_1")
    a = next(v for k, v in g.items() if "lora_A" in k)
    assert a.shape[0] == rank  # exact: K·r (2 clients × r 8); fedsvd keeps r
    if rule == "fedsvd":
        assert torch.allclose(a @ a.T, torch.eye(rank), atol=1e-4)


def test_factor_averaging_logs_its_cross_term(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "fedse", rounds=1), tmp_path)
    assert doc["aggregation"]["rule"] == "factors" and doc["rounds"][0]["aggregation"]["agg_error"] > 0


def test_no_filter_keeps_failures(micro_spec, seeds, tmp_path: Path) -> None:
    doc = run(smoke(micro_spec, seeds, "no_filter", rounds=1, explore_episodes=4), tmp_path)
    for env in ENVS:
        c = doc["rounds"][0]["clients"][env]
        assert c["added"] == 6 + 4  # every explored episode enters (they differ from the expert's)
        assert c["successes_trained_on"] == 6 + round(c["explore_success"] * 4)


def test_the_server_averages_exactly_what_went_through_the_exchange(micro_spec, seeds, tmp_path: Path) -> None:
    from fedse.aggregate import average
    from fedse.model import state_hash

    doc = run(smoke(micro_spec, seeds, "fedse", rounds=1), tmp_path)
    experiment = doc["exchange"]["experiment"]
    exchange = tmp_path / "exchange"
    uploads = {env: read_adapter(exchange / f"client_{env}" / experiment / "round_0" / "adapter.safetensors")
               for env in ENVS}
    for env, state in uploads.items():  # fp32: the upload is the client's trained adapter, bit for bit
        assert state_hash(state) == doc["rounds"][0]["clients"][env]["adapter_sha256"]
    mean = average((env, state, 1.0) for env, state in uploads.items())
    saved = read_adapter(tmp_path / "adapters" / "round_0")
    broadcast = read_adapter(exchange / "server" / experiment / "round_0" / "global" / "adapter.safetensors")
    assert all(torch.equal(saved[k], mean[k]) and torch.equal(broadcast[k], mean[k]) for k in mean)
    assert (tmp_path / "egress" / doc["exchange"]["experiment"] / "client_maze.jsonl").exists()


def test_bf16_transfer_halves_the_bytes_and_clients_use_what_was_broadcast(micro_spec, seeds, tmp_path: Path) -> None:
    fp32 = run(smoke(micro_spec, seeds, "fedse"), tmp_path / "fp32")
    cfg = smoke(micro_spec, seeds, "fedse")
    bf16 = run(cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"dtype": "bf16"})}),
               tmp_path / "bf16")
    for r32, r16 in zip(fp32["rounds"], bf16["rounds"], strict=True):
        payload = r32["global"]["bytes"]  # the fp32 tensors; the rest of an object is its safetensors header
        for sent32, sent16 in [(r32["global"]["bytes_sent"], r16["global"]["bytes_sent"])] + [
                (r32["clients"][env]["bytes_sent"], r16["clients"][env]["bytes_sent"]) for env in ENVS]:
            assert abs(sent32 - sent16 - payload / 2) < 0.01 * payload
        assert all(r16["clients"][env]["transfer_dtype"] == "bf16" for env in ENVS)
    g = read_adapter(tmp_path / "bf16" / "adapters" / "round_0")  # the evaluated global is the broadcast one
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in g.values())


def test_eval_split_val_uses_validation_ids(micro_spec) -> None:
    from fedse.federation import eval_task_ids

    cfg = load_config("params.yaml", profile="smoke", overrides=["federation.eval_split=val"])
    ids = eval_task_ids(cfg, "maze", 0)
    assert len(ids) == 4 and all(env_class("maze").split_of(i) == "val" for i in ids)
    test = load_config("params.yaml", profile="smoke")
    assert all(env_class("maze").split_of(i) == "test" for i in eval_task_ids(test, "maze", 1))


def test_only_the_reported_rounds_play_test_tasks_and_all_means_the_whole_test_set() -> None:
    from fedse.federation import eval_task_ids, scored_split

    cfg = load_config("params.yaml", profile="smoke", overrides=[
        "federation.rounds=4", "federation.eval_episodes=3", "federation.final_eval_episodes=all"])
    maze = env_class("maze")
    assert [scored_split(cfg, r) for r in range(4)] == ["test", "val", "val", "test"]
    assert eval_task_ids(cfg, "maze", 0) == eval_task_ids(cfg, "maze", 3) == list(maze.test_ids)
    assert eval_task_ids(cfg, "maze", 1) == eval_task_ids(cfg, "maze", 2) == list(maze.validation_ids())[:3]
    before = load_config("params.yaml", profile="smoke", overrides=[
        "federation.rounds=4", "federation.eval_episodes=3", "federation.curve_split=test"])
    assert [scored_split(before, r) for r in range(4)] == ["test"] * 4
    assert eval_task_ids(before, "maze", 2) == list(maze.test_ids)[:3]
    calibrating = load_config("params.yaml", profile="smoke", overrides=[
        "federation.rounds=4", "federation.eval_split=val", "federation.curve_split=test"])
    assert {scored_split(calibrating, r) for r in range(4)} == {"val"}
    with pytest.raises(ConfigError, match="final_eval_episodes"):
        load_config("params.yaml", profile="smoke", overrides=["federation.final_eval_episodes=0"])


def test_explore_ids_are_fresh_per_round_and_never_validation_or_test() -> None:
    a, b = explore_task_ids("maze", 0, 50, 0), explore_task_ids("maze", 1, 50, 0)
    assert a != b and a == explore_task_ids("maze", 0, 50, 0) and len(set(a)) == 50
    cls = env_class("maze")
    assert all(cls.split_of(i) == "train" for i in a + b)


def test_a_used_run_folder_is_refused(micro_spec, seeds, tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        run(smoke(micro_spec, seeds, "fedse"), tmp_path)


def test_missing_seed_file_is_one_clear_line(micro_spec, tmp_path: Path) -> None:
    cfg = smoke(micro_spec, tmp_path / "nowhere", "fedse")
    with pytest.raises(ValueError, match=r"maze\.jsonl: seed trajectories of run seed 0 not found"):
        run(cfg, tmp_path / "out")


def scaled_upload(monkeypatch: pytest.MonkeyPatch, fed: Federation) -> Federation:
    """`fed` with its `wordle` client uploading its round-0 update scaled 100x (a broken or hostile client)."""
    import fedse.federation as federation

    real = federation.send_update

    def send(transport, cfg, folder, round, client, state, weight, **kw):
        if client == "wordle":
            state = {k: fed.initial[k] + 100 * (v - fed.initial[k]) for k, v in state.items()}
        return real(transport, cfg, folder, round, client, state, weight, **kw)

    monkeypatch.setattr(federation, "send_update", send)
    return fed


def test_a_scaled_upload_is_screened_out_and_the_round_goes_on_with_a_quorum(micro_spec, seeds, tmp_path,
                                                                            monkeypatch) -> None:
    cfg = smoke(micro_spec, seeds, "fedse", rounds=1, quorum=1)
    doc = scaled_upload(monkeypatch, Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path)).run()
    info = doc["rounds"][0]["aggregation"]
    assert [r["client"] for r in info["rejected"]] == ["wordle"] and "max_norm_ratio" in info["rejected"][0]["reason"]
    assert info["clients"] == 1 and doc["aggregation"]["max_norm_ratio"] == 10.0


def test_below_the_quorum_the_round_fails_naming_the_rejected_client(micro_spec, seeds, tmp_path,
                                                                     monkeypatch) -> None:
    cfg = smoke(micro_spec, seeds, "fedse", rounds=1)  # 2 clients: a majority is both
    fed = scaled_upload(monkeypatch, Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, tmp_path))
    with pytest.raises(AggregationError, match=r"below the quorum of 2; missing: wordle \(rejected: update norm"):
        fed.run()


def test_a_failing_client_is_missing_and_the_round_goes_on_with_a_quorum(micro_spec, seeds, tmp_path,
                                                                         monkeypatch) -> None:
    import fedse.federation as federation

    real = federation.local_train

    def wordle_breaks(agent, cfg, start, data, seed, advance=None):
        if data and data[0].env == "wordle":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return real(agent, cfg, start, data, seed, advance)

    monkeypatch.setattr(federation, "local_train", wordle_breaks)
    cfg = smoke(micro_spec, seeds, "fedse", rounds=1, quorum=1)
    doc = run(cfg, tmp_path / "quorum")
    r0 = doc["rounds"][0]
    reason = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert r0["aggregation"]["missing"] == {"wordle": reason} and r0["aggregation"]["clients"] == 1
    assert r0["clients"]["wordle"] == {"failed": reason} and r0["clients"]["maze"]["steps"] > 0
    with pytest.raises(AggregationError, match="below the quorum of 2; missing: wordle \\(RuntimeError: CUDA error"):
        run(smoke(micro_spec, seeds, "fedse", rounds=1), tmp_path / "majority")


def test_participants_are_a_seeded_draw_of_the_configured_size_in_client_order() -> None:
    from fedse.federation import first_round, last_round, participants

    cfg = load_config("params.yaml", profile="full", overrides=["federation.clients_per_round=2"])
    names = cfg.client_envs()
    draws = [participants(cfg, r) for r in range(cfg.federation.rounds)]
    assert all(len(d) == 2 and d == [n for n in names if n in d] for d in draws)
    assert draws == [participants(cfg, r) for r in range(cfg.federation.rounds)]  # a resumed run draws the same
    assert len({tuple(d) for d in draws}) > 1  # afresh each round
    for name in names:
        rounds = [r for r, d in enumerate(draws) if name in d]
        assert first_round(cfg, name) == (rounds[0] if rounds else cfg.federation.rounds)
        assert last_round(cfg, name, 10) == max([r for r in rounds if r <= 10], default=-1)
    everyone = load_config("params.yaml", profile="full")
    assert participants(everyone, 3) == everyone.client_envs()
    with pytest.raises(ValueError, match="clients_per_round: 9 is more than the 5 clients"):
        load_config("params.yaml", profile="full", overrides=["federation.clients_per_round=9"])


@pytest.mark.parametrize("name", ["fedse", "local"])
def test_partial_participation_trains_only_the_drawn_clients_and_seeds_each_once(micro_spec, seeds, tmp_path: Path,
                                                                                 name: str) -> None:
    from fedse.federation import first_round, participants

    cfg = smoke(micro_spec, seeds, name, rounds=3, clients_per_round=1)
    doc = run(cfg, tmp_path)
    assert doc["settings"]["clients_per_round"] == 1
    for r, record in enumerate(doc["rounds"]):
        assert record["participants"] == participants(cfg, r) and list(record["clients"]) == record["participants"]
        if name == "fedse":
            assert record["aggregation"]["clients"] == 1
    for env in ENVS:
        folder = tmp_path / "buffers" / env
        taken = sorted(int(p.stem.split("_")[1]) for p in folder.glob("manifest_*.json")) if folder.exists() else []
        assert taken == [r for r in range(3) if env in participants(cfg, r)]
        if taken:
            assert taken[0] == first_round(cfg, env)
            first = json.loads((folder / f"manifest_{taken[0]}.json").read_text())
            records = list(read_jsonl(folder / "buffer.jsonl"))
            assert first["sources"]["expert"] == 6 and sum(t.policy == "expert" for t in records) == 6


def test_several_organisations_per_env_get_disjoint_seeds_and_their_own_explored_tasks(micro_spec, seeds,
                                                                                       tmp_path: Path) -> None:
    """`federation.orgs_per_env: 2`: clients maze-1, maze-2, wordle-1, wordle-2, each with its own block of its
    env's seed file and its own sample of explored tasks; one client per env keeps the paper's names and
    draws."""
    from fedse.federation import client_seeds, seed_records

    cfg = smoke(micro_spec, seeds, "fedse", rounds=1, orgs_per_env=2, seeds_per_client=3)
    assert cfg.client_names() == ["maze-1", "maze-2", "wordle-1", "wordle-2"]
    first, second = (client_seeds(cfg, name, ["maze"], 0) for name in ("maze-1", "maze-2"))
    assert len(first) == len(second) == 3
    assert {t.content_hash for t in first}.isdisjoint(t.content_hash for t in second)
    assert [t.content_hash for t in first + second] == [t.content_hash for t in read_jsonl(seeds / "s0" / "maze.jsonl")]
    assert explore_task_ids("maze", 0, 3, 0, "maze-1") != explore_task_ids("maze", 0, 3, 0, "maze-2")
    assert explore_task_ids("maze", 0, 3, 0, "maze") == explore_task_ids("maze", 0, 3, 0)  # the paper's draws
    with pytest.raises(ValueError, match="asks for 4 per client for 2 organisations"):
        seed_records(smoke(micro_spec, seeds, "fedse", orgs_per_env=2, seeds_per_client=4), "maze", 1)
    doc = run(cfg, tmp_path)
    assert sorted(doc["rounds"][0]["clients"]) == cfg.client_names()
    assert sorted(doc["rounds"][0]["envs"]) == ENVS and doc["settings"]["orgs_per_env"] == 2
    assert doc["rounds"][0]["aggregation"]["clients"] == 4
    assert load_config("params.yaml", profile="smoke").client_names() == load_config("params.yaml").envs.names


def test_exploring_unsolved_tasks_passes_over_solved_content_and_tops_up_when_too_few_are_left() -> None:
    from fedse.envs.wordle import WordleEnv, secrets
    from fedse.federation import UNSOLVED_DRAWS, explore_candidates

    game = WordleEnv()
    train = secrets("common")["train"]
    solved = {f"common:fixed:{w}" for w in train[:-5]}  # all but five secrets solved
    picked = explore_task_ids("wordle", 0, 8, 0, solved=solved, key=game.content_key)
    candidates = explore_candidates("wordle", 0, 8, 0, unsolved=True)
    assert len(candidates) == 8 * UNSOLVED_DRAWS and set(picked) <= set(candidates)
    unsolved = list(dict.fromkeys(game.content_key(t) for t in candidates if game.content_key(t) not in solved))
    keys = [game.content_key(t) for t in picked]
    assert len(picked) == 8 and len(set(picked)) == 8
    assert 0 < len(unsolved) < 8 and keys[:len(unsolved)] == unsolved, "each unsolved task once, first"
    assert all(k in solved for k in keys[len(unsolved):]), "then solved ones to fill the budget"
    assert explore_task_ids("wordle", 0, 8, 0, solved=None) == explore_task_ids("wordle", 0, 8, 0)  # the paper's
    assert explore_task_ids("wordle", 0, 8, 0) == explore_candidates("wordle", 0, 8, 0)


def test_the_experience_levers_run_in_the_round_loop(micro_spec, seeds, tmp_path: Path) -> None:
    """buffer.keep shortest + buffer.prune + explore_unsolved with best-of-3: one success per task, none longer
    than needed, and no explored task already solved before its round."""
    from fedse.buffer import Buffer
    from fedse.envs.registry import make_env

    cfg = smoke(micro_spec, seeds, "fedse", explore_attempts=3, explore_unsolved=True, rounds=2)
    cfg = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(update={"keep": "shortest", "prune": True})})
    doc = run(cfg, tmp_path)
    assert doc["complete"]
    for env in ENVS:
        game = make_env(env)
        records = Buffer(tmp_path / "buffers" / env).records
        keys = [game.content_key(t.task_id) for t in records if t.success]
        assert len(keys) == len(set(keys)), "one success per task"
        manifest = json.loads((tmp_path / "buffers" / env / "manifest_1.json").read_text())
        assert "superseded_hashes" in manifest and manifest["rows"] >= manifest["count"]


def test_own_records_are_capped_at_a_multiple_of_the_seeds_newest_first() -> None:
    from fedse.federation import mix

    def rec(i: int, policy: str) -> Trajectory:
        return Trajectory(env="maze", task_id=i, instruction="go", turns=[Turn(observation="o", action="a")],
                          final_observation="end", reward=1.0, success=True, policy=policy)

    data = [rec(0, "expert"), rec(1, "expert"), *[rec(i, "agent") for i in range(2, 9)]]
    assert mix(data, None) == data
    assert [t.task_id for t in mix(data, 1.0)] == [0, 1, 7, 8]
    assert [t.task_id for t in mix(data, 0.0)] == [0, 1]
    assert mix(data, 10.0) == data


def test_equal_steps_give_every_client_the_same_optimizer_steps() -> None:
    import random

    from fedse.learner import Example, LearnerSpec, schedule

    few, many = [Example([1, 2], [1, 2])] * 3, [Example([1, 2, 3], [1, 2, 3])] * 40
    spec = LearnerSpec(steps=10, batch_size=2, grad_accum=2)
    assert len(schedule(few, spec, random.Random(0))) == len(schedule(many, spec, random.Random(0))) == 20
    assert len(schedule(many, LearnerSpec(epochs=1, batch_size=2), random.Random(0))) == 20


def test_personal_b_clients_keep_their_b_and_each_env_is_scored_with_its_own(micro_spec, seeds, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """aggregation.personal b (FedSA-LoRA): round 1 starts from the global A and the client's own round-0 B, and
    each environment is evaluated with the global A and its own client's B."""
    from fedse import federation
    from fedse.checkpoint import client_file, load_state

    starts: list[dict] = []
    scored: list[dict] = []
    train, evaluate = federation.local_train, federation.InProcess.evaluate

    def recorded_train(agent, cfg, start, *args, **kwargs):
        starts.append(start)
        return train(agent, cfg, start, *args, **kwargs)

    def recorded_evaluate(self, fed, round, states):
        scored.append(states)
        return evaluate(self, fed, round, states)

    monkeypatch.setattr(federation, "local_train", recorded_train)
    monkeypatch.setattr(federation.InProcess, "evaluate", recorded_evaluate)
    cfg = with_aggregation(smoke(micro_spec, seeds, "fedse"), personal="b")
    doc = run(cfg, tmp_path)
    assert doc["complete"] and doc["aggregation"]["personal"] == "b"
    global0 = read_adapter(tmp_path / "adapters" / "round_0")
    global1 = read_adapter(tmp_path / "adapters" / "round_1")
    for i, env in enumerate(ENVS):
        own0, own1 = (load_state(client_file(tmp_path, env, r, ".safetensors")) for r in (0, 1))
        start = starts[len(ENVS) + i]  # round 1, clients in order
        for key, value in start.items():
            expected = own0[key] if ".lora_B." in key else global0[key]
            assert torch.equal(value, expected), (env, key)
        for key, value in scored[1][env].items():
            assert torch.equal(value, own1[key] if ".lora_B." in key else global1[key]), (env, key)
    assert any(not torch.equal(scored[1]["maze"][k], scored[1]["wordle"][k]) for k in scored[1]["maze"])


def test_personal_needs_the_factor_rule_and_one_client_per_env_on_the_server() -> None:
    with pytest.raises(ValueError, match="only rule factors averages A alone"):
        load_config("params.yaml", overrides=["aggregation.personal=b", "aggregation.rule=exact"])
    with pytest.raises(ValueError, match="inprocess and dask modes with one client per environment"):
        load_config("params.yaml", overrides=["aggregation.personal=b", "orchestration.mode=workers"])


@pytest.mark.parametrize("attack", ["altered", "weight"])
def test_a_bad_upload_costs_only_its_client_the_round(attack: str, micro_spec, seeds, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's altered tensors, or a declared weight beyond what it can have earned, rejects that client
    with its reason; the quorum (1 here) lets the round aggregate the other."""
    from fedse.transport import Transport

    sent = Transport.upload

    def upload(self, round, client, state, metadata, request=None):  # wordle's organisation misbehaves
        if client == "wordle" and attack == "weight":
            metadata = {"successes": 10_000}
        done = sent(self, round, client, state, metadata, request)
        if client == "wordle" and attack == "altered":
            path = self.local_dir / done.key
            blob = bytearray(path.read_bytes())
            blob[-1] ^= 1
            path.write_bytes(bytes(blob))
        return done

    monkeypatch.setattr(Transport, "upload", upload)
    doc = run(smoke(micro_spec, seeds, "weighted", rounds=1, quorum=1), tmp_path)
    record = doc["rounds"][0]
    why = record["aggregation"]["missing"]["wordle"]
    assert why.startswith("upload refused:") and ("altered" in why if attack == "altered" else "declares weight "
                                                  "10000; at most 9 successes" in why)
    assert record["clients"]["wordle"]["refused"] == why and "refused" not in record["clients"]["maze"]
    assert doc["complete"] and record["global"]["sha256"]
