"""How an episode becomes tokens, identically for acting and for learning.

An episode is a chat: a fixed system message, then the environment's observations as user turns and the
agent's replies (`Thought: …` optional, then `Action: …`) as assistant turns, in ChatML markup. Every piece is
tokenised on its own and the pieces concatenated, so the tokens of a prefix never change when the episode
grows: the policy can extend its KV cache turn by turn, and the learner sees exactly the tokens the policy
saw. Only assistant content (and its end marker) carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

SYSTEM = ("You are an agent acting in a text environment. Each user message is what you observe. "
          "Reply with the next action as 'Action: <action>', optionally after 'Thought: <reasoning>'.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_PREFIX = "Action: "
SPECIAL_TOKENS = (IM_START, IM_END)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Encoded:
    """Token ids of an episode and, per token, whether the agent produced it (the loss mask)."""

    ids: list[int] = field(default_factory=list)
    agent: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], agent: bool = False) -> None:
        self.ids.extend(ids)
        self.agent.extend([agent] * len(ids))


class Renderer:
    """Piece-wise tokeniser of chat episodes, with a cache for the constant pieces."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self._const: dict[str, list[int]] = {}

    def piece(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def const(self, text: str) -> list[int]:
        """Pieces that never change (markup, headers) are tokenised once."""
        if text not in self._const:
            self._const[text] = self.piece(text)
        return self._const[text]

    def header(self, role: str) -> list[int]:
        return self.const(f"{IM_START}{role}\n")

    def end(self) -> list[int]:
        return self.const(f"{IM_END}\n")

    def system(self) -> list[int]:
        return self.header("system") + self.const(SYSTEM) + self.end()

    def user(self, observation: str) -> list[int]:
        return self.header("user") + self.piece(observation) + self.end()

    def assistant_open(self) -> list[int]:
        """What the prompt ends with when the agent is to act (constrained mode also commits to `Action: `)."""
        return self.header("assistant")

    def reply(self, action: str, thought: str = "") -> tuple[list[int], list[int]]:
        """(agent tokens, closing tokens) of one assistant turn; the end marker is the agent's to predict."""
        content = (self.piece(f"Thought: {thought}\n") if thought else []) + self.const(ACTION_PREFIX) \
            + self.piece(action) + self.const(IM_END)
        return content, self.const("\n")

    def candidate(self, action: str) -> list[int]:
        """Tokens scored for an admissible action after `assistant_open() + Action: ` in constrained mode."""
        return self.piece(action) + self.const(IM_END)

    def episode(self, observations: list[str], actions: list[str], thoughts: list[str] | None = None,
                ) -> Encoded:
        """A whole (finished or running) episode: observation i is followed by action i when there is one."""
        thoughts = thoughts or [""] * len(actions)
        enc = Encoded()
        enc.add(self.system())
        for i, observation in enumerate(observations):
            enc.add(self.user(observation))
            if i < len(actions):
                enc.add(self.assistant_open())
                content, close = self.reply(actions[i], thoughts[i])
                enc.add(content, agent=True)
                enc.add(close)
        return enc


@dataclass(frozen=True)
class Window:
    """How an agent's prompt is framed when it acts: at most `budget` tokens before its reply (the head, then as
    many recent turns as fit), at most `keep_turns` turns (None = as many as fit). The policy acts in it and the
    learner cuts its examples by it (`fedse.learner.acting_examples`), so the two cannot drift apart."""

    budget: int
    keep_turns: int | None = None
    refill: float = 0.5


def dropped_turns(lengths: list[int], head: int, window: Window) -> list[int]:
    """For t = 0 … len(lengths): how many of the oldest turns the window leaves out when the episode has t turns
    (turn i being `lengths[i]` tokens after a head of `head` tokens).

    Why this policy: the first observation holds the instruction and must survive; recent turns hold the
    state; the middle of a long episode is what an agent can best afford to forget. Turns are dropped with
    hysteresis, replaying the episode turn by turn: (1) beyond `keep_turns` turns, the oldest go in blocks of
    `keep_turns // 2`; (2) whenever the window would still exceed `budget` tokens, the oldest go until it fits
    in `refill · budget`. Between drops the window only grows, so a KV cache of it stays valid instead of
    being rebuilt at every step; rule (1) depends on the turn count alone, so episodes that run in lockstep
    drop together (one rebuild for the batch). The result is a pure function of the turns.
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    target = int(window.budget * window.refill)
    keep = window.keep_turns
    block = max(1, (keep or 0) // 2)
    dropped = [0]
    for t in range(1, len(lengths) + 1):
        d = dropped[-1]
        if keep is not None and t > keep:
            d = max(d, -(-(t - keep) // block) * block)
        if head + starts[t] - starts[d] > window.budget:
            while d < t and head + starts[t] - starts[d] > target:
                d += 1
        dropped.append(d)
    return dropped


def fit_window(turns: list[list[int]], head: list[int], budget: int, refill: float = 0.5,
               keep_turns: int | None = None) -> tuple[list[int], int]:
    """Head (system + first observation) plus the most recent turns, within `budget` tokens (see
    `dropped_turns`): the cached and uncached scorers see the same prompt. Returns the ids and how many turns
    were dropped."""
    dropped = dropped_turns([len(t) for t in turns], len(head), Window(budget, keep_turns, refill))[-1]
    ids = list(head)
    for turn in turns[dropped:]:
        ids.extend(turn)
    return ids[-budget:] if len(ids) > budget else ids, dropped


def prompt_tail(r: Renderer, constrained: bool) -> list[int]:
    """What a prompt ends with when the agent is to act (constrained mode also commits to `Action: `)."""
    return r.assistant_open() + (r.const(ACTION_PREFIX) if constrained else [])
