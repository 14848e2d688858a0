"""BabyAI as a text game: minigrid's BabyAI levels behind high-level text actions, in AgentGym's style.

The grid world, the missions, the success check and the reward all come from PyPI ``minigrid`` (its BabyAI
levels); this module only turns the agent's partial view into sentences and typed commands into primitive
minigrid actions. One text action (``go to red ball 1``) may run several primitive steps (a shortest path
over the cells the agent has already seen, then a turn to face the object) but costs one turn, so that a
20-turn budget is enough for missions whose primitive solutions are 10-40 steps long.

Design choices a reader of trajectories should know:

* A task is a level, a mission and a world: task ``i`` plays level ``LEVELS[i % len(LEVELS)]`` (every level
  appears equally often among the test ids), and what it is to an agent (``content_key``) is the level, the
  mission, every cell of the grid (with door states and box contents) and the agent's start pose and load.
* Test task ``i`` is the level reset with ``seed=i``. Every other id ``i`` plays the first seed
  ``i + r * REDRAW_STRIDE`` (r = 0, 1, ...) whose instance is not held out: not a test instance, and for train
  and pretrain ids not a validation instance either. Distinct seeds are not enough, because a small level
  has few distinct worlds and two seeds can generate the same one (a few ids per 10,000); such an id would
  let a client train on a test task. r = 0 (the id itself) almost always stands, so worlds rarely move.
* The agent remembers every cell it has seen. Objects keep one name for the whole episode ("red ball 2" is
  the second red ball the agent ever saw), so a plan written three turns ago still refers to the same thing.
  As in AgentGym, actions on objects (go to, pick up, doors) are offered only for objects in view; the ones
  out of view are still described, so that a planner knows where to turn.
* Reward is BabyAI's ``1 - 0.9 * primitive_steps / max_steps`` on completion; success means the mission
  was completed (not reward == 1, which BabyAI never pays). Running out of the level's own primitive-step
  budget, or a strict ("Debug") level's wrong move, ends the episode without success.
* The expert rehearses minigrid's ``BabyAIBot`` on a copy of the world (the bot knows the cells we have
  seen, so it explores as it would on its own), takes the bot's next interaction that matters (pick up,
  drop, toggle, facing a go-to target; not the doors it opens only to peek), and reaches it with the
  fewest text actions. It keeps to one rehearsal while the world matches it, so that a manoeuvre such as
  "put the key down, move the blocker, fetch the key" is not abandoned half-way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium
import minigrid  # noqa: F401  (importing it registers the BabyAI-* gymnasium ids)
import numpy as np
from gymnasium.envs.registration import load_env_creator
from minigrid.core.world_object import WorldObj
from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
from minigrid.envs.babyai.core.verifier import (
    ActionInstr,
    AfterInstr,
    BeforeInstr,
    Instr,
    PutNextInstr,
)
from minigrid.utils.baby_ai_bot import BabyAIBot, DropSubgoal, GoNextToSubgoal, OpenSubgoal, PickupSubgoal

from fedse.envs.base import Outcome, TextEnv, first_free

#: The level mix (gymnasium ids without the ``BabyAI-`` prefix); task ``i`` plays ``LEVELS[i % 30]``, so each
#: level owns 3 of the 90 test tasks. It follows AgentGym's 40 BabyAI levels family by family, keeping the
#: levels whose missions the expert finishes within 20 text turns (the big 3x3-room mazes, the boss levels
#: and KeyInBox go; a smaller sibling stands in where one exists) and weighting the multi-step families
#: (put next to, unlock) so that random valid actions succeed about as rarely as in AgentGym (~0.23).
LEVELS: tuple[str, ...] = (
    # go to
    "GoToRedBallGrey-v0",
    "GoToObjDoor-v0",
    "GoToObjMazeS4-v0",
    "GoToObjMazeS4R2-v0",
    "GoToSeqS5R2-v0",
    # open
    "OpenDoorDebug-v0",
    "Open-v0",
    "OpenTwoDoors-v0",
    "OpenRedBlueDoorsDebug-v0",
    "OpenDoorsOrderN4-v0",
    # pick up
    "PickupLoc-v0",
    "PickupDist-v0",
    "PickupDistDebug-v0",
    "PickupAbove-v0",
    # put next to
    "PutNextLocal-v0",
    "PutNextLocalS5N3-v0",
    "PutNextLocalS6N4-v0",
    "PutNextS4N1-v0",
    "PutNextS5N1-v0",
    "PutNextS5N2-v0",
    "PutNextS6N3-v0",
    "PutNextS7N4-v0",
    "MoveTwoAcrossS5N2-v0",
    # unlock
    "UnlockLocal-v0",
    "UnlockLocalDist-v0",
    "UnlockPickup-v0",
    "UnlockPickupDist-v0",
    "BlockedUnlockPickup-v0",
    "KeyCorridorS3R1-v0",
    # mixed verbs
    "ActionObjDoor-v0",
)

# minigrid's primitive actions (MiniGridEnv.Actions) and direction vectors (agent_dir 0 = +x, 1 = +y, ...).
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)
DIR_VECS: tuple[tuple[int, int], ...] = ((1, 0), (0, 1), (-1, 0), (0, -1))
PICKABLE = ("key", "ball", "box")
_TYPE_ORDER = {"ball": 0, "box": 1, "key": 2, "door": 3}

Pose = tuple[int, int, int]  # x, y, direction

#: A non-test id's redraw r plays seed ``id + r * REDRAW_STRIDE``. The stride is above every id, so a redraw's
#: seed is never another id's seed, and r = 0 is the id itself (the world an id played before redraws).
REDRAW_STRIDE = 10_000_000
#: Instance keys remembered per process: exploration and seed writing reset thousands of tasks, many again.
_KEY_CACHE_LIMIT = 100_000
_KEYS: dict[tuple[str, int], str] = {}
#: One level object per level for computing keys, so that a key never disturbs an episode being played.
_SCRATCH: dict[str, RoomGridLevel] = {}


@dataclass(frozen=True)
class _Plan:
    """Primitive steps for one text action; `through` asks for one more step past a door once on it."""

    prims: tuple[int, ...]
    through: bool = False


@dataclass(frozen=True)
class _BotStep:
    """One primitive of the bot's rehearsal, with what the agent faced before taking it."""

    action: int
    pose: Pose
    front: tuple[int, int]
    completes: bool  # a clause of the mission was finished by this step
    front_after: tuple[int, int]


class _BoundedStack(list):
    """The bot's subgoal stack with a budget of pushes: on a few worlds its replanning never settles."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def append(self, item: Any) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise RuntimeError("the bot keeps replanning without acting")
        super().append(item)


def _make_level(level: str) -> RoomGridLevel:
    """Build a level object directly (no gym.make wrappers: they only add per-step checks we do not need)."""
    spec = gymnasium.spec(f"BabyAI-{level}")
    creator = load_env_creator(spec.entry_point)
    return creator(**spec.kwargs)


def _reset_quietly(env: RoomGridLevel, seed: int) -> dict[str, Any]:
    """Reset `env` to `seed`; minigrid's rejection sampling prints to stdout, and a training log is not the
    place for it."""
    with contextlib.redirect_stdout(io.StringIO()):
        obs, _ = env.reset(seed=seed)
    return obs


def _world_key(level: str, env: RoomGridLevel) -> str:
    """The content key of the instance `env` was just reset to: level and mission (readable), then a hash of
    every cell (type, colour, door state), what each box holds, and the agent's start pose and load."""
    boxed = [(i, cell.contains.type, cell.contains.color) for i, cell in enumerate(env.grid.grid)
             if cell is not None and cell.type == "box" and cell.contains is not None]
    load = None if env.carrying is None else (env.carrying.type, env.carrying.color)
    pose = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
    digest = hashlib.sha256(env.grid.encode().tobytes())
    digest.update(repr((env.width, env.height, pose, load, boxed)).encode())
    return f"{level}|{env.mission}|{digest.hexdigest()[:16]}"


def _remember(level: str, seed: int, env: RoomGridLevel) -> str:
    """Cache the key of `env`, just reset to (`level`, `seed`), so the same instance is never rebuilt for it."""
    key = _KEYS.get((level, seed))
    if key is None:
        if len(_KEYS) >= _KEY_CACHE_LIMIT:
            _KEYS.clear()
        key = _KEYS[(level, seed)] = _world_key(level, env)
    return key


def instance_key(level: str, seed: int) -> str:
    """The content key of `level` reset with `seed`: cached, else built on a scratch level object."""
    key = _KEYS.get((level, seed))
    if key is not None:
        return key
    scratch = _SCRATCH.get(level)
    if scratch is None:
        scratch = _SCRATCH[level] = _make_level(level)
    _reset_quietly(scratch, seed)
    return _remember(level, seed, scratch)


def _move(pose: Pose, prim: int) -> Pose:
    """The pose a primitive leads to, assuming a forward step is possible (callers check passability)."""
    x, y, d = pose
    if prim == LEFT:
        return x, y, (d - 1) % 4
    if prim == RIGHT:
        return x, y, (d + 1) % 4
    if prim == FORWARD:
        dx, dy = DIR_VECS[d]
        return x + dx, y + dy, d
    return pose


def _front(pose: Pose) -> tuple[int, int]:
    x, y, d = pose
    dx, dy = DIR_VECS[d]
    return x + dx, y + dy


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _normalize(text: str) -> str:
    """Lower-case, single-spaced, without wrapping quotes or a final full stop, with common aliases mapped."""
    key = " ".join(text.lower().split()).strip(" .\"'`")
    key = " ".join(key.split())
    if key in ("go forward", "forward", "move ahead"):
        return "move forward"
    if key.startswith("pickup "):
        return "pick up " + key[len("pickup ") :]
    return key


def _shown(text: str, limit: int = 60) -> str:
    """A short, printable echo of what the agent typed (it may be megabytes of control characters)."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text[: limit + 1])
    flat = " ".join(flat.split())
    return flat if len(text) <= limit else flat[:limit] + "..."


class BabyAIEnv(TextEnv):
    """BabyAI missions (go to / pick up / open / put next to / unlock) played with high-level text actions.

    Actions (exact strings are listed after every observation): ``turn left``, ``turn right``,
    ``move forward``, ``go to <color> <type> <n>``, ``pick up <color> <type> <n>``, ``drop``, ``toggle``,
    ``go through <color> door <n>``, ``toggle and go through <color> door <n>``.
    """

    name: ClassVar[str] = "babyai"
    max_turns: ClassVar[int] = 20
    test_ids: ClassVar[range] = range(0, 90)
    train_ids: ClassVar[range] = range(10_000, 210_000)
    levels: ClassVar[tuple[str, ...]] = LEVELS
    #: Offer object actions only for objects in view (AgentGym's rule); False also offers remembered ones,
    #: which makes the game easier for random play (≈0.34 success on the test ids instead of ≈0.24).
    in_view_only: ClassVar[bool] = True

    #: Primitive steps the expert lets the bot rehearse before giving up on a plan.
    _BOT_LIMIT: ClassVar[int] = 400
    #: Subgoals the bot may push during one rehearsal (its replanning loops forever on rare worlds).
    _BOT_PUSHES: ClassVar[int] = 600

    def __init__(self) -> None:
        super().__init__()
        self._levels: dict[str, RoomGridLevel] = {}
        self._env: RoomGridLevel | None = None
        self.level = ""
        self._seen = np.zeros((1, 1), dtype=bool)
        self._in_view: set[tuple[int, int]] = set()
        self._names: dict[int, str] = {}
        self._by_name: dict[str, WorldObj] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._version = 0
        self._cache_version = -1
        self._table: dict[str, _Plan] = {}
        self._order: list[str] = []
        self._dist: list[int] = []
        self._parent: list[int] = []
        self._plan: list[_BotStep] = []
        self._plan_marks: list[tuple[tuple[Any, ...], int]] = []
        self._plan_at = 0
        self._picked_from: tuple[int, int] | None = None

    # ------------------------------------------------------------------ what a task is
    @classmethod
    def level_of(cls, task_id: int) -> str:
        """The level task `task_id` plays: the level mix cycles with the id, redraws never change it."""
        return cls.levels[task_id % len(cls.levels)]

    @classmethod
    def seed_of(cls, task_id: int) -> int:
        """The minigrid seed task `task_id` plays: the id itself for a test id; for any other id the first
        redraw ``task_id + r * REDRAW_STRIDE`` whose world is not held out from it (see `banned_keys`)."""
        banned = cls.banned_keys(task_id)
        if not banned:
            return task_id
        level = cls.level_of(task_id)
        redraw = first_free(task_id, banned, lambda r: instance_key(level, task_id + r * REDRAW_STRIDE),
                            f"{cls.name} {level}")
        return task_id + redraw * REDRAW_STRIDE

    @classmethod
    def content_key(cls, task_id: int) -> str:
        """Level, mission and a hash of the world and the agent's start (see `_world_key`)."""
        level = cls.level_of(task_id)
        return instance_key(level, cls.seed_of(task_id))

    # ------------------------------------------------------------------ episode
    def _reset(self, task_id: int) -> str:
        self.level = self.level_of(task_id)
        env = self._levels.get(self.level)
        if env is None:
            env = self._levels[self.level] = _make_level(self.level)
        # Play redraw 0 and note its key before asking for the seed: it almost always stands, so the usual
        # reset costs one level reset instead of one on the scratch object for the key plus one here.
        obs = _reset_quietly(env, task_id)
        _remember(self.level, task_id, env)
        seed = self.seed_of(task_id)
        if seed != task_id:
            obs = _reset_quietly(env, seed)
        self._env = env
        self._version += 1  # a new world: every cached action list is stale
        self._seen = np.zeros((env.width, env.height), dtype=bool)
        self._names, self._by_name, self._counts = {}, {}, {}
        self._plan, self._plan_marks, self._plan_at = [], [], 0
        self._picked_from = None
        if env.carrying is not None:
            self._name_of(env.carrying)
        self._observe(obs)
        return f"Your goal: {env.mission}\n{self._describe()}"

    def instruction(self) -> str:
        return "" if self._env is None else str(self._env.mission)

    def _step(self, action: str) -> Outcome:
        if self._env is None:
            return Outcome("No task is loaded; call reset() first.", valid=False)
        key = _normalize(action)
        plan = self._actions().get(key)
        if plan is None:
            return Outcome(f"{self._invalid_feedback(key, action)}\n{self._describe()}", valid=False)
        reward, terminated, truncated = self._execute(plan)
        text = self._describe(done=terminated or truncated)
        if terminated and reward > 0:
            return Outcome(
                f"You completed the mission. {text}", reward=float(reward), done=True, success=True
            )
        if terminated:
            return Outcome(f"The mission failed: that broke its rules. {text}", done=True)
        if truncated:
            steps = self._env.max_steps
            return Outcome(f"You ran out of time ({steps} primitive steps). {text}", done=True)
        return Outcome(text)

    def _execute(self, plan: _Plan) -> tuple[float, bool, bool]:
        """Run the primitives; stop as soon as the level ends (a go-to can complete a mission mid-path)."""
        env = self._env
        assert env is not None
        self._version += 1
        reward, terminated, truncated = 0.0, False, False
        prims = list(plan.prims)
        i = 0
        while i < len(prims):
            if prims[i] == PICKUP:
                self._picked_from = (int(env.front_pos[0]), int(env.front_pos[1]))
            obs, reward, terminated, truncated, _ = env.step(prims[i])
            self._observe(obs)
            i += 1
            if terminated or truncated:
                break
            if i == len(prims) and plan.through and self._free(env.front_pos):
                cell = env.grid.get(*env.agent_pos)
                if cell is not None and cell.type == "door":
                    prims.append(FORWARD)
        return float(reward), terminated, truncated

    # ------------------------------------------------------------------ memory and names
    def _observe(self, obs: dict[str, Any]) -> None:
        """Mark what is in view as seen and name newly seen objects, nearest first (ties by position)."""
        env = self._env
        assert env is not None
        image = obs["image"]
        size = image.shape[0]
        ax, ay = int(env.agent_pos[0]), int(env.agent_pos[1])
        fx, fy = DIR_VECS[env.agent_dir]
        rx, ry = -fy, fx
        tx, ty = ax + fx * (size - 1) - rx * (size // 2), ay + fy * (size - 1) - ry * (size // 2)
        view: set[tuple[int, int]] = set()
        for i, j in zip(*np.nonzero(image[:, :, 0]), strict=True):
            x, y = tx - fx * int(j) + rx * int(i), ty - fy * int(j) + ry * int(i)
            if 0 <= x < env.width and 0 <= y < env.height:
                view.add((x, y))
                self._seen[x, y] = True
        self._in_view = view
        fresh = []
        for x, y in view:
            cell = env.grid.get(x, y)
            if cell is not None and cell.type in _TYPE_ORDER and id(cell) not in self._names:
                fresh.append((abs(x - ax) + abs(y - ay), x, y, cell))
        for *_, cell in sorted(fresh, key=lambda t: t[:3]):
            self._name_of(cell)

    def _name_of(self, obj: WorldObj) -> str:
        name = self._names.get(id(obj))
        if name is None:
            group = (obj.color, obj.type)
            self._counts[group] = self._counts.get(group, 0) + 1
            name = f"{obj.color} {obj.type} {self._counts[group]}"
            self._names[id(obj)] = name
            self._by_name[name] = obj
        return name

    def _known(self) -> list[tuple[str, WorldObj, tuple[int, int]]]:
        """Objects on seen cells (the carried one is not on the grid), in a stable order."""
        env = self._env
        assert env is not None
        found = []
        for x, y in zip(*np.nonzero(self._seen), strict=True):
            obj = env.grid.get(int(x), int(y))
            if obj is not None and obj.type in _TYPE_ORDER:
                found.append((self._name_of(obj), obj, (int(x), int(y))))
        found.sort(key=lambda t: (_TYPE_ORDER[t[1].type], t[1].color, int(t[0].rsplit(" ", 1)[1])))
        return found

    # ------------------------------------------------------------------ geometry and paths
    def _free(self, pos: Iterable[int]) -> bool:
        """Can the agent stand there? (empty, or an open door)."""
        env = self._env
        assert env is not None
        x, y = (int(v) for v in pos)
        if not (0 <= x < env.width and 0 <= y < env.height):
            return False
        cell = env.grid.get(x, y)
        return cell is None or (cell.type == "door" and cell.is_open)

    def _search(self) -> None:
        """Breadth-first search over poses through seen, free cells; turns and steps cost one primitive."""
        env = self._env
        assert env is not None
        w, h = env.width, env.height
        free = [[self._seen[x, y] and self._free((x, y)) for y in range(h)] for x in range(w)]
        dist = [-1] * (w * h * 4)
        parent = [-1] * (w * h * 4)
        start = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        s0 = (start[1] * w + start[0]) * 4 + start[2]
        dist[s0] = 0
        queue = deque([start])
        while queue:
            pose = queue.popleft()
            si = (pose[1] * w + pose[0]) * 4 + pose[2]
            for prim in (FORWARD, LEFT, RIGHT):
                nxt = _move(pose, prim)
                if prim == FORWARD and not (0 <= nxt[0] < w and 0 <= nxt[1] < h and free[nxt[0]][nxt[1]]):
                    continue
                ni = (nxt[1] * w + nxt[0]) * 4 + nxt[2]
                if dist[ni] < 0:
                    dist[ni] = dist[si] + 1
                    parent[ni] = si * 8 + prim
                    queue.append(nxt)
        self._dist, self._parent = dist, parent

    def _path_to(self, pose: Pose) -> tuple[int, ...] | None:
        env = self._env
        assert env is not None
        w = env.width
        idx = (pose[1] * w + pose[0]) * 4 + pose[2]
        if not (0 <= pose[0] < env.width and 0 <= pose[1] < env.height) or self._dist[idx] < 0:
            return None
        prims: list[int] = []
        while self._dist[idx] > 0:
            link = self._parent[idx]
            prims.append(link % 8)
            idx = link // 8
        return tuple(reversed(prims))

    def _path_facing(self, pos: tuple[int, int]) -> tuple[int, ...] | None:
        """Shortest primitives that end next to `pos` and looking at it."""
        best: tuple[int, ...] | None = None
        for d, (dx, dy) in enumerate(DIR_VECS):
            path = self._path_to((pos[0] - dx, pos[1] - dy, d))
            if path is not None and (best is None or len(path) < len(best)):
                best = path
        return best

    def _path_onto(self, pos: tuple[int, int]) -> tuple[int, ...] | None:
        """Shortest primitives that end standing on `pos` (an open door)."""
        best: tuple[int, ...] | None = None
        for d in range(4):
            path = self._path_to((pos[0], pos[1], d))
            if path is not None and (best is None or len(path) < len(best)):
                best = path
        return best

    # ------------------------------------------------------------------ actions
    def _actions(self) -> dict[str, _Plan]:
        """Every admissible text action with its primitive plan; recomputed only when the world changed."""
        if self._cache_version == self._version:
            return self._table
        env = self._env
        assert env is not None
        self._search()
        table: dict[str, _Plan] = {"turn left": _Plan((LEFT,)), "turn right": _Plan((RIGHT,))}
        front = env.grid.get(*env.front_pos)
        carrying = env.carrying
        if self._free(env.front_pos):
            table["move forward"] = _Plan((FORWARD,))
        if carrying is not None and front is None:
            table["drop"] = _Plan((DROP,))
        if front is not None and front.type == "door" and self._can_toggle(front):
            table["toggle"] = _Plan((TOGGLE,))
        goto: dict[str, _Plan] = {}
        pick: dict[str, _Plan] = {}
        doors: dict[str, _Plan] = {}
        here = (int(env.agent_pos[0]), int(env.agent_pos[1]))
        for name, obj, pos in self._known():
            if self.in_view_only and pos not in self._in_view and pos != here:
                continue
            facing = self._path_facing(pos)
            if facing is not None:
                goto[f"go to {name}"] = _Plan(facing or (DONE,))
                if obj.type in PICKABLE and carrying is None:
                    pick[f"pick up {name}"] = _Plan((*facing, PICKUP))
            if obj.type != "door":
                continue
            if obj.is_open and pos != here:
                onto = self._path_onto(pos)
                if onto is not None:
                    doors[f"go through {name}"] = _Plan(onto, through=True)
            elif not obj.is_open and facing is not None and self._can_toggle(obj):
                doors[f"toggle and go through {name}"] = _Plan((*facing, TOGGLE, FORWARD), through=True)
        table.update(goto)
        table.update(pick)
        table.update(doors)
        self._table, self._order, self._cache_version = table, list(table), self._version
        return table

    def _can_toggle(self, door: WorldObj) -> bool:
        env = self._env
        assert env is not None
        if not door.is_locked:
            return True
        key = env.carrying
        return key is not None and key.type == "key" and key.color == door.color

    def admissible_actions(self) -> list[str]:
        if self._env is None:
            return []
        self._actions()
        return list(self._order)

    def _invalid_feedback(self, key: str, raw: str) -> str:
        """Say why the action cannot be done, naming the object and the reason when we can tell."""
        env = self._env
        assert env is not None
        if not key:
            return "You typed no action."
        front = env.grid.get(*env.front_pos)
        what = self._thing(front)
        if key == "move forward":
            return f"You cannot move forward: {what} is in the way."
        if key == "drop":
            if env.carrying is None:
                return "You cannot drop: you are not carrying anything."
            return f"You cannot drop here: {what} is right in front of you."
        if key == "toggle":
            if front is None or front.type != "door":
                return "You cannot toggle: there is no door right in front of you."
            return f"You cannot toggle the {what}: it is locked and you do not carry a {front.color} key."
        for verb in ("toggle and go through ", "go through ", "go to ", "pick up "):
            if key.startswith(verb):
                return self._object_feedback(verb.strip(), key[len(verb) :])
        return f"'{_shown(raw)}' is not a valid action."

    def _object_feedback(self, verb: str, target: str) -> str:
        env = self._env
        assert env is not None
        known = {name: (obj, pos) for name, obj, pos in self._known()}
        carried = None if env.carrying is None else self._names.get(id(env.carrying))
        if target == carried:
            return f"You cannot {verb} the {target}: you are carrying it."
        if target not in known:
            names = ", ".join(known) or "nothing yet"
            return (
                f"You cannot {verb} '{_shown(target, 40)}': you know of no such object (you know: {names})."
            )
        obj, pos = known[target]
        if (
            self.in_view_only
            and pos not in self._in_view
            and pos != (int(env.agent_pos[0]), int(env.agent_pos[1]))
        ):
            return f"You cannot {verb} the {target}: it is out of view; turn until you see it."
        if verb == "pick up":
            if obj.type not in PICKABLE:
                return f"You cannot pick up the {target}."
            if env.carrying is not None:
                return (
                    f"You cannot pick up the {target}: you are already carrying the {carried}; drop it first."
                )
        if verb in ("go through", "toggle and go through") and obj.type != "door":
            return f"You cannot {verb} the {target}: it is not a door."
        if verb == "go through" and not obj.is_open:
            return f"You cannot go through the {target}: it is {self._door_state(obj)}; toggle it first."
        if verb == "toggle and go through" and obj.is_open:
            return f"You cannot toggle and go through the {target}: it is already open; go through it."
        if verb == "toggle and go through" and not self._can_toggle(obj):
            return f"You cannot open the {target}: it is locked and you do not carry a {obj.color} key."
        return f"You cannot {verb} the {target}: no path you know of leads there."

    # ------------------------------------------------------------------ text
    @staticmethod
    def _door_state(door: WorldObj) -> str:
        return "open" if door.is_open else "locked" if door.is_locked else "closed"

    def _thing(self, cell: WorldObj | None) -> str:
        if cell is None:
            return "nothing"
        if cell.type == "wall":
            return "a wall"
        name = self._names.get(id(cell), f"{cell.color} {cell.type}")
        if cell.type == "door":
            return f"the {name} ({self._door_state(cell)})"
        return f"the {name}"

    def _relative(self, pos: tuple[int, int]) -> str:
        env = self._env
        assert env is not None
        vx, vy = pos[0] - int(env.agent_pos[0]), pos[1] - int(env.agent_pos[1])
        fx, fy = DIR_VECS[env.agent_dir]
        ahead, right = vx * fx + vy * fy, -vx * fy + vy * fx
        parts = []
        if ahead:
            parts.append(_plural(abs(ahead), "step") + (" ahead" if ahead > 0 else " behind"))
        if right:
            parts.append(_plural(abs(right), "step") + (" to your right" if right > 0 else " to your left"))
        return " and ".join(parts)

    def _ahead(self) -> str:
        """What lies straight ahead, up to the first thing that is not empty floor."""
        env = self._env
        assert env is not None
        pose = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        for steps in range(env.agent_view_size):
            pos = _front(pose)
            pose = (pos[0], pos[1], pose[2])
            if pos not in self._in_view:
                return f"Ahead of you: at least {_plural(steps, 'free cell')}."
            cell = env.grid.get(*pos)
            if cell is not None:
                if steps == 0:
                    return f"Right in front of you: {self._thing(cell)}."
                return f"Ahead of you: {_plural(steps, 'free cell')}, then {self._thing(cell)}."
        return f"Ahead of you: at least {_plural(env.agent_view_size, 'free cell')}."

    def _describe(self, done: bool = False) -> str:
        """The agent's view in words: objects in view and remembered, what is straight ahead, its load, and
        (while the episode runs) the actions it may take."""
        env = self._env
        assert env is not None
        here = (int(env.agent_pos[0]), int(env.agent_pos[1]))
        in_view, remembered = [], []
        for name, obj, pos in sorted(
            self._known(), key=lambda t: abs(t[2][0] - here[0]) + abs(t[2][1] - here[1])
        ):
            label = f"{name} ({self._door_state(obj)})" if obj.type == "door" else name
            where = self._relative(pos)
            entry = f"{label} at {where}" if where else f"{label} where you stand"
            (in_view if pos in self._in_view or pos == here else remembered).append(entry)
        lines = [f"In view: {'; '.join(in_view)}." if in_view else "In view: no objects."]
        if remembered:
            lines.append(f"Out of view, remembered: {'; '.join(remembered)}.")
        lines.append(self._ahead())
        carried = env.carrying
        lines.append(
            f"You are carrying the {self._name_of(carried)}." if carried else "You are carrying nothing."
        )
        if not done:
            lines.append("Available actions: " + ", ".join(self.admissible_actions()) + ".")
        return "\n".join(lines)

    # ------------------------------------------------------------------ expert
    def expert_action(self) -> str:
        """The text action that carries out the BabyAIBot's next needed interaction (see the module notes)."""
        options = self.admissible_actions()
        if not options:
            return "turn left"
        try:
            action = self._expert_choice()
        except Exception:  # the bot asserts on states it never produces itself; fall back to looking around
            action = None
        return action if action in self._table else options[0]

    def _expert_choice(self) -> str | None:
        """Follow the bot's last rehearsal while the world is where it predicted, else rehearse afresh.

        Keeping the plan matters for the bot's multi-step manoeuvres (put the key down, move a blocker,
        fetch the key again): a fresh bot asked half-way would start a different plan and undo the first.
        """
        env = self._env
        assert env is not None
        signature = self._signature(env)
        # the earliest point of the plan, not before where we already are, whose world matches ours
        starts = [start for mark, start in self._plan_marks if mark == signature and start >= self._plan_at]
        if starts:
            self._plan_at = min(starts)
            action = self._translate(self._plan[self._plan_at :], fresh=False)
            if action is not None:
                return action
        trace, marks = self._rehearse()
        self._plan, self._plan_marks, self._plan_at = trace or [], marks, 0
        return self._translate(trace, fresh=True) if trace else None

    def _translate(self, trace: list[_BotStep], fresh: bool) -> str | None:
        """Phrase the bot's next needed interaction (pick up, drop, toggle, face a go-to target) as text."""
        env = self._env
        assert env is not None
        table = self._actions()
        first = trace[0].action if fresh else None
        event = next(k for k, s in enumerate(trace) if self._essential(trace, k))
        step = trace[event]
        if step.action not in (PICKUP, DROP, TOGGLE):  # a go-to clause finishes: face what the bot faces then
            return self._expert_reach(step.front_after, "go to", first)
        front = tuple(int(v) for v in env.front_pos)
        if step.action == TOGGLE and front == step.front and "toggle" in table:
            return "toggle"
        if step.action == DROP:
            later = trace[event + 1 :]
            again = any(s.action == PICKUP and s.front == step.front for s in later)
            cells = self._drop_cells(step.front, anywhere=not again and not step.completes)
            # never where the rest of the plan walks or reaches (that is how blockers get in the way)
            cells -= {s.pose[:2] for s in later} | {s.front for s in later if s.action != FORWARD}
            cells.discard(self._picked_from)  # putting a blocker back where it was would undo the work
            cells.add(step.front)
            if "drop" in table and front in cells:
                return "drop"
            return self._expert_nav(lambda p: _front(p) in cells, first, step.front)
        if step.action == PICKUP:
            return self._expert_reach(step.front, "pick up", first)
        # toggle: open a door and walk through when the bot does (or when opening completes the mission)
        walks = event + 1 == len(trace) or trace[event + 1].action == FORWARD
        obj = env.grid.get(*step.front)
        name = self._names.get(id(obj), "")
        if walks and f"toggle and go through {name}" in table:
            return f"toggle and go through {name}"
        return self._expert_reach(step.front, "go to", first)

    @staticmethod
    def _essential(trace: list[_BotStep], k: int) -> bool:
        """Is step `k` an interaction the plan needs? The bot opens doors just to look behind them; knowing
        the world, we skip every door it opens but never walks through."""
        step = trace[k]
        if step.completes:
            return True
        if step.action == TOGGLE:
            return any(s.action == FORWARD and s.front == step.front for s in trace[k + 1 :])
        return step.action in (PICKUP, DROP)

    def _expert_reach(self, pos: tuple[int, int], verb: str, first: int | None) -> str | None:
        """`verb` the object at `pos` if we can name and reach it; otherwise move so that we can."""
        env = self._env
        assert env is not None
        obj = env.grid.get(*pos)
        name = self._names.get(id(obj)) if obj is not None else None
        if name is not None and f"{verb} {name}" in self._table:
            return f"{verb} {name}"
        if name is None or not self._seen[pos]:
            return self._expert_nav(lambda p: self._visible_from(p, pos), first, pos, along=True)
        return self._expert_nav(lambda p: _front(p) == pos, first, pos)

    def _drop_cells(self, bot_cell: tuple[int, int], anywhere: bool) -> set[tuple[int, int]]:
        """Where a drop serves the plan: the bot's cell, any free cell next to a put-next anchor, and, for
        an object the plan never touches again, any nearby cell where it blocks nothing."""
        env = self._env
        assert env is not None
        cells = {bot_cell}
        for instr in self._pending(env.instrs):
            if isinstance(instr, PutNextInstr) and any(o is env.carrying for o in instr.desc_move.obj_set):
                for ax, ay in instr.desc_fixed.obj_poss:
                    for dx, dy in DIR_VECS:
                        cell = (ax + dx, ay + dy)
                        if self._seen[cell] and env.grid.get(*cell) is None:
                            cells.add(cell)
                return cells
        if anywhere:
            cells |= self._harmless_cells()
        return cells

    def _harmless_cells(self) -> set[tuple[int, int]]:
        """Free cells near us where an object could be put down without cutting the reachable floor into
        pieces or walling in an object or a door (so whatever the plan does next stays possible)."""
        env = self._env
        assert env is not None
        agent = (int(env.agent_pos[0]), int(env.agent_pos[1]))
        floor = self._flood(agent, blocked=None)
        things = set()
        for x, y in floor:
            for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                cell = env.grid.get(*nxt)
                if cell is not None and cell.type != "wall" and nxt not in floor:
                    things.add(nxt)
        harmless = set()
        for cell in floor:
            near = abs(cell[0] - agent[0]) + abs(cell[1] - agent[1]) <= 6
            if cell == agent or not near or env.grid.get(*cell) is not None:
                continue
            rest = self._flood(agent, blocked=cell)
            if len(rest) == len(floor) - 1 and all(
                any(n in rest for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1))) for x, y in things
            ):
                harmless.add(cell)
        return harmless

    def _flood(self, start: tuple[int, int], blocked: tuple[int, int] | None) -> set[tuple[int, int]]:
        """Cells reachable from `start` over free floor (empty or open doors), avoiding `blocked`."""
        seen = {start}
        stack = [start]
        while stack:
            x, y = stack.pop()
            for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if nxt not in seen and nxt != blocked and self._free(nxt):
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    def _expert_nav(
        self, goal: Callable[[Pose], bool], first: int | None, toward: tuple[int, int], along: bool = False
    ) -> str | None:
        """The navigation action that reaches a pose satisfying `goal` in the fewest turns (then primitives).

        Each candidate is one admissible movement action followed by up to three single primitives. If none
        gets there, the candidate that ends closest to `toward` (by true walking distance) is taken as long
        as it gets closer; failing that, the bot's own next primitive `first` (when the plan is fresh).
        """
        env = self._env
        assert env is not None
        best: tuple[int, int, int, str] | None = None
        closer: tuple[int, int, int, str] | None = None
        start = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        distance = self._walking_distances(toward)
        now = distance.get(start[:2], 10**6)
        for rank, (text, plan) in enumerate(self._table.items()):
            if not (
                text in ("turn left", "turn right", "move forward")
                or text.startswith(("go to", "go through"))
            ):
                continue
            poses = [start]
            for prim in plan.prims:
                if prim != DONE:
                    poses.append(_move(poses[-1], prim))
            if plan.through and self._free(_front(poses[-1])):
                poses.append(_move(poses[-1], FORWARD))
            hit = any(goal(p) for p in poses[1:]) if along else goal(poses[-1])
            extra = 0 if hit else self._primitive_distance(poses[-1], goal, 3)
            if extra is not None:
                cand = (1 + extra, len(poses) - 1 + extra, rank, text)
                best = cand if best is None or cand < best else best
            gap = distance.get(poses[-1][:2], 10**6)
            if gap < now:
                cand = (gap, len(poses) - 1, rank, text)
                closer = cand if closer is None or cand < closer else closer
        if best is not None:
            return best[3]
        if closer is not None:
            return closer[3]
        return {LEFT: "turn left", RIGHT: "turn right", FORWARD: "move forward"}.get(first or -1)

    def _walking_distances(self, target: tuple[int, int]) -> dict[tuple[int, int], int]:
        """Steps from each free cell to a cell next to `target` (or onto it, when it is free), for real."""
        starts = [target] if self._free(target) else []
        x, y = target
        starts += [n for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)) if self._free(n)]
        distance = dict.fromkeys(starts, 0)
        queue = deque(starts)
        while queue:
            cx, cy = queue.popleft()
            for nxt in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                if nxt not in distance and self._free(nxt):
                    distance[nxt] = distance[(cx, cy)] + 1
                    queue.append(nxt)
        return distance

    def _primitive_distance(self, pose: Pose, goal: Callable[[Pose], bool], depth: int) -> int | None:
        frontier, seen = [pose], {pose}
        for level in range(1, depth + 1):
            nxt = []
            for p in frontier:
                for prim in (LEFT, RIGHT, FORWARD):
                    q = _move(p, prim)
                    if q in seen or (prim == FORWARD and not self._free(q[:2])):
                        continue
                    if goal(q):
                        return level
                    seen.add(q)
                    nxt.append(q)
            frontier = nxt
        return None

    def _visible_from(self, pose: Pose, target: tuple[int, int]) -> bool:
        """Would the agent see `target` from `pose`? (minigrid's own occlusion, run at a borrowed pose)."""
        env = self._env
        assert env is not None
        size = env.agent_view_size
        vx, vy = target[0] - pose[0], target[1] - pose[1]
        fx, fy = DIR_VECS[pose[2]]
        ahead, right = vx * fx + vy * fy, -vx * fy + vy * fx
        if not (0 <= ahead < size and abs(right) <= size // 2):
            return False
        saved = env.agent_pos, env.agent_dir
        try:
            env.agent_pos, env.agent_dir = (pose[0], pose[1]), pose[2]
            _, vis = env.gen_obs_grid()
        finally:
            env.agent_pos, env.agent_dir = saved
        return bool(vis[size // 2 + right, size - 1 - ahead])

    def _rehearse(self) -> tuple[list[_BotStep] | None, list[tuple[tuple[Any, ...], int]]]:
        """The bot's primitive plan for what is left of the mission, or None if it does not succeed.

        The bot runs on a deep copy of the world and knows exactly the cells we have seen, so it explores
        as it would on its own. Its stack is rebuilt from the clauses still pending, because a fresh bot
        would otherwise redo (and undo) finished ones.
        """
        env = self._env
        assert env is not None
        sim = copy.deepcopy(env)
        bot = BabyAIBot(sim)
        bot.vis_mask = self._seen.copy()
        bot.stack = _BoundedStack(self._BOT_PUSHES)
        holding = False
        for instr in reversed(self._pending(sim.instrs)):
            if isinstance(instr, PutNextInstr) and any(o is sim.carrying for o in instr.desc_move.obj_set):
                holding = True
                # half done: the bot would look for the object we already hold; only the placing is left
                bot.stack.append(DropSubgoal(bot))
                bot.stack.append(GoNextToSubgoal(bot, instr.desc_fixed, reason="PutNext"))
            else:
                bot._process_instr(instr)
        if sim.carrying is not None and not holding and not self._opens_locked_door(sim, sim.carrying):
            # what the bot itself does after using a key or picking something up: put it down out of the way
            bot.stack.append(DropSubgoal(bot))
            bot.stack.append(GoNextToSubgoal(bot, bot._find_drop_pos()))
        trace: list[_BotStep] = []
        marks = [(self._signature(sim), 0)]
        left = len(self._pending(sim.instrs))
        repairs = 0
        try:
            for _ in range(self._BOT_LIMIT):
                for subgoal in bot.stack:
                    if isinstance(subgoal, OpenSubgoal) and subgoal.reason == "KeepKey":
                        # a fresh bot that already holds the key would keep it after unlocking and then
                        # fumble around blockers with full hands; drop it after unlocking, as it usually does
                        subgoal.reason = None
                try:
                    action = int(bot.replan())
                except AssertionError:
                    # A fresh bot may face its pick-up target while still holding something (a key it kept
                    # after unlocking): put that down nearby, come back, and let it carry on.
                    if repairs >= 3 or sim.carrying is None or not isinstance(bot.stack[-1], PickupSubgoal):
                        return None, []
                    repairs += 1
                    bot.stack.append(GoNextToSubgoal(bot, tuple(int(v) for v in sim.front_pos)))
                    bot.stack.append(DropSubgoal(bot))
                    bot.stack.append(GoNextToSubgoal(bot, bot._find_drop_pos()))
                    continue
                pose = (int(sim.agent_pos[0]), int(sim.agent_pos[1]), int(sim.agent_dir))
                _, reward, terminated, truncated, _ = sim.step(action)
                now = 0 if terminated else len(self._pending(sim.instrs))
                after = (int(sim.front_pos[0]), int(sim.front_pos[1]))
                trace.append(_BotStep(action, pose, _front(pose), now < left, after))
                if action in (PICKUP, DROP, TOGGLE) or now < left:
                    marks.append((self._signature(sim), len(trace)))
                left = now
                if terminated or truncated:
                    return (trace, marks) if terminated and reward > 0 else (None, [])
        except Exception:  # any bot failure just means: no advice from the bot this turn
            return None, []
        return None, []

    def _signature(self, world: RoomGridLevel) -> tuple[Any, ...]:
        """Everything a plan depends on except the agent's pose: objects, door states, load, clauses left."""
        width = world.width
        cells = tuple(
            (i % width, i // width, cell.type, cell.color, cell.is_open, cell.is_locked)
            if cell.type == "door"
            else (i % width, i // width, cell.type, cell.color)
            for i, cell in enumerate(world.grid.grid)
            if cell is not None and cell.type != "wall"
        )
        load = None if world.carrying is None else (world.carrying.type, world.carrying.color)
        return load, cells, len(self._pending(world.instrs))

    @staticmethod
    def _opens_locked_door(sim: RoomGridLevel, obj: WorldObj) -> bool:
        """Is `obj` the key to a door that is still locked (so that the bot should keep holding it)?"""
        if obj.type != "key":
            return False
        for x in range(sim.width):
            for y in range(sim.height):
                cell = sim.grid.get(x, y)
                if cell is not None and cell.type == "door" and cell.is_locked and cell.color == obj.color:
                    return True
        return False

    @staticmethod
    def _pending(instr: Instr) -> list[ActionInstr]:
        """The action clauses still to do, in the order the bot should do them."""
        if isinstance(instr, ActionInstr):
            return [instr]
        a_done = getattr(instr, "a_done", False) == "success"
        b_done = getattr(instr, "b_done", False) == "success"
        if isinstance(instr, AfterInstr):  # "a after you b": b comes first
            parts = [(instr.instr_b, b_done), (instr.instr_a, False)]
        elif isinstance(instr, BeforeInstr):  # "a, then b"
            parts = [(instr.instr_a, a_done), (instr.instr_b, False)]
        else:  # AndInstr: both, in any order
            parts = [(instr.instr_a, a_done), (instr.instr_b, b_done)]
        return [clause for part, done in parts if not done for clause in BabyAIEnv._pending(part)]
