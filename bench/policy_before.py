"""The constrained policy as it was before the speed work (commit 2237e69), kept only for `bench/policy.py`.

Candidates laid side by side (no prefix tree), inputs and targets built as per-token Python lists, the whole
window re-encoded when it drops turns (also the head), the cache rebuilt to compact it, LoRA run unmerged,
and sampling from one torch.Generator per chunk. The benchmark runs it next to `fedse.policy` in the same
process so that the ratio new/old is measured on the same machine state (this machine is noisy: compare
ratios from one run, never absolute numbers across runs). Do not use it anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedse.envs.base import TextEnv
from fedse.envs.pool import EnvPool, Slot
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import PolicySpec, Rendered, episode_window
from fedse.prompt import ACTION_PREFIX
from fedse.trajectory import Trajectory


def rollout_before(agent: Agent, env_name: str, task_ids: Sequence[int], spec: PolicySpec, evaluation: bool,
                   seed: int) -> list[Trajectory]:
    """The old `fedse.rollout.rollout`: chunks of `batch_size`, a fresh seeded policy per chunk."""
    records: list[Trajectory] = []
    temperature = spec.temperature_for(evaluation)
    for start in range(0, len(task_ids), spec.batch_size):
        pool = EnvPool(lambda: make_env(env_name), list(task_ids[start:start + spec.batch_size]))
        pool.run(ConstrainedPolicyBefore(agent, temperature, seed + start, spec.context, spec.score,
                                         spec.history_turns))
        records.extend(pool.trajectories(env_name, policy="agent", seed=seed, temperature=temperature))
    return records


class ConstrainedPolicyBefore:
    """Scores the admissible actions with a per-episode KV cache shared by all candidates (as of 2237e69)."""

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 score: str = "sum", keep_turns: int | None = None) -> None:
        self.agent = agent
        self.score = score
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed)
        self.budget = min(context, agent.context)
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
        self.restart = [True] * len(slots)  # rows whose next delta is their whole (re)fitted window

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
        self.length = [self.length[i] for i in keep]
        self.absorbed = [self.absorbed[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
        self.dropped = [self.dropped[i] for i in keep]
        self.restart = [self.restart[i] for i in keep]
        self.rendered = [self.rendered[i] for i in keep]
        self.slots = list(slots)

    def _restart_row(self, i: int) -> None:
        """Forget row i's cached tokens (masked out from now on) and feed its new window from position 0."""
        self.valid[i] = False
        self.length[i] = 0
        self.pending[i] = []
        self.restart[i] = True

    def _deltas(self, windows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Tokens each row needs appended before its next decision (everything since the last one)."""
        r = self.agent.renderer
        deltas = []
        for i, slot in enumerate(self.slots):
            if self.cache is None or self.restart[i]:
                deltas.append(windows[i][0])
                self.dropped[i] = windows[i][1]
                self.restart[i] = False
                continue
            new = slot.history[self.absorbed[i]:]
            ids = list(self.pending[i])
            for j, (action, observation) in enumerate(new):
                if j > 0:  # an action this policy did not choose (a resumed slot): render it in full
                    content, close = r.reply(action)
                    ids += r.assistant_open() + content + close
                ids += r.user(observation)
            deltas.append(ids + r.assistant_open() + r.const(ACTION_PREFIX))
        return deltas

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        self._align(slots)
        candidates = [list(s.info["admissible_actions"]) for s in slots]
        cand_ids = [[self.agent.renderer.candidate(a) for a in cands] for cands in candidates]
        windows = [episode_window(self.agent, s, self.budget, True, self.keep_turns, memo)
                   for s, memo in zip(slots, self.rendered, strict=True)]
        moved = [i for i, (_, dropped) in enumerate(windows) if dropped != self.dropped[i]]
        if self.cache is not None and len(moved) == len(slots):
            self._reset_cache(slots)  # every window dropped turns (episodes in lockstep): start afresh
        for i in moved if self.cache is not None else []:
            self._restart_row(i)  # its window dropped old turns (rare, by hysteresis): re-encode that row
        deltas = self._deltas(windows)
        longest = max(len(c) for cs in cand_ids for c in cs)
        if self.cache is not None and (self.valid.shape[1] > 4 * self.budget or any(
                self.length[i] + len(d) + longest > self.agent.context for i, d in enumerate(deltas))):
            self._reset_cache(slots)  # too many padding holes accumulated, or positions run out: compact
            deltas = self._deltas(windows)
        scores = self._score(deltas, cand_ids)
        self.last_scores = scores
        chosen = []
        for i, (slot, cands, s) in enumerate(zip(slots, candidates, scores, strict=True)):
            if self.score == "mean":
                s = s / torch.tensor([len(c) for c in cand_ids[i]], dtype=s.dtype)
            k = self._pick(s)
            chosen.append(cands[k])
            self.pending[i] = cand_ids[i][k] + self.agent.renderer.const("\n")
            self.absorbed[i] = len(slot.history)
            slot.thoughts.append("")
        return chosen

    def _pick(self, scores: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores.double() / self.temperature, dim=0)
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def _score(self, deltas: list[list[int]], cand_ids: list[list[list[int]]]) -> list[torch.Tensor]:
        """Sum of log-probs of every candidate of every row, from one forward pass over all rows."""
        model, device = self.agent.model, self.agent.device
        rows = len(deltas)
        width_d = max(len(d) for d in deltas)
        width_c = max(sum(len(c) for c in cs) for cs in cand_ids)
        width = width_d + width_c
        old = self.valid.shape[1]
        pad = self.agent.tokenizer.pad_token_id or 0
        ids = [[pad] * width for _ in range(rows)]
        pos = [[0] * width for _ in range(rows)]
        seg = [[-1] * width for _ in range(rows)]  # -1 padding, 0 the delta, k + 1 candidate k
        targets: list[tuple[int, int, int, int]] = []  # (row, position predicting, token, candidate)
        for i, (delta, cands) in enumerate(zip(deltas, cand_ids, strict=True)):
            n, base = len(delta), self.length[i]
            ids[i][:n], pos[i][:n], seg[i][:n] = delta, range(base, base + n), [0] * n
            offset = width_d
            for k, cand in enumerate(cands):
                m = len(cand)
                ids[i][offset:offset + m] = cand
                pos[i][offset:offset + m] = range(base + n, base + n + m)
                seg[i][offset:offset + m] = [k + 1] * m
                targets.append((i, n - 1, cand[0], k))
                targets.extend((i, offset + t - 1, cand[t], k) for t in range(1, m))
                offset += m
        ids_t, pos_t, seg_t = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)
        # a new token sees earlier tokens of the delta and of its own candidate; padding sees only itself
        # (a query with no key at all would give NaN, which would leak into the cache through V)
        sq, sk = seg_t[:, :, None], seg_t[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        new = causal & ((sk == 0) | (sk == sq)) & (sq >= 0) & (sk >= 0)
        new |= torch.eye(width, dtype=torch.bool)
        allow = torch.cat([self.valid[:, None, :].expand(rows, width, old) & (sq >= 0), new], dim=2)
        dtype = next(p.dtype for p in model.parameters())
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
        out = model(input_ids=ids_t.to(device), position_ids=pos_t.to(device), attention_mask=mask[:, None].to(device),
                    cache=self.cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        t = torch.tensor(targets, dtype=torch.long)
        logprobs = self._token_logprobs(hidden, t)
        self.cache.crop(-width_c)
        self.valid = torch.cat([self.valid, torch.arange(width_d)[None, :] < torch.tensor(
            [len(d) for d in deltas])[:, None]], dim=1)
        self.length = [length + len(d) for length, d in zip(self.length, deltas, strict=True)]
        scores = []
        for i, cands in enumerate(cand_ids):
            row = t[:, 0] == i
            scores.append(torch.zeros(len(cands), dtype=torch.float64).index_add_(
                0, t[row, 3], logprobs[row].double()))
        return scores

    def _token_logprobs(self, hidden: torch.Tensor, t: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """log p(token | position) for the target list only: logits for just those positions, in chunks."""
        head = self.agent.model.get_output_embeddings()
        out = []
        for start in range(0, len(t), chunk):
            part = t[start:start + chunk].to(hidden.device)
            logits = head(hidden[part[:, 0], part[:, 1]]).float()
            out.append(torch.log_softmax(logits, dim=-1).gather(1, part[:, 2:3]).squeeze(1).cpu())
        return torch.cat(out)
