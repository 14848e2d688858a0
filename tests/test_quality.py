"""Experience quality: the self-generated share and the length of the agent's successes vs the expert's."""

from __future__ import annotations

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.quality import experience, expert_length, length_ratio
from fedse.scripted import expert_policy, random_policy


def play(policy, ids: list[int], who: str):
    pool = EnvPool(lambda: make_env("maze"), ids)
    pool.run(policy)
    return pool.trajectories("maze", policy=who)


def test_the_experts_own_episodes_have_ratio_one_and_detours_more() -> None:
    ids = list(range(10_100, 10_110))
    expert = play(expert_policy(), ids, "agent")  # relabelled: the agent played exactly as the expert
    assert length_ratio(expert) == 1.0
    lucky = [t for t in play(random_policy(0), ids * 3, "agent") if t.success]
    if lucky:  # a random walk that succeeds is never shorter than the shortest path
        assert length_ratio(lucky) >= 1.0
    assert all(expert_length("maze", i) == len(t.turns) for i, t in zip(ids, expert, strict=True))


def test_experience_counts_only_the_agents_records() -> None:
    seeds = play(expert_policy(), [10_200, 10_201, 10_202], "expert")
    own = play(expert_policy(), [10_203], "agent")
    stats = experience(seeds + own, own)
    assert stats["self_share"] == 0.25 and stats["self_added"] == 1 and stats["length_ratio"] == 1.0
    assert experience(seeds, seeds)["length_ratio"] is None and experience([], [])["self_share"] == 0.0
