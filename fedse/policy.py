"""How the agent acts: two ways, both batched across the running episodes of a pool.

* ``constrained`` — the action is drawn from the environment's admissible actions by the model's own
  probabilities: p(a) ∝ exp(log p(a | prompt) / T). All running episodes are scored in **one** forward pass
  per turn: each row holds only the tokens new since the last turn, followed by the candidate actions as a
  prefix tree (a shared prefix is scored once), with a 4-D attention mask that lets each candidate token see
  the cached prompt and its own prefix only. The KV cache of the prompt is computed once and reused across
  turns; the candidate block is cropped off after scoring. This is the default for the tiny model.
* ``react`` — the paper's format for real LLMs: the model writes `Thought: … Action: …` (generation with the
  KV cache), and the action is parsed from the text. Unparseable text goes to the environment as is; it
  answers with feedback.

Temperature 1.0 explores; temperature 0 is greedy. Sampling is by common random numbers: each episode carries
a key (`Slot.key`, set by `fedse.rollout`), and the constrained policy draws by Gumbel-max with noise that is a
hash of (key, turn, action text), so an episode plays the same whatever else shares its batch, and two
adapters evaluated on the same keys face the same draws (their difference is not drowned in sampling noise).
When an episode outgrows the context window, the prompt keeps the system message and first observation
(which states the task) and drops the oldest turns; in constrained mode it drops them down to half the
window, so the rebuilt cache then lasts several turns, and the head's cached keys are kept across rebuilds.
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
from fedse.model import Agent
from fedse.prompt import IM_END, Window, fit_window, prompt_tail

_ACTION_RE = re.compile(r"Action:\s*(.*)", re.IGNORECASE)
_THOUGHT_RE = re.compile(r"Thought:\s*(.*?)\s*(?:Action:|$)", re.IGNORECASE | re.DOTALL)


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
    threads: int | None = Field(1, ge=1, description="torch CPU threads while acting (rollouts); null = leave "
                                "torch's setting. On a shared CPU, threads that wait for each other at every "
                                "small operation cost far more than they bring")
    score: str = Field("trie", pattern="^(sum|mean|trie)$",
                       description="constrained: a candidate's log-prob summed over its tokens, their mean, or "
                       "trie: constrained decoding (each token renormalised over the admissible continuations)")
    history_turns: int | None = Field(6, ge=1, description="keep at most this many recent turns; null = all "
                                      "that fit in the context")

    def temperature_for(self, evaluation: bool) -> float:
        return self.eval_temperature if evaluation else self.temperature

    def resolved_mode(self, agent: Agent) -> str:
        if self.mode != "auto":
            return self.mode
        return "constrained" if agent.name.startswith("tiny") else "react"


@dataclass
class Rendered:
    """Token ids of an episode's head and of each finished turn, extended as the episode goes on."""

    head: list[int] | None = None
    turns: list[list[int]] = field(default_factory=list)


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


class ConstrainedPolicy:
    """Scores the admissible actions with a per-episode KV cache shared by all candidates, and picks one by
    Gumbel-max with episode-keyed noise (`gumbel_pick`): an episode's actions depend on the model and the
    episode (its key, turn and candidates) only, never on the other episodes of its batch."""

    compact_ratio = 2.0  # compact the cache once its columns exceed ratio x the longest row's real tokens + slack
    compact_slack = 64

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 score: str = "sum", keep_turns: int | None = None) -> None:
        self.agent = agent
        self.score = score
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.seed = seed
        self.budget = min(context, agent.context)
        self.merged = MergedLora(agent.model)
        self.candidate_ids: dict[str, list[int]] = {}  # action text -> its tokens (the same actions recur)
        self.last_scores: list[torch.Tensor] = []
        self.slots: list[Slot] = []
        self.rendered: list[Rendered] = []
        self._reset_cache([])

    # ------------------------------------------------------------------ cache bookkeeping
    def _reset_cache(self, slots: list[Slot]) -> None:
        # tokenised histories outlive the KV cache: a slot still running keeps its memo
        memos = {id(s): m for s, m in zip(self.slots, self.rendered, strict=True)}
        self.rendered = [memos.get(id(s), Rendered()) for s in slots]
        self.slots = list(slots)
        self.cache: Any = None
        self.valid = torch.zeros(len(slots), 0, dtype=torch.bool)  # which cached positions are real tokens
        self.length = [0] * len(slots)  # real tokens cached per row = next position id
        self.absorbed = [0] * len(slots)  # history entries already in the cache (or pending)
        self.pending: list[list[int]] = [[] for _ in slots]
        self.dropped = [0] * len(slots)  # turns each cached row's window leaves out
        self.restart = [True] * len(slots)  # rows whose next delta is their (re)fitted window, from `skip`
        self.skip = [0] * len(slots)  # window tokens a restarting row still has cached (its head)
        self.head = [False] * len(slots)  # whether a row's first cached tokens are its episode's head

    def _align(self, slots: list[Slot]) -> None:
        """Keep the cache rows of the slots still running; a different set of episodes starts afresh."""
        index = {id(s): i for i, s in enumerate(self.slots)}
        if not all(id(s) in index for s in slots):
            self._reset_cache(slots)
            return
        keep = [index[id(s)] for s in slots]
        if keep == list(range(len(self.slots))):
            return
        rows = torch.tensor(keep, dtype=torch.long)
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        for name in ("length", "absorbed", "pending", "dropped", "restart", "skip", "head", "rendered"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        self.slots = list(slots)

    def _restart_row(self, i: int, window: list[int]) -> None:
        """Row i's window dropped old turns: forget its cached tokens except the head (system message and
        first observation), which sits at the same positions in every window and so keeps its keys and values;
        the rest of the new window is fed after it."""
        head = self.rendered[i].head or []
        keep = len(head) if self.head[i] and window[:len(head)] == head else 0
        if keep:
            cols = self.valid[i].nonzero().squeeze(1)[:keep]
            self.valid[i] = False
            self.valid[i, cols] = True
        else:
            self.valid[i] = False
        self.length[i] = keep
        self.skip[i] = keep
        self.pending[i] = []
        self.restart[i] = True

    def _compact(self) -> None:
        """Drop the padding and forgotten columns from the cache once they outnumber the real ones: a gather of
        the cached keys and values (positions live in `position_ids`, so moving columns changes nothing), far
        cheaper than attending over the holes at every later step or re-encoding the windows."""
        if self.cache is None or self.valid.numel() == 0:
            return
        width = int(self.valid.sum(1).max())
        if self.valid.shape[1] <= self.compact_ratio * width + self.compact_slack:
            return
        order = torch.sort(~self.valid, dim=1, stable=True).indices[:, :width]  # real columns first, in order
        self.valid = self.valid.gather(1, order)
        for layer in self.cache.layers:
            index = order.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))

    def _deltas(self, windows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Tokens each row needs appended before its next decision (everything since the last one)."""
        r = self.agent.renderer
        deltas = []
        for i, slot in enumerate(self.slots):
            if self.cache is None or self.restart[i]:
                window, skip = windows[i][0], self.skip[i] if self.cache is not None else 0
                head = self.rendered[i].head or []
                deltas.append(window[skip:])
                self.head[i] = skip > 0 or window[:len(head)] == head
                self.dropped[i] = windows[i][1]
                self.restart[i] = False
                self.skip[i] = 0
                continue
            new = slot.history[self.absorbed[i]:]
            ids = list(self.pending[i])
            for j, (action, observation) in enumerate(new):
                if j > 0:  # an action this policy did not choose (a resumed slot): render it in full
                    content, close = r.reply(action)
                    ids += r.assistant_open() + content + close
                ids += r.user(observation)
            deltas.append(ids + prompt_tail(r, True))
        return deltas

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        self._align(slots)
        candidates = [list(s.info["admissible_actions"]) for s in slots]
        cand_ids = [[self._candidate(a) for a in cands] for cands in candidates]
        windows = [episode_window(self.agent, s, self.budget, True, self.keep_turns, memo)
                   for s, memo in zip(slots, self.rendered, strict=True)]
        if self.cache is not None:
            for i, (window, dropped) in enumerate(windows):
                if dropped != self.dropped[i]:
                    self._restart_row(i, window)  # its window dropped old turns: re-encode after the head
        deltas = self._deltas(windows)
        longest = max(len(c) for cs in cand_ids for c in cs)
        if self.cache is not None and any(self.length[i] + len(d) + longest > self.agent.context
                                          for i, d in enumerate(deltas)):
            self._reset_cache(slots)  # positions would run past the model's window: start afresh
            deltas = self._deltas(windows)
        self._compact()
        scores = self._score(deltas, cand_ids)
        self.last_scores = scores
        chosen = []
        for i, (slot, cands, s) in enumerate(zip(slots, candidates, scores, strict=True)):
            if self.score == "mean":
                s = s / torch.tensor([len(c) for c in cand_ids[i]], dtype=s.dtype)
            k = gumbel_pick(s, self.temperature, noise_key(slot, self.seed), len(slot.history), cands)
            chosen.append(cands[k])
            self.pending[i] = cand_ids[i][k] + self.agent.renderer.const("\n")
            self.absorbed[i] = len(slot.history)
            slot.thoughts.append("")
        return chosen

    def _candidate(self, action: str) -> list[int]:
        ids = self.candidate_ids.get(action)
        if ids is None:
            ids = self.candidate_ids[action] = self.agent.renderer.candidate(action)
        return ids

    def _score(self, deltas: list[list[int]], cand_ids: list[list[list[int]]]) -> list[torch.Tensor]:
        """Sum of log-probs of every candidate of every row, from one forward pass over all rows.

        Each row is its delta (tokens new since its last decision) followed by its candidates' prefix tree
        (`candidate_trie`); a tree node sees the cached prompt, the delta and its own ancestors, at the
        position it would have right after the prompt. The inputs are built as whole-row tensors and the
        tree's attention by pointer jumping along parent columns, so the Python work per decision is per row
        and per candidate token, not per (query, key) pair.
        """
        model, device = self.agent.model, self.agent.device
        tries = [candidate_trie(cs) for cs in cand_ids]
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
            n, m, base = len(delta), len(trie.tokens), self.length[i]
            ids[i, :n] = torch.tensor(delta)
            pos[i, :n] = torch.arange(base, base + n)
            seg[i, :n] = 0
            up = torch.tensor(trie.parent, dtype=torch.long)
            ids[i, width_d:width_d + m] = torch.tensor(trie.tokens)
            pos[i, width_d:width_d + m] = torch.tensor(trie.depth) + (base + n)
            seg[i, width_d:width_d + m] = 1
            parent[i, width_d:width_d + m] = torch.where(up >= 0, up + width_d, torch.arange(width_d, width_d + m))
            src_rows.append(torch.full((m,), i))
            src_cols.append(torch.where(up >= 0, up + width_d, n - 1))  # the column that predicts the node
            for k, path in enumerate(trie.paths):
                path_nodes.extend(nodes + j for j in path)
                path_cands.extend([cands + k] * len(path))
            nodes += m
            cands += len(trie.paths)
        mask = self._mask(seg, parent, max(max(t.depth, default=0) for t in tries) + 1)
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
        with self.merged() if device.type == "cpu" else contextlib.nullcontext():
            out = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                        cache=self.cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        node_logp = self._token_logprobs(out.hidden_states[-1], torch.cat(src_rows), torch.cat(src_cols),
                                         torch.tensor([t for trie in tries for t in trie.tokens]))
        if self.score == "trie":
            node_logp = siblings_normalised(node_logp, torch.cat(src_rows) * width + torch.cat(src_cols))
        self.cache.crop(-width_c)
        lengths = torch.tensor([len(d) for d in deltas])
        self.valid = torch.cat([self.valid, torch.arange(width_d)[None, :] < lengths[:, None]], dim=1)
        self.length = [length + len(d) for length, d in zip(self.length, deltas, strict=True)]
        along = node_logp[torch.tensor(path_nodes, dtype=torch.long)].double()
        flat = torch.zeros(cands, dtype=torch.float64).index_add_(0, torch.tensor(path_cands, dtype=torch.long), along)
        return list(flat.split([len(t.paths) for t in tries]))

    def _mask(self, seg: torch.Tensor, parent: torch.Tensor, depth: int) -> torch.Tensor:
        """The additive 4-D attention mask [rows, 1, new, cached + new]: real tokens see the row's valid cached
        columns; the delta is causal; a tree node sees the whole delta and its ancestors (found by `depth`
        pointer jumps); padding sees only itself (a query with no key at all would give NaN, which would leak
        into the cache through V)."""
        rows, width = seg.shape
        sq, sk = seg[:, :, None], seg[:, None, :]
        new = torch.ones(width, width, dtype=torch.bool).tril() & (sk == 0) & (sq >= 0)
        chain = torch.arange(width).repeat(rows, 1)
        for _ in range(depth):
            new.scatter_(2, chain[:, :, None], True)
            chain = parent.gather(1, chain)
        allow = torch.cat([self.valid[:, None, :] & (sq >= 0), new], dim=2)
        dtype = next(p.dtype for p in self.agent.model.parameters())
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
        return mask[:, None]

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
    """Free generation of `Thought: … Action: …` with the KV cache; the action is parsed from the text.

    Not CRN-exact: free text has no candidate list to key noise by, and `generate` samples the whole batch
    from one random stream. The stream is seeded from the batch's episode keys and turns (`batch_seed`), so a
    rollout replays exactly, but an episode's draws depend on which episodes share its batch and in which
    order (the batch size and chunking matter, unlike in `ConstrainedPolicy`).
    """

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 max_new_tokens: int = 64, keep_turns: int | None = None) -> None:
        self.agent = agent
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.seed = seed
        self.budget = min(context, agent.context) - max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.end_id = agent.tokenizer.convert_tokens_to_ids(IM_END)

    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        tok = self.agent.tokenizer
        prompts = [episode_tokens(self.agent, s, self.budget, False, self.keep_turns) for s in slots]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's continuation starts at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(batch_seed(slots, self.seed))
        sample = self.temperature > 0
        out = self.agent.model.generate(
            input_ids=ids.to(self.agent.device), attention_mask=mask.to(self.agent.device),
            max_new_tokens=self.max_new_tokens, do_sample=sample, temperature=self.temperature if sample else None,
            top_k=0 if sample else None, top_p=1.0 if sample else None, eos_token_id=self.end_id, pad_token_id=pad)
        actions = []
        for slot, row in zip(slots, out[:, width:].cpu(), strict=True):
            text = tok.decode(row, skip_special_tokens=True)
            thought, action = parse_reply(text)
            slot.thoughts.append(thought)
            actions.append(action)
        return actions


def batch_seed(slots: Sequence[Slot], seed: int) -> int:
    """A seed that is a pure function of the batch's episode keys and turns (blake2b, stable across
    processes)."""
    text = "\x1e".join(f"{noise_key(s, seed)}\x1f{len(s.history)}" for s in slots)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def parse_reply(text: str) -> tuple[str, str]:
    """(thought, action) of a generated reply; without an `Action:` line the whole text is the action."""
    text = text.split(IM_END)[0].strip()
    thought_match = _THOUGHT_RE.search(text)
    thought = thought_match.group(1).strip() if thought_match else ""
    action_match = _ACTION_RE.search(text)
    action = action_match.group(1).strip().splitlines()[0].strip() if action_match and action_match.group(
        1).strip() else text
    return thought, action


def make_policy(agent: Agent, spec: PolicySpec, evaluation: bool, seed: int = 0) -> Any:
    """The policy `spec` asks for, at its evaluation or its exploration temperature."""
    temperature = spec.temperature_for(evaluation)
    if spec.resolved_mode(agent) == "constrained":
        return ConstrainedPolicy(agent, temperature, seed, spec.context, spec.score, spec.history_turns)
    return ReactPolicy(agent, temperature, seed, spec.context, spec.max_new_tokens, spec.history_turns)
