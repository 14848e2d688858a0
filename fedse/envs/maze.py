"""Maze (LMRL-Gym): walk a grid to the goal from text about walls and positions.

A task *is* its layout, start and goal. The clients' world is LMRL-Gym's fixed 10×13 double-T maze; its
tasks are the (start, goal) pairs whose shortest path takes MIN_PATH to 15 moves (506 pairs). They are
partitioned once, at random: 25 test pairs, 50 validation pairs, the rest (431) for the clients' seeds and
exploration. So a test task is a held-out instance of the training distribution (same maze, a start/goal
pair never trained on), and a trained agent can be told from a random walker. (LMRL-Gym tests the 25 starts
of one goal, (8, 6); holding out that goal made every test task out of distribution here, and every method
scored the random rate.) Seeded random mazes of the same size, a different layout each, make up the rest of
the train range and the pretrain range: the base model's general competence, never a client's maze.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from functools import lru_cache
from typing import ClassVar

from fedse.envs.base import Outcome, TextEnv, partition

Cell = tuple[int, int]

DOUBLE_T = (
    "1111111111111",
    "1000001000001",
    "1110111110111",
    "1110111110111",
    "1110111110111",
    "1110000000111",
    "1111110111111",
    "1111110111111",
    "1111110111111",
    "1111111111111",
)
DOUBLE_T_GOAL: Cell = (8, 6)

MOVES: dict[str, Cell] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WALL_WORDS = {"left": "to your left", "right": "to your right", "up": "above you", "down": "below you"}
ACTIONS = [f"move {d}" for d in ("up", "down", "left", "right")]
_ACTION_RE = re.compile(r"^\s*(?:move\s+)?(up|down|left|right)\s*\.?\s*$", re.IGNORECASE)


def free_cells(grid: tuple[str, ...]) -> list[Cell]:
    """Open cells in reading order; the order defines the task enumeration, so it must be stable."""
    return [(r, c) for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == "0"]


MIN_PATH = 3  # pairs one or two moves apart are solved by chance too often to measure anything
#: Double-T pairs per split, held-out parts first (fedse.envs.base.partition); train takes the rest.
SPLITS = {"test": 25, "val": 50, "train": -1}


@lru_cache(maxsize=1)
def double_t_pairs(max_len: int = 15) -> dict[str, tuple[tuple[Cell, Cell], ...]]:
    """Split name -> its (start, goal) pairs on the double-T, MIN_PATH to `max_len` moves apart."""
    cells = free_cells(DOUBLE_T)
    pairs = [(s, g) for g in cells for s in cells
             if s != g and MIN_PATH <= len(shortest_path(DOUBLE_T, s, g)) <= max_len]
    return {name: tuple(part) for name, part in partition(pairs, SPLITS, salt="double-t-pairs").items()}


def layout_name(grid: tuple[str, ...]) -> str:
    """A short stable name of a layout (the double-T by name, any other by a hash of its cells)."""
    return "double-t" if grid == DOUBLE_T else "maze-" + hashlib.sha256("/".join(grid).encode()).hexdigest()[:12]


def distances(grid: tuple[str, ...], start: Cell) -> dict[Cell, int]:
    """BFS distance from `start` to every reachable cell."""
    dist = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nxt = (r + dr, c + dc)
            if grid[nxt[0]][nxt[1]] == "0" and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


def random_maze(seed: int, rows: int = 10, cols: int = 13) -> tuple[str, ...]:
    """A perfect maze (one path between any two cells) by randomised DFS on odd cells, plus a few loops.

    Perfect mazes make dead ends common, which is what the double-T tests: an agent must learn to back out.
    """
    rng = random.Random(seed)
    grid = [["1"] * cols for _ in range(rows)]
    start = (1, 1)
    grid[1][1] = "0"
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc, dr, dc) for dr, dc in ((0, 2), (0, -2), (2, 0), (-2, 0))
                   if 0 < r + dr < rows - 1 and 0 < c + dc < cols - 1 and grid[r + dr][c + dc] == "1"]
        if not options:
            stack.pop()
            continue
        nr, nc, dr, dc = rng.choice(options)
        grid[r + dr // 2][c + dc // 2] = "0"
        grid[nr][nc] = "0"
        stack.append((nr, nc))
    for _ in range(rng.randint(0, 3)):  # a few loops so there is sometimes more than one way
        r, c = rng.randrange(1, rows - 1), rng.randrange(1, cols - 1)
        if grid[r][c] == "1" and (r % 2) != (c % 2):
            grid[r][c] = "0"
    return tuple("".join(row) for row in grid)


def shortest_path(grid: tuple[str, ...], start: Cell, goal: Cell) -> list[str]:
    """Directions of one shortest path (BFS, fixed move order so the expert is deterministic)."""
    parents: dict[Cell, tuple[Cell, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        for name, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if grid[nxt[0]][nxt[1]] == "0" and nxt not in parents:
                parents[nxt] = (cell, name)
                queue.append(nxt)
    if goal not in parents:
        return []
    path: list[str] = []
    cell = goal
    while (link := parents[cell]) is not None:
        cell, name = link
        path.append(name)
    return path[::-1]


class MazeEnv(TextEnv):
    """Navigate to the goal; the observation names the goal, the position and the adjacent walls."""

    name = "maze"
    max_turns = 15
    test_ids = range(0, 25)
    train_ids = range(10_000, 10_000 + 1_000_000)
    VALIDATION: ClassVar[int] = SPLITS["val"]

    def __init__(self) -> None:
        super().__init__()
        self.grid: tuple[str, ...] = DOUBLE_T
        self.pos: Cell = (0, 0)
        self.goal: Cell = DOUBLE_T_GOAL

    @classmethod
    def explore_ids(cls) -> range:
        """The double-T's training pairs: a maze client's world is its maze (random mazes, later in the
        train range and in the pretrain range, are for building the base model's general competence)."""
        return cls.train_ids[cls.VALIDATION:cls.VALIDATION + len(double_t_pairs()["train"])]

    def content_key(self, task_id: int) -> str:
        """Layout, start and goal."""
        grid, start, goal = self.task(task_id)
        return f"{layout_name(grid)}:{start[0]},{start[1]}->{goal[0]},{goal[1]}"

    def task(self, task_id: int) -> tuple[tuple[str, ...], Cell, Cell]:
        """(grid, start, goal) of a task id: test, validation and explore ids → their split's double-T pairs in
        order; the rest of the train range and the pretrain range → random mazes."""
        pairs = double_t_pairs()
        if task_id in self.test_ids:
            return DOUBLE_T, *pairs["test"][task_id - self.test_ids.start]
        index = task_id - self.train_ids.start
        if 0 <= index < self.VALIDATION:
            return DOUBLE_T, *pairs["val"][index]
        if 0 <= index - self.VALIDATION < len(pairs["train"]):
            return DOUBLE_T, *pairs["train"][index - self.VALIDATION]
        rng = random.Random(f"maze-{task_id}")
        grid = random_maze(task_id)
        start = rng.choice(free_cells(grid))
        reachable = sorted(c for c, d in distances(grid, start).items() if 0 < d <= self.max_turns)
        return grid, start, rng.choice(reachable)

    def _reset(self, task_id: int) -> str:
        self.grid, self.pos, self.goal = self.task(task_id)
        return f"{self.instruction()}\n{self._describe()}"

    def instruction(self) -> str:
        return (f"The goal is at position {self.goal[0]}, {self.goal[1]}. Reach it by moving up, down, left "
                "or right; a move into a wall leaves you where you are.")

    def _walls(self) -> list[str]:
        r, c = self.pos
        return [d for d, (dr, dc) in MOVES.items() if self.grid[r + dr][c + dc] == "1"]

    def _describe(self) -> str:
        walls = self._walls()
        if walls:
            names = [WALL_WORDS[d] for d in walls]
            wall_text = "There are walls " + (", ".join(names[:-1]) + ", and " if len(names) > 1 else "") \
                + names[-1] + "."
        else:
            wall_text = "There are no walls near you."
        return f"Your current position is at position {self.pos[0]}, {self.pos[1]}. {wall_text}"

    def _step(self, action: str) -> Outcome:
        match = _ACTION_RE.match(action) if len(action) < 64 else None
        if match is None:
            return Outcome(f"Invalid action {action[:60]!r}. Valid actions are: {', '.join(ACTIONS)}.",
                           valid=False)
        dr, dc = MOVES[match.group(1).lower()]
        nr, nc = self.pos[0] + dr, self.pos[1] + dc
        if self.grid[nr][nc] == "0":
            self.pos = (nr, nc)
        if self.pos == self.goal:
            return Outcome("Success", reward=1.0, done=True, success=True)
        return Outcome(self._describe())

    def admissible_actions(self) -> list[str]:
        return list(ACTIONS)

    def expert_action(self) -> str:
        path = shortest_path(self.grid, self.pos, self.goal)
        return f"move {path[0]}" if path else ACTIONS[0]
