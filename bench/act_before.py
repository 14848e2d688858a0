"""The acting code as it was before issue 29 (commit 0358bdf), kept only for `bench/bound.py`'s before/after.

ReAct re-prefills its whole left-padded prompt every turn with `generate` (nothing cached across turns) and
decodes every row until all stop; one random stream per batch, seeded from the batch's keys. The constrained
policy asks the model for every layer's hidden states and resets its cache whenever a new episode joins.
Episodes run in fixed chunks of `batch_size`, each until its longest episode ends. The benchmark runs this
next to `fedse.rollout.rollout` in the same process, so the ratio after/before is measured on the same
machine state. Do not use it anywhere else; the helpers it imports from `fedse.policy` are unchanged by
issue 29.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedse.envs.base import TextEnv
from fedse.envs.pool import EnvPool, Slot
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import (
    MergedLora,
    PolicySpec,
    Rendered,
    candidate_trie,
    episode_tokens,
    episode_window,
    gumbel_pick,
    noise_key,
    parse_reply,
    siblings_normalised,
)
from fedse.prompt import IM_END, prompt_tail
from fedse.rollout import Episodes, episode_key
from fedse.threads import torch_threads


def rollout_before(agent: Agent, env_name: str, task_ids: Sequence[int], spec: PolicySpec, evaluation: bool,
                   seed: int, adapter_hash: str | None = None, round: int | None = None,
                   env_options: dict[str, Any] | None = None, advance: Callable[[int], None] | None = None,
                   passes: int = 1) -> Episodes:
    """`fedse.rollout.rollout` as it was: chunks of `batch_size`, each run until its longest episode ends."""
    if passes < 1:
        raise ValueError(f"passes={passes}: every task is played at least once")
    started = time.perf_counter()
    episodes = [(task, p) for task in task_ids for p in range(passes)]
    keys = [episode_key(seed, env_name, task, evaluation, round, p) for task, p in episodes]
    records = Episodes()
    policy = make_policy_before(agent, spec, evaluation, seed)

    def act(envs: list[TextEnv], slots: list[Slot]) -> list[str]:
        records.pace.decisions += len(slots)
        return policy(envs, slots)

    with torch_threads(spec.threads):
        for start in range(0, len(episodes), spec.batch_size):
            chunk = slice(start, start + spec.batch_size)
            pool = EnvPool(lambda: make_env(env_name, **(env_options or {})), [t for t, _ in episodes[chunk]],
                           keys[chunk])
            pool.run(act)
            records.extend(pool.trajectories(env_name, policy="agent", adapter_hash=adapter_hash, round=round,
                                             seed=seed, temperature=spec.temperature_for(evaluation)))
            if advance:
                advance(len(pool.slots))
    records.pace.seconds = time.perf_counter() - started
    return records


def make_policy_before(agent: Agent, spec: PolicySpec, evaluation: bool, seed: int = 0) -> Any:
    temperature = spec.temperature_for(evaluation)
    if spec.resolved_mode(agent) == "constrained":
        return ConstrainedPolicyBefore(agent, temperature, seed, spec.context, spec.score, spec.history_turns)
    return ReactPolicyBefore(agent, temperature, seed, spec.context, spec.max_new_tokens, spec.history_turns)


class ConstrainedPolicyBefore:
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


class ReactPolicyBefore:
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

