"""WebShop-lite: buy what an instruction asks for in a small generated web shop (after Yao et al. 2022).

The original WebShop catalog (1.18 M scraped Amazon products) cannot be fetched offline, so the shop is
generated here, deterministically, from the vocabulary tables below: 7 categories, 53 product types,
54-66 products per type (3,151 products), each with a brand-and-attribute title, 2-4 attributes (e.g.
"long lasting", "gluten free"), one or two option groups (size, color, flavor, ...) of which a product
offers a subset of values, and a price. The catalog, its BM25 index (PyPI ``rank-bm25``) and a query cache
are built once per process, on first use.

A task id seeds the choice of a hidden target product and, from it, the goal: its product type, 1-3 of its
attributes, a value for some of its option groups, and a price bound just above its price. Other products of
the same type share some of those attributes or options, or cost more, so search results hold near-misses.

* A task is the goal's demands (``demands_key``: product type, attributes, option values, price bound), not
  its wording or its target: any product that fits them earns reward 1, so two ids with the same demands
  are the same task, however differently the instruction is phrased.
* Test ids draw their goal from the id alone. Every other id draws from (id, redraw r) and takes the first
  r = 0, 1, ... whose demands are not held out: not a test task's, and for train and pretrain ids not a
  validation task's either. The goal space is finite (a goal is one of 3,151 targets with a few of its
  attributes and options), so about one id in a thousand draws a held-out task's demands, and without this
  a client could train on a test task under another id. r = 0 almost always stands.

Pages and actions follow WebShop:

* search page: ``search[<free text>]`` (the admissible list offers a few queries derived from the
  instruction, but any plain-ASCII query is accepted);
* results page (10 per page, at most 50 results): ``click[<item id>]``, ``click[next >]``,
  ``click[< prev]``, ``click[back to search]``;
* item page: ``click[<option value>]`` selects that value of its group, ``click[description]``,
  ``click[features]``, ``click[buy now]`` (ends the episode), ``click[< prev]``, ``click[back to search]``;
* description / features pages: ``click[< prev]``, ``click[back to search]``.

Reward on ``buy now`` is WebShop's:
``(|goal attrs ∩ product attrs| + |goal options ∩ selected options| + [price <= bound])
/ (|goal attrs| + |goal options| + 1) * r_type``, where ``r_type`` is 1.0 for the goal's product type,
0.5 for another type of the goal's category and 0.1 for another category. (WebShop's own factor steps
1 / 0.5 / 0.1 / 0 on category-path and title-noun overlap; our catalog is typed, so the match is exact, and
a sibling type of the same category is only half right.) Success iff the reward is 1.0. Vocabulary lives in
this file (CATEGORIES, BRANDS), not in a data file, so that the catalog is reviewed with the code using it.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from rank_bm25 import BM25Okapi

from fedse.envs.base import Outcome, TextEnv, first_free

# --------------------------------------------------------------------------------------------- vocabulary
# Every category: product type -> the option-group keys it offers; attribute pool; option groups
# (key -> (name shown to the agent, values)); price range in dollars. Within one product type the group
# names are distinct and the values of different groups never coincide, so ``click[<value>]`` is unambiguous.


@dataclass(frozen=True)
class _CategorySpec:
    types: dict[str, tuple[str, ...]]
    attributes: tuple[str, ...]
    groups: dict[str, tuple[str, tuple[str, ...]]]
    price: tuple[int, int]


_COLORS = ("black", "white", "grey", "navy", "brown", "red", "beige", "olive", "pink", "blue")
CATEGORIES: dict[str, _CategorySpec] = {
    "beauty": _CategorySpec(
        types={
            "moisturizer": ("scent", "size"), "shampoo": ("scent", "size"), "conditioner": ("scent", "size"),
            "lipstick": ("shade",), "face serum": ("size",), "sunscreen": ("size",),
            "body lotion": ("scent", "size"), "nail polish": ("shade",),
        },
        attributes=("long lasting", "paraben free", "cruelty free", "for dry skin", "for sensitive skin",
                    "fragrance free", "natural ingredients", "anti aging", "sulfate free", "vegan",
                    "dermatologist tested", "travel size"),
        groups={
            "scent": ("scent", ("lavender", "unscented", "coconut", "rose", "citrus", "vanilla", "eucalyptus",
                                "green tea", "shea butter")),
            "size": ("size", ("1 fl oz", "1.7 fl oz", "3.4 fl oz", "8 fl oz", "12 fl oz", "16 fl oz",
                              "pack of 2", "pack of 3")),
            "shade": ("color", ("ruby red", "nude", "coral", "berry", "mauve", "pink", "plum",
                                "classic red")),
        },
        price=(6, 60),
    ),
    "shoes": _CategorySpec(
        types={t: ("shoe size", "color") for t in ("running shoes", "sneakers", "hiking boots", "sandals",
                                                     "slippers", "loafers", "rain boots")},
        attributes=("non slip", "rubber sole", "memory foam", "lightweight", "water resistant",
                    "arch support", "breathable", "machine washable", "wide width", "slip on", "lace up",
                    "cushioned"),
        groups={
            "shoe size": ("size", ("6", "6.5", "7", "7.5", "8", "8.5", "9", "9.5", "10", "10.5", "11", "12")),
            "color": ("color", _COLORS),
        },
        price=(20, 140),
    ),
    "clothing": _CategorySpec(
        types={t: ("cloth size", "cloth color") for t in ("t-shirt", "polo shirt", "hoodie", "dress shirt",
                                                          "sweatshirt", "tank top", "jogger pants",
                                                          "denim jacket")},
        attributes=("machine wash", "cotton", "slim fit", "relaxed fit", "long sleeve", "short sleeve",
                    "moisture wicking", "button down", "quick dry", "hand wash", "classic fit",
                    "stretch fabric"),
        groups={
            "cloth size": ("size", ("x-small", "small", "medium", "large", "x-large", "xx-large",
                                    "3x-large")),
            "cloth color": ("color", ("black", "white", "heather grey", "navy", "maroon", "forest green",
                                      "royal blue", "khaki", "charcoal")),
        },
        price=(10, 80),
    ),
    "food": _CategorySpec(
        types={t: ("flavor", "amount") for t in ("protein bar", "coffee beans", "herbal tea", "trail mix",
                                                 "granola", "almond butter", "dark chocolate", "beef jerky")},
        attributes=("gluten free", "non gmo", "keto friendly", "low sugar", "high protein", "organic",
                    "vegan", "sugar free", "kosher", "individually wrapped", "dairy free", "low carb"),
        groups={
            "flavor": ("flavor", ("chocolate", "vanilla", "strawberry", "sea salt", "honey", "original",
                                  "caramel", "cinnamon", "mango", "mint")),
            "amount": ("size", ("6 count", "12 count", "24 count", "8 ounce", "16 ounce", "2 pound",
                                "pack of 4")),
        },
        price=(5, 50),
    ),
    "furniture": _CategorySpec(
        types={
            "office chair": ("wood", "quantity"), "dining chair": ("wood", "quantity"),
            "bar stool": ("wood", "quantity"), "bookshelf": ("wood", "width"),
            "coffee table": ("wood", "width"), "tv stand": ("wood", "width"),
            "nightstand": ("wood", "quantity"), "shoe rack": ("wood", "width"),
        },
        attributes=("easy assembly", "solid wood", "storage space", "height adjustable", "for living room",
                    "metal frame", "ergonomic", "upholstered", "lumbar support", "mid century",
                    "space saving", "water resistant"),
        groups={
            "wood": ("color", ("black", "white", "walnut", "oak", "grey", "espresso", "natural", "teal")),
            "quantity": ("quantity", ("single", "set of 2", "set of 4")),
            "width": ("size", ("24 inch", "32 inch", "40 inch", "48 inch", "55 inch")),
        },
        price=(30, 400),
    ),
    "electronics": _CategorySpec(
        types={
            "wireless earbuds": ("tech color",), "bluetooth speaker": ("tech color",),
            "phone charger": ("tech color", "length"), "usb cable": ("length", "tech color"),
            "power bank": ("capacity", "tech color"), "smart watch": ("tech color",),
            "wireless keyboard": ("tech color",), "computer mouse": ("tech color",),
        },
        attributes=("fast charging", "noise cancelling", "long battery life", "waterproof", "usb c",
                    "portable", "hands free", "compact", "easy to use", "ergonomic", "rechargeable",
                    "led display"),
        groups={
            "tech color": ("color", ("black", "white", "blue", "silver", "rose gold", "red", "space grey",
                                     "green")),
            "length": ("length", ("3 ft", "6 ft", "10 ft", "2 pack", "3 pack")),
            "capacity": ("capacity", ("5000mah", "10000mah", "20000mah", "26800mah")),
        },
        price=(10, 200),
    ),
    "home": _CategorySpec(
        types={
            "bed sheets": ("home color", "bed size"), "bath towels": ("home color", "towel set"),
            "shower curtain": ("home color", "curtain size"),
            "blackout curtains": ("home color", "curtain size"),
            "area rug": ("home color", "rug size"), "throw pillow covers": ("home color", "pillow size"),
        },
        attributes=("machine washable", "easy clean", "eco friendly", "super soft", "hypoallergenic",
                    "stain resistant", "quick dry", "wrinkle free", "fade resistant", "thermal insulated",
                    "non slip", "cotton"),
        groups={
            "home color": ("color", ("white", "ivory", "grey", "navy", "sage green", "blush pink", "beige",
                                     "charcoal")),
            "bed size": ("size", ("twin", "full", "queen", "king", "california king")),
            "towel set": ("size", ("set of 2", "set of 4", "set of 6", "set of 8")),
            "curtain size": ("size", ("42 x 63 inch", "52 x 84 inch", "52 x 96 inch", "72 x 72 inch")),
            "rug size": ("size", ("2 x 3 feet", "4 x 6 feet", "5 x 7 feet", "8 x 10 feet")),
            "pillow size": ("size", ("16 x 16 inch", "18 x 18 inch", "20 x 20 inch", "24 x 24 inch")),
        },
        price=(12, 150),
    ),
}
BRANDS: tuple[str, ...] = (
    "Lumora", "Kestrel", "Bravio", "Northpeak", "Velto", "Amberly", "Crestline", "Mivado", "Solenne",
    "Tarkin", "Oakhurst", "Zephra", "Pellora", "Quillon", "Rivana", "Sunvale", "Halden", "Corvex", "Nimbra",
    "Ostara", "Bellwick", "Dunmore", "Fennix", "Hartley", "Ivoro", "Kova", "Larkspur", "Mossgrove", "Novira",
    "Plumeria",
)
# Attributes a product cannot have together (a shirt is not both slim and relaxed fit).
_EXCLUSIVE: tuple[frozenset[str], ...] = tuple(frozenset(group) for group in (
    ("slim fit", "relaxed fit", "classic fit"), ("long sleeve", "short sleeve"),
    ("machine wash", "hand wash"), ("slip on", "lace up"), ("sugar free", "low sugar"),
    ("fragrance free", "natural ingredients"),
))
_FILLERS = ("Premium", "Classic", "Everyday", "Deluxe", "Essential", "Pro", "Original", "Ultra", "Signature")
_OPENERS = ("i need", "i am looking for", "i want", "find me", "i would like")
_CATALOG_SEED = 20220701
_PER_TYPE = (54, 66)  # products per type, inclusive range
PAGE_SIZE = 10
MAX_RESULTS = 50
_MAX_ACTION_CHARS = 1_000
_MAX_QUERY_TOKENS = 64
_QUERY_CACHE_LIMIT = 200_000
# Words that describe the request rather than the product: dropped from queries and documents alike so that
# instruction boilerplate ("i am looking for ... price lower than") does not steer retrieval.
_STOPWORDS = frozenset(
    "a an the and or of to in on with i am me my need want would like looking find show please is that "
    "which it for price lower than dollars dollar under less buy get some".split()
)
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_ACTION_RE = re.compile(r"\s*(search|click)\s*\[(.*)\]\s*", re.IGNORECASE | re.DOTALL)


def tokens(text: str) -> list[str]:
    """Lower-case word tokens without request boilerplate; shared by the index and every query."""
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOPWORDS]


# --------------------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class Product:
    """One catalog item; ``options`` pairs each shown group name with the values this product offers."""

    index: int
    item_id: str
    category: str
    ptype: str
    title: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]
    price: float

    def offers(self, group: str, value: str) -> bool:
        """Whether `value` can be selected in `group` (a goal option the product lacks cannot be met)."""
        return any(g == group and value in values for g, values in self.options)


def _title(rng: random.Random, brand: str, ptype: str, attributes: tuple[str, ...]) -> str:
    """Keyword-stuffed title in the style of marketplace listings: every attribute is visible in results."""
    pre = [a for a in attributes if not a.startswith("for ")][:2]
    post = [a for a in attributes if a not in pre]
    words = [brand]
    if rng.random() < 0.5:
        words.append(rng.choice(_FILLERS))
    words += [p.title() for p in pre] + [ptype.title()]
    head = " ".join(words)
    return head + "".join(", " + p.title() for p in post)


def _item_id(rng: random.Random, used: set[str]) -> str:
    """An ASIN-like id ("B0" + 8 characters), unique in the catalog."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    while True:
        candidate = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if candidate not in used:
            used.add(candidate)
            return candidate


def _draw_attributes(rng: random.Random, pool: tuple[str, ...], k: int) -> tuple[str, ...]:
    """`k` compatible attributes in pool order; incompatible ones would make instructions contradict."""
    picked: list[str] = []
    for attribute in rng.sample(pool, len(pool)):
        if not any(attribute in group and group & set(picked) for group in _EXCLUSIVE):
            picked.append(attribute)
        if len(picked) == k:
            break
    return tuple(sorted(picked, key=pool.index))


def _make_product(rng: random.Random, index: int, used: set[str], category: str, ptype: str) -> Product:
    """Draw one product of `ptype`; its option values keep the pool order so pages read naturally."""
    spec = CATEGORIES[category]
    attributes = _draw_attributes(rng, spec.attributes, rng.choice((2, 3, 3, 4)))
    options = []
    for key in spec.types[ptype]:
        name, pool = spec.groups[key]
        chosen = set(rng.sample(pool, rng.randint(2, min(5, len(pool)))))
        options.append((name, tuple(v for v in pool if v in chosen)))
    low, high = spec.price
    price = rng.randint(low, high) - rng.choice((0.01, 0.01, 0.51, 0.05))
    return Product(index=index, item_id=_item_id(rng, used), category=category, ptype=ptype,
                   title=_title(rng, rng.choice(BRANDS), ptype, attributes), attributes=attributes,
                   options=tuple(options), price=round(price, 2))


def _document(product: Product) -> list[str]:
    """What search sees of a product: title, type, category, attributes and the option values it offers."""
    parts = [product.title, product.ptype, product.category, *product.attributes]
    parts += [v for _, values in product.options for v in values]
    return tokens(" ".join(parts))


class Shop:
    """The generated catalog with its BM25 index; one instance per process (see `shop()`)."""

    def __init__(self) -> None:
        rng = random.Random(_CATALOG_SEED)
        used: set[str] = set()
        products: list[Product] = []
        for category, spec in CATEGORIES.items():
            for ptype in spec.types:
                for _ in range(rng.randint(*_PER_TYPE)):
                    products.append(_make_product(rng, len(products), used, category, ptype))
        self.products = products
        self.by_id = {p.item_id.lower(): p for p in products}
        corpus = [_document(p) for p in products]
        self.bm25 = BM25Okapi(corpus)
        postings: dict[str, list[int]] = {}
        for i, doc in enumerate(corpus):
            for tok in set(doc):
                postings.setdefault(tok, []).append(i)
        self.postings = postings
        self._cache: dict[tuple[str, ...], tuple[int, ...]] = {}

    def search(self, query: str) -> tuple[int, ...]:
        """Indices of the top results, best first; scored by rank-bm25 over the documents sharing a token.

        Documents sharing no token score exactly 0, so scoring only the candidates gives the same ranking
        as scoring the whole corpus, at a cost that grows with the query's matches rather than the catalog.
        Results are cached per process because agents repeat the same few queries across tasks.
        """
        key = tuple(tokens(query)[:_MAX_QUERY_TOKENS])
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        candidates = sorted({i for tok in set(key) for i in self.postings.get(tok, ())})
        if candidates:
            scores = np.asarray(self.bm25.get_batch_scores(list(key), candidates))
            order = np.lexsort((np.asarray(candidates), -scores))[:MAX_RESULTS]
            result = tuple(candidates[i] for i in order)
        else:
            result = ()
        if len(self._cache) >= _QUERY_CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = result
        return result


@cache
def shop() -> Shop:
    """The process-wide shop, built on first use so that importing the module stays cheap."""
    return Shop()


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Goal:
    """What the instruction asks for; ``target`` is one product that satisfies it (hidden from the agent)."""

    target: int
    category: str
    ptype: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    price_bound: float
    phrase: str
    text: str


def _seed(task_id: int, redraw: int = 0) -> int:
    """A process-independent seed (``hash()`` of strings is salted per process); redraw 0 is the id's own
    seed, the one every task had before redraws existed, so only the few redrawn tasks changed."""
    tail = f"/{redraw}" if redraw else ""
    return int.from_bytes(hashlib.sha256(f"webshop-lite/{task_id}{tail}".encode()).digest()[:8], "big")


def _plural(ptype: str) -> bool:
    """Types such as "hiking boots" or "bed sheets" take no article and a plural verb."""
    return ptype.endswith("s")


def _with_article(phrase: str, ptype: str) -> str:
    if _plural(ptype):
        return phrase
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def demands_key(goal: Goal) -> str:
    """What a goal asks for: product type, attributes, option values and price bound, in a fixed order.

    Neither the target nor the phrasing: any product that fits earns reward 1, so two goals with the same
    demands are the same task to an agent however they are worded and whichever product was drawn.
    """
    attributes = ",".join(sorted(goal.attributes))
    options = ";".join(f"{name}={value}" for name, value in sorted(goal.options))
    return f"{goal.ptype}|{attributes}|{options}|<{goal.price_bound:.0f}"


def make_goal(task_id: int) -> Goal:
    """The goal of task `task_id`: drawn from the id alone for a test id; any other id takes the first
    redraw whose demands are not held out from it (`WebShopEnv.banned_keys`)."""
    banned = WebShopEnv.banned_keys(task_id)
    if not banned:
        return draw_goal(task_id, 0)
    drawn: dict[int, Goal] = {}  # each redraw is drawn once: its key is checked, then it is the goal

    def key_of(redraw: int) -> str:
        drawn[redraw] = draw_goal(task_id, redraw)
        return demands_key(drawn[redraw])

    return drawn[first_free(task_id, banned, key_of, "webshop")]


def draw_goal(task_id: int, redraw: int) -> Goal:
    """Redraw `redraw` of task `task_id`'s goal: a target product, a subset of what makes it special, and a
    budget."""
    rng = random.Random(_seed(task_id, redraw))
    products = shop().products
    product = products[rng.randrange(len(products))]
    n_attrs = min(rng.choice((1, 2, 2, 3)), len(product.attributes))
    chosen = set(rng.sample(product.attributes, n_attrs))
    attributes = tuple(a for a in product.attributes if a in chosen)
    options = tuple((name, rng.choice(values)) for name, values in product.options if rng.random() < 0.75)
    price_bound = float((math.ceil(product.price / 10) + rng.choice((0, 0, 1, 2))) * 10)
    pre = [a for a in attributes if not a.startswith("for ")]
    post = [a for a in attributes if a.startswith("for ")]
    if rng.random() < 0.6:
        phrase = " ".join([", ".join(pre), product.ptype, *post]).strip()
    else:
        verb = "are" if _plural(product.ptype) else "is"
        phrase = f"{product.ptype} that {verb} {' and '.join(attributes)}"
    text = f"{rng.choice(_OPENERS)} {_with_article(phrase, product.ptype)}"
    if options:
        text += ", with " + ", and ".join(f"{name}: {value}" for name, value in options)
    text += f", and price lower than {price_bound:.2f} dollars"
    return Goal(target=product.index, category=product.category, ptype=product.ptype, attributes=attributes,
                options=options, price_bound=price_bound, phrase=phrase, text=text)


def reward(goal: Goal, product: Product, selected: dict[str, str]) -> float:
    """WebShop's purchase reward: share of goal attributes, goal options and budget met, times type match."""
    hits = sum(a in product.attributes for a in goal.attributes)
    hits += sum(selected.get(name) == value for name, value in goal.options)
    hits += product.price <= goal.price_bound
    total = len(goal.attributes) + len(goal.options) + 1
    if product.ptype == goal.ptype:
        r_type = 1.0
    elif product.category == goal.category:
        r_type = 0.5
    else:
        r_type = 0.1
    return hits / total * r_type


def fits(goal: Goal, product: Product) -> bool:
    """Whether buying `product` with the goal's options selected earns reward 1 (what the expert seeks)."""
    return (product.ptype == goal.ptype and product.price <= goal.price_bound
            and all(a in product.attributes for a in goal.attributes)
            and all(product.offers(name, value) for name, value in goal.options))


def candidate_queries(goal: Goal) -> list[str]:
    """Search actions offered on the search page: instruction, product phrase (+ options), type, category."""
    values = " ".join(value for _, value in goal.options)
    queries = [goal.text, goal.phrase, f"{goal.phrase} {values}".strip(), goal.ptype, goal.category]
    out: list[str] = []
    for q in queries:
        action = f"search[{q}]"
        if action not in out:
            out.append(action)
    return out


# --------------------------------------------------------------------------------------------- environment
def _shown(action: str) -> str:
    """A short, printable echo of what the agent typed (it may be a megabyte of anything)."""
    text = repr(action[:60])
    return text + ("..." if len(action) > 60 else "")


class WebShopEnv(TextEnv):
    """WebShop-lite: search, browse results, open an item, choose its options, buy it (10 turns)."""

    name = "webshop"
    max_turns = 10
    test_ids = range(0, 200)
    train_ids = range(10_000, 10_000 + 200_000)

    def __init__(self) -> None:
        super().__init__()
        self.goal: Goal | None = None
        self.page = "done"
        self.query = ""
        self.results: tuple[int, ...] = ()
        self.page_no = 0
        self.item: Product | None = None
        self.selected: dict[str, str] = {}
        self.queries_tried: list[str] = []
        self._actions: list[str] = []
        self._clicks: dict[str, str] = {}

    # ------------------------------------------------------------------ TextEnv
    @classmethod
    def content_key(cls, task_id: int) -> str:
        """The goal's demands (`demands_key`): what makes a purchase earn reward 1."""
        return demands_key(make_goal(task_id))

    def _reset(self, task_id: int) -> str:
        self.goal = make_goal(task_id)
        self.queries_tried = []
        self._go_search()
        return self._render()

    def instruction(self) -> str:
        return self.goal.text if self.goal is not None else ""

    def admissible_actions(self) -> list[str]:
        return list(self._actions)

    def _step(self, action: str) -> Outcome:
        if self.goal is None or self.page == "done":
            return Outcome("The episode is over; reset to start a new task.", valid=False, done=True)
        if len(action) > _MAX_ACTION_CHARS:
            return self._invalid(f"Action too long ({len(action)} characters).")
        match = _ACTION_RE.fullmatch(action)
        if match is None:
            return self._invalid(f"Could not read {_shown(action)}: actions are search[<query>] or "
                                 "click[<button>].")
        verb, arg = match.group(1).lower(), match.group(2)
        if verb == "search":
            return self._search(arg)
        return self._click(" ".join(arg.lower().split()))

    def expert_action(self) -> str:
        """Search with the instruction, open the first result that fits, set its options, buy.

        Falls back to searching the target's exact title when no result page shows a fitting product while
        the turn budget still allows it (never needed on the test ids, kept so the expert is total).
        """
        goal = self.goal
        if goal is None or self.page == "done":
            return ""
        if self.page == "search":
            primary = candidate_queries(goal)[0]
            if primary not in self.queries_tried:
                return primary
            return f"search[{shop().products[goal.target].title}]"
        if self.page == "results":
            return self._expert_on_results(goal)
        if self.page == "item" and self.item is not None and fits(goal, self.item):
            for name, value in goal.options:
                if self.selected.get(name) != value:
                    return f"click[{value}]"
            return "click[buy now]"
        return "click[< prev]"

    # ------------------------------------------------------------------ expert helpers
    def _expert_on_results(self, goal: Goal) -> str:
        """Open a fitting product on this page; else page on while a title search still fits the budget."""
        products = shop().products
        for i in self._page_items():
            if fits(goal, products[i]):
                return f"click[{products[i].item_id}]"
        # back + search + click + options + buy must still fit after one more "next"
        fallback_cost = 4 + len(goal.options)
        has_next = (self.page_no + 1) * PAGE_SIZE < len(self.results)
        if has_next and self.turn + 1 + fallback_cost <= self.max_turns:
            return "click[next >]"
        return "click[back to search]"

    # ------------------------------------------------------------------ transitions
    def _search(self, arg: str) -> Outcome:
        if self.page != "search":
            return self._invalid("There is no search box on this page; click[back to search] first.")
        query = " ".join(arg.split())
        if not query:
            return self._invalid("search[] needs a query, e.g. search[red running shoes].")
        if not query.isascii() or not query.isprintable():
            return self._invalid("Search with plain ASCII words, e.g. search[red running shoes].")
        self.queries_tried.append(f"search[{arg}]")
        self.query = query
        self.results = shop().search(query)
        self.page_no = 0
        self._go_results()
        return Outcome(self._render())

    def _click(self, label: str) -> Outcome:
        target = self._clicks.get(label)
        if target is None:
            if self.page == "search":
                return self._invalid("Nothing to click on the search page; type search[<query>].")
            return self._invalid(f"{_shown(label)} is not clickable on this page.")
        if target == "back to search":
            self._go_search()
        elif target == "next >":
            self.page_no += 1
            self._go_results()
        elif target == "< prev":
            if self.page == "results":
                self.page_no -= 1
                self._go_results()
            elif self.page == "item":
                self._go_results()
            else:
                self._go_item(self.item, keep_selection=True)
        elif target in ("description", "features"):
            self.page = target
            self._set_clicks(["back to search", "< prev"])
        elif target == "buy now":
            return self._buy()
        elif target.startswith("item:"):
            self._go_item(shop().by_id[target[5:]], keep_selection=False)
        else:  # "option:<group>:<value>"
            _, group, value = target.split(":", 2)
            self.selected[group] = value
        return Outcome(self._render())

    def _buy(self) -> Outcome:
        assert self.goal is not None and self.item is not None
        score = reward(self.goal, self.item, self.selected)
        chosen = ", ".join(f"{g}: {v}" for g, v in self.selected.items()) or "no options selected"
        self.page = "done"
        self._actions, self._clicks = [], {}
        text = (f"Thank you for shopping with us! You bought [{self.item.item_id}] {self.item.title} "
                f"(${self.item.price:.2f}; {chosen}).\nYour score (min 0.0, max 1.0): {score:.2f}")
        return Outcome(text, reward=score, done=True, success=score == 1.0)

    def _invalid(self, message: str) -> Outcome:
        """Feedback plus the unchanged page, so the agent can recover without remembering the last screen."""
        hint = ", ".join(self._actions[:12]) + (", ..." if len(self._actions) > 12 else "")
        extra = "" if self.page == "search" else f"\nValid actions here: {hint}"
        return Outcome(f"Invalid action: {message}{extra}\n\n{self._render()}", valid=False)

    # ------------------------------------------------------------------ pages
    def _set_clicks(self, labels: list[str], targets: dict[str, str] | None = None) -> None:
        """Record this page's buttons: label -> what clicking it does, and the admissible strings in order."""
        targets = targets or {}
        self._clicks = {label.lower(): targets.get(label, label) for label in labels}
        self._actions = [f"click[{label}]" for label in labels]

    def _go_search(self) -> None:
        assert self.goal is not None
        self.page = "search"
        self.item, self.selected = None, {}
        self._clicks = {}
        self._actions = candidate_queries(self.goal)

    def _page_items(self) -> list[int]:
        start = self.page_no * PAGE_SIZE
        return list(self.results[start:start + PAGE_SIZE])

    def _go_results(self) -> None:
        self.page = "results"
        self.item, self.selected = None, {}
        labels = ["back to search"]
        if self.page_no > 0:
            labels.append("< prev")
        if (self.page_no + 1) * PAGE_SIZE < len(self.results):
            labels.append("next >")
        products = shop().products
        ids = [products[i].item_id for i in self._page_items()]
        self._set_clicks(labels + ids, {pid: f"item:{pid.lower()}" for pid in ids})

    def _go_item(self, product: Product | None, keep_selection: bool) -> None:
        assert product is not None
        self.page = "item"
        self.item = product
        if not keep_selection:
            self.selected = {}
        labels = ["back to search", "< prev", "description", "features"]
        targets: dict[str, str] = {}
        for group, values in product.options:
            for value in values:
                labels.append(value)
                targets[value] = f"option:{group}:{value}"
        labels.append("buy now")
        self._set_clicks(labels, targets)

    def _render(self) -> str:
        assert self.goal is not None
        head = f"Instruction: {self.goal.text}"
        if self.page == "search":
            return f"WebShop [search page]\n{head}\nType search[<query>] to look for products."
        if self.page == "results":
            return f"WebShop [results page]\n{head}\n{self._render_results()}"
        assert self.item is not None
        if self.page == "item":
            return f"WebShop [item page]\n{head}\n{self._render_item(self.item)}"
        body = _description(self.item) if self.page == "description" else _features(self.item)
        return f"WebShop [{self.page} page]\n{head}\n[back to search] [< prev]\n{body}"

    def _render_results(self) -> str:
        total = len(self.results)
        if not total:
            return f'[back to search]\nNo results for "{self.query}".'
        pages = math.ceil(total / PAGE_SIZE)
        nav = "[back to search]" + (" [< prev]" if self.page_no > 0 else "")
        nav += " [next >]" if self.page_no + 1 < pages else ""
        lines = [nav, f'Page {self.page_no + 1} of {pages} ({total} results for "{self.query}")']
        products = shop().products
        shown = (products[i] for i in self._page_items())
        lines += [f"[{p.item_id}] {p.title} | ${p.price:.2f}" for p in shown]
        return "\n".join(lines)

    def _render_item(self, product: Product) -> str:
        lines = ["[back to search] [< prev]", f"[{product.item_id}] {product.title}",
                 f"Price: ${product.price:.2f}"]
        for group, values in product.options:
            chosen = self.selected.get(group)
            buttons = " ".join(f"[{v}]" for v in values)
            lines.append(f"{group}: {buttons}" + (f" (selected: {chosen})" if chosen else ""))
        lines.append("[description] [features] [buy now]")
        return "\n".join(lines)


def _description(product: Product) -> str:
    """A short generated blurb; it repeats the facts, as real descriptions mostly do."""
    attrs = ", ".join(product.attributes[:-1]) + f" and {product.attributes[-1]}"
    offered = "; ".join(f"{g}: {', '.join(vs)}" for g, vs in product.options)
    subject = f"These {product.ptype} are" if _plural(product.ptype) else f"This {product.ptype} is"
    return f"Description: {product.title}. {subject} {attrs}. Available {offered}."


def _features(product: Product) -> str:
    return "Features:\n" + "\n".join(f"- {a}" for a in product.attributes)
