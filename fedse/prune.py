"""Pruning an own success by replay: the same task, fewer turns, verified by the client's own environment.

A weak policy's successes are lucky walks: loops (back to a state it already left) and steps that change
nothing (a move into a wall, `inventory`, an invalid word). Imitating them teaches the detours too. Every
environment here is deterministic by task id, so a client can replay a success in its own environment with
steps left out and keep the shorter episode only if the environment still reports success: no label beyond
the success signal the filter already trusts, and nothing leaves the organisation.

Only steps that taught the agent nothing are candidates: a step the environment refused (invalid action), a
step after which the agent saw exactly what it saw before (nothing changed), and a loop (the observation after
step j repeats the one after an earlier step i: steps i+1 … j are cut). An informative step, say a Wordle guess
that got feedback, is never dropped even when the task would still be solved without it: the episode must
stay one the agent could have played from what it saw. Each cut is kept only when the replay still succeeds.
The result is a new record (its observations from the replay) with the original's provenance.
"""

from __future__ import annotations

from typing import Any

from fedse.envs.registry import make_env
from fedse.trajectory import Trajectory, Turn

#: Replays one trajectory may cost (each at most max_turns steps): bounds the work on a long episode.
MAX_REPLAYS = 64


def replay(traj: Trajectory, steps: list[int], options: dict[str, Any] | None = None,
           ) -> tuple[Trajectory | None, list[bool]]:
    """Play `traj`'s actions at `steps` (indices, in order) on its task: the episode if it succeeds (else None),
    and whether the environment accepted each action played. It stops where the environment ends the episode."""
    env = make_env(traj.env, **(options or {}))
    observation, info = env.reset(traj.task_id)
    turns: list[Turn] = []
    valid: list[bool] = []
    reward = 0.0
    for i in steps:
        turn = traj.turns[i]
        turns.append(Turn(observation=observation, action=turn.action, thought=turn.thought))
        observation, reward, terminated, truncated, info = env.step(turn.action)
        valid.append(bool(info["valid_action"]))
        if terminated or truncated:
            break
    if not info["success"]:
        return None, valid
    provenance = traj.model_dump(include={"policy", "adapter_hash", "round", "seed", "temperature"})
    return Trajectory(env=traj.env, task_id=traj.task_id, instruction=env.instruction(), turns=turns,
                      final_observation=observation, reward=reward, success=True, **provenance), valid


def prune(traj: Trajectory, options: dict[str, Any] | None = None) -> Trajectory:
    """`traj` without its loops and no-op steps, where the replay still succeeds; else `traj` itself."""
    if not traj.success or len(traj.turns) < 2:
        return traj
    steps = list(range(len(traj.turns)))
    best, valid = replay(traj, steps, options)
    if best is None:  # not reproducible in this environment (other options?): keep it as it came
        return traj
    budget = MAX_REPLAYS - 1
    for loop in (False, True):  # first the no-op steps, then the loops of what is left
        i = 0
        seen: dict[str, int] = {}
        while i < len(steps) and budget > 0:
            before = best.turns[i].observation
            after = best.turns[i + 1].observation if i + 1 < len(best.turns) else best.final_observation
            if loop:
                cut = steps[:seen[after] + 1] + steps[i + 1:] if after in seen else None
            else:
                # the first observation is the task, then the state: a step that leaves the state shows it alone
                unchanged = after == before or before.endswith("\n" + after)
                cut = steps[:i] + steps[i + 1:] if (not valid[i] or unchanged) and i + 1 < len(steps) else None
            if cut is not None:
                budget -= 1
                shorter, shorter_valid = replay(traj, cut, options)
                if shorter is not None and len(shorter.turns) < len(best.turns):
                    best, steps, valid = shorter, cut[:len(shorter.turns)], shorter_valid
                    i = seen[after] + 1 if loop else i
                    seen = {best.turns[k + 1].observation: k for k in range(i)} if loop else seen
                    continue
            seen[after] = i
            i += 1
    return best if len(best.turns) < len(traj.turns) else traj
