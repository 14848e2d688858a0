"""How the agent acts: two ways, both batched across the running episodes of a pool.

* ``constrained`` — the action is drawn from the environment's admissible actions by the model's own
  probabilities: p(a) ∝ exp(log p(a | prompt) / T). All running episodes are scored in **one** forward pass
  per turn: each row holds only the tokens new since the last turn, followed by the candidate actions as a
  prefix tree (a shared prefix is scored once), with a 4-D attention mask that lets each candidate token see
  the cached prompt and its own prefix only. The candidate block is cropped off after scoring. This is the
  default for the tiny model.
* ``react`` — the paper's format for real LLMs: the model writes `Thought: … Action: …`, and the action is
  parsed from the text. Each turn feeds only the observation and the reply header after the cached prompt,
  and each episode stops decoding at its own end token. Unparseable text goes to the environment as is; it
  answers with feedback.

Both keep one row of KV cache per running episode across turns (`fedse.kvcache`); an episode that ends frees
its row for the next queued episode (`policy.batching: continuous`, `fedse.rollout`) without disturbing the
others. Temperature 1.0 explores; temperature 0 is greedy. Sampling is by common random numbers: each episode
carries a key (`Slot.key`, set by `fedse.rollout`); the constrained policy draws by Gumbel-max with noise that
is a hash of (key, turn, action text), ReAct draws each token with a generator seeded by a hash of (key,
turn). So an episode plays the same whatever else shares its batch or when it joined it, and two adapters
evaluated on the same keys face the same draws (their difference is not drowned in sampling noise).
When an episode outgrows the context window, the prompt keeps the system message and first observation
(which states the task) and drops the oldest turns; it drops them down to half the window, so the rebuilt
cache then lasts several turns, and the head's cached keys are kept across rebuilds.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.envs.base import TextEnv
from fedse.envs.pool import Slot
from fedse.kvcache import EpisodeCache
from fedse.model import Agent
from fedse.prompt import IM_END, Rendered, Window, fit_window, prompt_tail

_ACTION_RE = re.compile(r"Action:\s*(.*)", re.IGNORECASE)
_THOUGHT_RE = re.compile(r"Thought:\s*(.*?)\s*(?:Action:|$)", re.IGNORECASE | re.DOTALL)
_ACTION_LINE_RE = re.compile(r"Action:\s*\S[^\n]*\n", re.IGNORECASE)  # a whole action line: the reply is complete


class PolicySpec(BaseModel):
    """`policy:` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("auto", pattern="^(auto|constrained|react)$")
    temperature: float = Field(1.0, ge=0, description="exploration temperature")
    eval_temperature: float = Field(1.0, ge=0, description="evaluation temperature; 0 = greedy (otherwise the "
                                    "draws are keyed by seed, env, task and pass: the same in every round)")
    max_new_tokens: int = Field(64, ge=1)
    context: int = Field(1536, ge=128, description="prompt token budget (capped by the model's window)")
    batch_size: int = Field(16, ge=1, description="episodes per forward pass")
    batching: str = Field("continuous", pattern="^(continuous|chunked)$",
                          description="continuous: an episode that ends is replaced at once by the next one queued; "
                          "chunked: episodes run in chunks of batch_size, each until its longest episode ends")
    threads: int | None = Field(1, ge=1, description="torch CPU threads while acting (rollouts); null = leave "
                                "torch's setting. On a shared CPU, threads that wait for each other at every "
                                "small operation cost far more than they bring")
    score: str = Field("trie", pattern="^(sum|mean|trie)$",
                       description="constrained: a candidate's log-prob summed over its tokens, their mean, or "
                       "trie: constrained decoding (each token renormalised over the admissible continuations)")
    history_turns: int | None = Field(6, ge=1, description="keep at most this many recent turns; null = all "
                                      "that fit in the context")
    walk_nodes: int | None = Field(64, ge=0, description="constrained, score: trie (the others always score): a "
                                   "decision whose candidates "
                                   "make a prefix tree of more than this many tokens walks down the tree (a forward "
                                   "per branching point, only the chosen path computed) instead of scoring every "
                                   "candidate; at temperature 1 the same distribution, other draws; null = never")

    def temperature_for(self, evaluation: bool) -> float:
        return self.eval_temperature if evaluation else self.temperature

    def resolved_mode(self, agent: Agent) -> str:
        if self.mode != "auto":
            return self.mode
        return "constrained" if agent.name.startswith("tiny") else "react"


def episode_tokens(agent: Agent, slot: Slot, budget: int, constrained: bool, keep_turns: int | None = None,
                   ) -> list[int]:
    """The prompt for the slot's next action, rebuilt from its history and fitted to `budget` tokens."""
    return episode_window(agent, slot, budget, constrained, keep_turns)[0]


def episode_window(agent: Agent, slot: Slot, budget: int, constrained: bool, keep_turns: int | None = None,
                   rendered: Rendered | None = None) -> tuple[list[int], int]:
    """The prompt and how many of the oldest turns it leaves out (see `fit_window`).

    `rendered` carries the slot's already tokenised head and turns between calls (histories only grow), so
    acting does not re-tokenise a whole episode at every step.
    """
    r = agent.renderer
    memo = rendered if rendered is not None else Rendered()
    if memo.head is None:
        memo.head = r.system() + r.user(slot.first_observation)
    for i in range(len(memo.turns), len(slot.history)):
        action, observation = slot.history[i]
        thought = slot.thoughts[i] if i < len(slot.thoughts) else ""
        content, close = r.reply(action, thought)
        memo.turns.append(r.assistant_open() + content + close + r.user(observation))
    head, turns = memo.head, memo.turns
    tail = prompt_tail(r, constrained)
    ids, dropped = fit_window(turns, head, budget - len(tail), keep_turns=keep_turns)
    return ids + tail, dropped


def acting_window(agent: Agent, spec: PolicySpec) -> Window:
    """The window `make_policy(agent, spec)` acts in (its budget before the reply, the turns it keeps): the
    learner cuts its examples by this, so it trains on the contexts the agent will act in."""
    constrained = spec.resolved_mode(agent) == "constrained"
    budget = min(spec.context, agent.context) - (0 if constrained else spec.max_new_tokens)
    return Window(budget - len(prompt_tail(agent.renderer, constrained)), spec.history_turns)


class MergedLora:
    """Runs each LoRA-wrapped layer as one matmul with W + ΔW while the adapter path is switched off.

    Why: on a CPU the tiny model pays per operation, and an unmerged LoRA layer is three matmuls, a dropout
    and a scaling (merging made maze rollouts about 1.4x faster on 2 CPU cores). The base weights are swapped,
    never modified: the original tensors are put back on exit, so the frozen base cannot drift however often
    this runs. The merged weights are kept while the adapter's and base's tensors are unchanged (same storage,
    same version counter), so a rollout merges once, and an adapter loaded or trained in between is always the
    one used. Holds one copy of the wrapped weights: meant for the small models that run on CPUs. A no-op for
    models without plain LoRA layers (none, DoRA, already merged).
    """

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if any(not hasattr(m, "_disable_adapters") or m.merged or any(m.use_dora.get(a, False)
                                                                        for a in m.active_adapters)
               for m in self.layers):
            self.layers = []
        self.key: tuple[tuple[int, int], ...] = ()
        self.weights: list[torch.Tensor] = []

    def _tensors(self) -> list[torch.Tensor]:
        return [t for m in self.layers for t in [m.base_layer.weight, *(
            w for a in m.active_adapters if a in m.lora_A for w in (m.lora_A[a].weight, m.lora_B[a].weight))]]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.layers:
            yield
            return
        key = tuple((t.data_ptr(), t._version) for t in self._tensors())
        if key != self.key:
            with torch.no_grad():
                self.weights = [m.base_layer.weight + sum(
                    (m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A),
                    torch.zeros_like(m.base_layer.weight)) for m in self.layers]
            self.key = key
        originals = [(m.base_layer.weight.data, m._disable_adapters) for m in self.layers]
        try:
            for m, merged in zip(self.layers, self.weights, strict=True):
                m.base_layer.weight.data = merged
                m._disable_adapters = True  # peft's forward then calls the base layer alone
            yield
        finally:
            for m, (weight, disabled) in zip(self.layers, originals, strict=True):
                m.base_layer.weight.data = weight
                m._disable_adapters = disabled


def siblings_normalised(logp: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each trie node's log-prob renormalised over its siblings (the nodes predicted from the same column).

    Summed along a candidate's path this is the probability of constrained decoding: at every branching point
    the model's next-token distribution restricted to the tokens that continue some admissible action. A
    token with no alternative costs nothing, so a long command that is copied from the observation (a
    TextCraft recipe) is not penalised for its length, and the choice is made where the actions differ.
    """
    _, inverse = torch.unique(group, return_inverse=True)
    count = int(inverse.max()) + 1 if len(inverse) else 0
    top = torch.full((count,), -torch.inf, dtype=logp.dtype).scatter_reduce(0, inverse, logp, "amax")
    total = torch.zeros(count, dtype=logp.dtype).index_add_(0, inverse, torch.exp(logp - top[inverse]))
    return logp - (top + torch.log(total))[inverse]


def gumbel(key: str, turn: int, action: str) -> float:
    """Standard Gumbel noise that is a pure function of (episode key, turn, action text).

    Why a hash: the draw of an episode must not depend on which other episodes share its batch, on the batch
    size, or on the process (Python's `hash()` is salted per process, so blake2b it is). The 53 top bits of
    the digest make a uniform u in (0, 1); -log(-log u) is standard Gumbel.
    """
    digest = hashlib.blake2b(f"{key}\x1f{turn}\x1f{action}".encode(), digest_size=8).digest()
    u = ((int.from_bytes(digest, "big") >> 11) + 0.5) * 2.0 ** -53
    return -math.log(-math.log(u))


def gumbel_pick(scores: torch.Tensor, temperature: float, key: str, turn: int, actions: Sequence[str]) -> int:
    """argmax_k (score_k / T + g(key, turn, action_k)): a draw from softmax(score / T) (the Gumbel-max trick)
    whose noise is fixed by the episode, so two policies acting on the same episode face the same draws
    (common random numbers). T = 0 is the plain argmax."""
    if temperature == 0:
        return int(torch.argmax(scores))
    noise = torch.tensor([gumbel(key, turn, a) for a in actions], dtype=torch.float64)
    return int(torch.argmax(scores.double() / temperature + noise))


def noise_key(slot: Slot, seed: int) -> str:
    """The slot's own key (set by `fedse.rollout`), or for a bare pool one made of the policy's seed and the
    task id."""
    return slot.key or f"seed={seed}/task={slot.task_id}"


@dataclass
class CandidateTrie:
    """One decision's candidates as a prefix tree of tokens: a prefix that several candidates share is one
    node, scored once (log p of a token given the prompt and the same prefix is the same for all of them).

    Nodes are numbered so that a parent precedes its children; `parent` is -1 for a first token; `paths[k]`
    lists candidate k's nodes from its first token to its last.
    """

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    paths: list[list[int]] = field(default_factory=list)

    def children(self) -> dict[int, list[int]]:
        """Each node's children (-1: the first tokens), in node order."""
        kids: dict[int, list[int]] = {}
        for node, up in enumerate(self.parent):
            kids.setdefault(up, []).append(node)
        return kids

    def walkable(self) -> bool:
        """Whether every candidate ends at a leaf of its own: then walking down the tree draws exactly the
        distribution that trie scoring gives. A candidate that is another's prefix (its end is an inner node)
        or a repeated candidate (two share a leaf) would need the mass of a whole subtree: such a decision is
        scored instead."""
        ends = [path[-1] for path in self.paths if path]
        inner = set(self.parent)
        return len(ends) == len(self.paths) and len(set(ends)) == len(ends) and not inner.intersection(ends)


def candidate_trie(cands: list[list[int]]) -> CandidateTrie:
    trie = CandidateTrie()
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for cand in cands:
        node, path = -1, []
        for depth, token in enumerate(cand):
            child = index.get((node, token))
            if child is None:
                child = index[(node, token)] = len(trie.tokens)
                trie.tokens.append(token)
                trie.parent.append(node)
                trie.depth.append(depth)
            path.append(child)
            node = child
        trie.paths.append(path)
    return trie


def walk_generator(key: str, turn: int) -> torch.Generator:
    """The random stream of one episode's walk down the candidate tree at one turn (one uniform per branching
    point, in order): keyed like `reply_generator`, so a walk depends on its episode alone."""
    return episode_generator(key, turn, "walk")


def inverse_cdf(logits: torch.Tensor, temperature: float, draws: Sequence[torch.Generator | None]) -> list[int]:
    """One index per row of `logits` [rows, n]: the argmax at temperature 0, else a draw from softmax(logits / T)
    by inverting its CDF at one uniform from the row's own generator (one number per draw, so a row's draws
    follow its episode's stream alone)."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    u = torch.cat([torch.rand(1, generator=draw, dtype=torch.float64) for draw in draws])
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    return picks.clamp(max=logits.shape[1] - 1).tolist()


@dataclass
class Walk:
    """One row's way down its candidate tree: the node reached (-1: none yet), how many of the path's tokens the
    cache already holds, and the log-prob of the path under constrained decoding."""

    trie: CandidateTrie
    kids: dict[int, list[int]]
    draw: torch.Generator | None
    node: int = -1
    fed: int = 0
    logp: float = 0.0

    def path_tokens(self) -> list[int]:
        """The tokens from the first one to the node reached."""
        out, node = [], self.node
        while node >= 0:
            out.append(self.trie.tokens[node])
            node = self.trie.parent[node]
        return out[::-1]

    def follow_forced(self) -> None:
        """Go down while the node has a single child: a token with no alternative needs no forward."""
        while len(self.kids.get(self.node, ())) == 1:
            self.node = self.kids[self.node][0]

    def leaf(self) -> bool:
        return self.node not in self.kids


class ConstrainedPolicy:
    """Scores the admissible actions with a per-episode KV cache shared by all candidates, and picks one by
    Gumbel-max with episode-keyed noise (`gumbel_pick`): an episode's actions depend on the model and the
    episode (its key, turn and candidates) only, never on the other episodes of its batch. The cache rows and
    their bookkeeping are `fedse.kvcache.EpisodeCache`'s (shared with `ReactPolicy`).

    With `walk_nodes` set (and trie scoring), a decision whose candidate tree has more than that many tokens
    is drawn by walking down the tree instead (`_walk`): at each branching point the model's next-token
    distribution restricted to the admissible children, one draw from the episode's own stream. Wordle's 400
    guesses make 1624 tree tokens, all scored in one wide forward with a [new, cached + new] mask; the walk
    feeds the chosen path only, about one token per branching point. At temperature 1 the two draw from the
    same distribution (the product of the renormalised token probabilities is the trie score), with other
    draws; at other temperatures the walk tempers each token, not the whole action.
    """

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 score: str = "sum", keep_turns: int | None = None, walk_nodes: int | None = None) -> None:
        self.agent = agent
        self.score = score
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.seed = seed
        self.walk_nodes = walk_nodes
        self.budget = min(context, agent.context)
        self.merged = MergedLora(agent.model)
        self.candidate_ids: dict[str, list[int]] = {}  # action text -> its tokens (the same actions recur)
        # per slot of the last call, in its order: every candidate's score (None for a walked decision) and the
        # chosen candidate's
        self.last_scores: list[torch.Tensor | None] = []
        self.last_logp: list[float] = []
        self.cache = EpisodeCache(agent, constrained=True)

    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        cache = self.cache
        order = cache.align(slots)  # slot j sits in row order[j]; the rows are what is computed on
        candidates = [list(row.slot.info["admissible_actions"]) for row in cache.rows]
        cand_ids = [[self._candidate(a) for a in cands] for cands in candidates]
        windows = [episode_window(self.agent, row.slot, self.budget, True, self.keep_turns, row.rendered)
                   for row in cache.rows]
        cache.windows_changed(windows)  # a window that dropped old turns: re-encode that row after its head
        deltas = cache.deltas(windows)
        cache.compact()
        tries = [candidate_trie(cs) for cs in cand_ids]
        walks = {i: Walk(t, t.children(), self._walk_draw(cache.rows[i].slot)) for i, t in enumerate(tries)
                 if self._walks(t)}
        with self.merged() if self.agent.device.type == "cpu" else contextlib.nullcontext():
            scores, last = self._score(cache.prefill(deltas), [CandidateTrie() if i in walks else t
                                                               for i, t in enumerate(tries)])
            self._walk(walks, last)
        chosen, logps, kept = [], [], []
        newline = self.agent.renderer.const("\n")
        for i, (row, cands) in enumerate(zip(cache.rows, candidates, strict=True)):
            walk = walks.get(i)
            if walk is not None:
                k = next(k for k, path in enumerate(walk.trie.paths) if path[-1] == walk.node)
                cache.decided(i, cand_ids[i][k][walk.fed:] + newline)
                logps.append(walk.logp)
                kept.append(None)
            else:
                s = scores[i]
                if self.score == "mean":
                    s = s / torch.tensor([len(c) for c in cand_ids[i]], dtype=s.dtype)
                k = gumbel_pick(s, self.temperature, noise_key(row.slot, self.seed), len(row.slot.history), cands)
                cache.decided(i, cand_ids[i][k] + newline)
                logps.append(float(s[k]))
                kept.append(scores[i])
            chosen.append(cands[k])
            row.slot.thoughts.append("")
        self.last_scores = [kept[i] for i in order]
        self.last_logp = [logps[i] for i in order]
        return [chosen[i] for i in order]

    def _walks(self, trie: CandidateTrie) -> bool:
        return (self.walk_nodes is not None and self.score == "trie" and len(trie.tokens) > self.walk_nodes
                and trie.walkable())

    def _walk_draw(self, slot: Slot) -> torch.Generator | None:
        return walk_generator(noise_key(slot, self.seed), len(slot.history)) if self.temperature > 0 else None

    def _walk(self, walks: dict[int, Walk], last: torch.Tensor) -> None:
        """Take every walking row down its tree at once: a draw at each branching point from the model's
        distribution over the admissible children (`siblings_normalised` of one node's children), then one
        forward over the rows that stopped at a branching point, feeding their path since the last feed (the
        tokens with no alternative ride along). The fed tokens stay in the cache: they are the reply."""
        kv = self.cache.kv
        here = {i: last[i] for i in walks}  # the hidden state that predicts row i's next token
        head = self.agent.model.get_output_embeddings()
        while here:
            branching = [i for i in here if len(walks[i].kids.get(walks[i].node, ())) > 1]
            if branching:
                logp = torch.log_softmax(head(torch.stack([here[i] for i in branching])).float(), dim=-1).cpu()
                for j, i in enumerate(branching):
                    walk = walks[i]
                    kids = walk.kids[walk.node]
                    children = logp[j, torch.tensor([walk.trie.tokens[c] for c in kids])].double()
                    children = children - torch.logsumexp(children, 0)
                    pick = inverse_cdf(children[None], self.temperature, [walk.draw])[0]
                    walk.node, walk.logp = kids[pick], walk.logp + float(children[pick])
            feeds: dict[int, list[int]] = {}
            for i in list(here):
                walk = walks[i]
                walk.follow_forced()
                if walk.leaf():
                    del here[i]
                    continue
                path = walk.path_tokens()
                feeds[i], walk.fed = path[walk.fed:], len(path)
            if feeds:
                hidden = kv.feed(self.agent, [feeds.get(r, []) for r in range(kv.rows)], self.cache.dtype)
                here = {i: hidden[i, len(feeds[i]) - 1] for i in feeds}

    def _candidate(self, action: str) -> list[int]:
        ids = self.candidate_ids.get(action)
        if ids is None:
            ids = self.candidate_ids[action] = self.agent.renderer.candidate(action)
        return ids

    def _score(self, deltas: list[list[int]], tries: list[CandidateTrie]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum of log-probs of every candidate of every row, from one forward pass over all rows, and each row's
        last hidden state of its delta (what predicts its first action token: where a walk starts).

        Each row is its delta (tokens new since its last decision) followed by its candidates' prefix tree
        (`candidate_trie`; empty for a row that walks); a tree node sees the cached prompt, the delta and its
        own ancestors, at the position it would have right after the prompt. The inputs are built as whole-row
        tensors and the tree's attention by pointer jumping along parent columns, so the Python work per
        decision is per row and per candidate token, not per (query, key) pair.
        """
        kv = self.cache.kv
        rows = len(deltas)
        width_d = max(len(d) for d in deltas)
        width_c = max(len(t.tokens) for t in tries)
        width = width_d + width_c
        ids = torch.full((rows, width), self.agent.tokenizer.pad_token_id or 0, dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        seg = torch.full((rows, width), -1, dtype=torch.long)  # -1 padding, 0 the delta, 1 a tree node
        parent = torch.arange(width).repeat(rows, 1)  # a node's parent column; itself where the chain stops
        src_rows, src_cols, path_nodes, path_cands = [], [], [], []
        nodes = cands = 0
        for i, (delta, trie) in enumerate(zip(deltas, tries, strict=True)):
            n, m, base = len(delta), len(trie.tokens), kv.length[i]
            ids[i, :n] = torch.tensor(delta)
            pos[i, :n] = torch.arange(base, base + n)
            seg[i, :n] = 0
            up = torch.tensor(trie.parent, dtype=torch.long)
            ids[i, width_d:width_d + m] = torch.tensor(trie.tokens, dtype=torch.long)
            pos[i, width_d:width_d + m] = torch.tensor(trie.depth, dtype=torch.long) + (base + n)
            seg[i, width_d:width_d + m] = 1
            parent[i, width_d:width_d + m] = torch.where(up >= 0, up + width_d, torch.arange(width_d, width_d + m))
            src_rows.append(torch.full((m,), i))
            src_cols.append(torch.where(up >= 0, up + width_d, n - 1))  # the column that predicts the node
            for k, path in enumerate(trie.paths):
                path_nodes.extend(nodes + j for j in path)
                path_cands.extend([cands + k] * len(path))
            nodes += m
            cands += len(trie.paths)
        block = self._tree(seg, parent, max(max(t.depth, default=0) for t in tries) + 1)
        hidden = kv.forward(self.agent, ids, pos, kv.mask(block, seg >= 0, self.cache.dtype))
        lengths = torch.tensor([len(d) for d in deltas])
        last = hidden[torch.arange(rows, device=hidden.device), (lengths - 1).to(hidden.device)]
        flat = torch.zeros(cands, dtype=torch.float64)
        if nodes:
            node_logp = self._token_logprobs(hidden, torch.cat(src_rows), torch.cat(src_cols),
                                             torch.tensor([t for trie in tries for t in trie.tokens]))
            if self.score == "trie":
                node_logp = siblings_normalised(node_logp, torch.cat(src_rows) * width + torch.cat(src_cols))
            along = node_logp[torch.tensor(path_nodes, dtype=torch.long)].double()
            flat.index_add_(0, torch.tensor(path_cands, dtype=torch.long), along)
        kv.crop(width_c)
        kv.commit(torch.arange(width_d)[None, :] < lengths[:, None])
        return list(flat.split([len(t.paths) for t in tries])), last

    @staticmethod
    def _tree(seg: torch.Tensor, parent: torch.Tensor, depth: int) -> torch.Tensor:
        """Which new token sees which [rows, new, new]: the delta is causal; a tree node sees the whole delta
        and its ancestors (found by `depth` pointer jumps); every token sees itself (padding only itself)."""
        rows, width = seg.shape
        sq, sk = seg[:, :, None], seg[:, None, :]
        new = torch.ones(width, width, dtype=torch.bool).tril() & (sk == 0) & (sq >= 0)
        chain = torch.arange(width).repeat(rows, 1)
        for _ in range(depth):
            new.scatter_(2, chain[:, :, None], True)
            chain = parent.gather(1, chain)
        return new

    def _token_logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tokens: torch.Tensor,
                        chunk: int = 2048) -> torch.Tensor:
        """log p(token | position) for the target list only: logits for just those positions, in chunks."""
        head = self.agent.model.get_output_embeddings()
        out = []
        for start in range(0, len(tokens), chunk):
            r, c = rows[start:start + chunk].to(hidden.device), cols[start:start + chunk].to(hidden.device)
            logits = head(hidden[r, c]).float()
            t = tokens[start:start + chunk].to(hidden.device)[:, None]
            out.append(torch.log_softmax(logits, dim=-1).gather(1, t).squeeze(1).cpu())
        return torch.cat(out)


@torch.no_grad()
def score_naive(agent: Agent, prompts: list[list[int]], cand_ids: list[list[list[int]]], batch: int = 64,
                ) -> list[torch.Tensor]:
    """Reference scorer: one padded row per (prompt + candidate), no cache. Same numbers, many times the work."""
    rows = [(i, k, p + c, len(p)) for i, (p, cs) in enumerate(zip(prompts, cand_ids, strict=True))
            for k, c in enumerate(cs)]
    scores = [torch.zeros(len(cs), dtype=torch.float64) for cs in cand_ids]
    pad = agent.tokenizer.pad_token_id or 0
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        width = max(len(r[2]) for r in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for j, (_, _, seq, _) in enumerate(part):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        logp = torch.log_softmax(agent.model(input_ids=ids.to(agent.device),
                                             attention_mask=mask.to(agent.device)).logits.float(), -1).cpu()
        for j, (i, k, seq, n) in enumerate(part):
            positions = torch.arange(n - 1, len(seq) - 1)
            scores[i][k] = logp[j, positions, torch.tensor(seq[n:])].double().sum()
    return scores


class ReactPolicy:
    """Free generation of `Thought: … Action: …`; the action is parsed from the text.

    Each episode keeps its row of the KV cache across turns (`fedse.kvcache.EpisodeCache`, as the constrained
    policy does): a turn feeds only what is new since its last reply (the observation and the reply header),
    decodes with the cache, and each row stops at its own end token and leaves the decoding batch. The reply
    stays cached as far as it agrees, token for token, with its rendering from the parsed thought and action
    (what the learner trains on and what a rebuilt window holds); the rest is replaced by that rendering, so
    the cached prompt is always exactly `episode_window`'s.

    Sampling is keyed per episode: each row draws its tokens with its own generator, seeded by blake2b of the
    episode's key and turn (`reply_generator`), so a reply depends on the model and the episode only, never
    on which episodes share its batch or when it joined it (continuous batching). Temperature 0 is greedy.
    """

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 max_new_tokens: int = 64, keep_turns: int | None = None) -> None:
        self.agent = agent
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.seed = seed
        self.budget = min(context, agent.context) - max_new_tokens
        self.max_new_tokens = max_new_tokens
        # the model's own end-of-turn token (its chat template's, fedse.prompt.Markup); an end written as several
        # tokens (a template of plain text) stops at its last one
        self.end_id = agent.renderer.end_ids()[-1]
        self.merged = MergedLora(agent.model)
        self.generated = 0  # tokens drawn so far: a benchmark's generated tokens/s
        self.cache = EpisodeCache(agent, constrained=False)
        # each decoding step reads every cached column of its rows (memory-bound on a CPU), so the holes are
        # squeezed out before a turn's decoding whenever they are a tenth of the width
        self.cache.compact_ratio, self.cache.compact_slack = 1.1, 8

    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        cache = self.cache
        order = cache.align(slots)
        windows = [episode_window(self.agent, row.slot, self.budget, False, self.keep_turns, row.rendered)
                   for row in cache.rows]
        cache.windows_changed(windows)
        deltas = cache.deltas(windows)
        cache.compact()
        with self.merged() if self.agent.device.type == "cpu" else contextlib.nullcontext():
            replies = self._generate(cache.prefill(deltas))
        self.generated += sum(map(len, replies))
        actions = [self._settle(i, reply) for i, reply in enumerate(replies)]
        return [actions[i] for i in order]

    def _generate(self, deltas: list[list[int]]) -> list[list[int]]:
        """Each row's reply tokens (its end token included when it wrote one): one forward over the deltas, then
        one per step over the rows still writing. The first row to end moves the others into a batch of their
        own (a copy), the ended rows of that batch go back to the cache, and so on."""
        kv = self.cache.kv
        draws = [reply_generator(noise_key(row.slot, self.seed), len(row.slot.history))
                 if self.temperature > 0 else None for row in self.cache.rows]
        hidden = kv.feed(self.agent, deltas, self.cache.dtype)
        ends = torch.tensor([len(d) - 1 for d in deltas], device=hidden.device)
        last = hidden[torch.arange(kv.rows, device=hidden.device), ends]
        kv.reserve(kv.width + self.max_new_tokens)
        replies: list[list[int]] = [[] for _ in range(kv.rows)]
        work, members = kv, list(range(kv.rows))  # the decoding batch and the cache row of each of its rows
        while True:
            tokens = self._sample(last, [draws[m] for m in members])
            going = []
            for j, (m, token) in enumerate(zip(members, tokens, strict=True)):
                replies[m].append(token)
                if token != self.end_id and len(replies[m]) < self.max_new_tokens and not self._complete(replies[m]):
                    going.append(j)
            if len(going) < len(members):
                ended = [j for j in range(len(members)) if j not in set(going)]
                if work is not kv:
                    kv.put([members[j] for j in ended], work, ended)
                if not going:
                    return replies
                work = work.take(going, spare=self.max_new_tokens)
                members, tokens = [members[j] for j in going], [tokens[j] for j in going]
            last = work.feed(self.agent, [[t] for t in tokens], self.cache.dtype)[:, 0]

    def _complete(self, reply: list[int]) -> bool:
        """Whether the reply's action line is whole (`complete_reply`): the tokens after it would change neither
        thought nor action, so the row stops there instead of writing on to its end token."""
        if reply[-1] not in self.agent.renderer.newline_ids:
            return False
        text = self.agent.tokenizer.decode(reply, skip_special_tokens=True)
        return complete_reply(text.split(self.agent.renderer.markup.end)[0]) is not None

    def _sample(self, hidden: torch.Tensor, draws: list[torch.Generator | None]) -> list[int]:
        """The next token of each row (`inverse_cdf` over the vocabulary)."""
        logits = self.agent.model.get_output_embeddings()(hidden).float().cpu()
        return inverse_cdf(logits, self.temperature, draws)

    def _settle(self, i: int, reply: list[int]) -> str:
        """Row i's action from its reply; the cache keeps the reply as far as it matches its rendering."""
        row, kv = self.cache.rows[i], self.cache.kv
        thought, action = parse_reply(self.agent.tokenizer.decode(reply, skip_special_tokens=True),
                                      self.agent.renderer.markup.end)
        content, close = self.agent.renderer.reply(action, thought)
        fed = len(reply) - 1  # the last token drawn was never fed to the model
        keep = min(fed, next((k for k, (a, b) in enumerate(zip(reply, content, strict=False)) if a != b),
                             min(len(reply), len(content))))
        kv.truncate(i, kv.length[i] - (fed - keep))
        self.cache.decided(i, content[keep:] + close)
        row.slot.thoughts.append(thought)
        return action


def reply_generator(key: str, turn: int) -> torch.Generator:
    """The random stream of one episode's reply at one turn: the same in every process and whatever else is
    decoded alongside."""
    return episode_generator(key, turn, "reply")


def episode_generator(key: str, turn: int, use: str) -> torch.Generator:
    """A generator seeded by blake2b of (episode key, turn, use): Python's `hash()` is salted per process."""
    digest = hashlib.blake2b(f"{key}\x1f{turn}\x1f{use}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)


def parse_reply(text: str, end: str = IM_END) -> tuple[str, str]:
    """(thought, action) of a generated reply (cut at the model's end-of-turn text `end`, and after its first
    whole `Action:` line: what follows the action is not part of the reply, so decoding can stop there); without
    an `Action:` line the whole text is the action."""
    text = text.split(end)[0]
    text = (complete_reply(text) or text).strip()
    thought_match = _THOUGHT_RE.search(text)
    thought = thought_match.group(1).strip() if thought_match else ""
    action_match = _ACTION_RE.search(text)
    action = action_match.group(1).strip().splitlines()[0].strip() if action_match and action_match.group(
        1).strip() else text
    return thought, action


def complete_reply(text: str) -> str | None:
    """The reply up to the end of its first whole `Action:` line (the newline included), or None while it has
    none: anything written after it leaves `parse_reply` unchanged."""
    match = _ACTION_LINE_RE.search(text)
    return text[:match.end()] if match else None


def make_policy(agent: Agent, spec: PolicySpec, evaluation: bool, seed: int = 0) -> Any:
    """The policy `spec` asks for, at its evaluation or its exploration temperature."""
    temperature = spec.temperature_for(evaluation)
    if spec.resolved_mode(agent) == "constrained":
        return ConstrainedPolicy(agent, temperature, seed, spec.context, spec.score, spec.history_turns,
                                 spec.walk_nodes)
    return ReactPolicy(agent, temperature, seed, spec.context, spec.max_new_tokens, spec.history_turns)
