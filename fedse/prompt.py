"""How an episode becomes tokens, identically for acting and for learning.

An episode is a chat: a fixed system message, then the environment's observations as user turns and the
agent's replies (`Thought: …` optional, then `Action: …`) as assistant turns, in the model's own chat markup
(`Markup`, read off its tokenizer's chat template; the embedded tiny model's template is ChatML,
`CHATML_TEMPLATE`). Every piece is tokenised on its own and the pieces concatenated, so the tokens of a prefix
never change when the episode grows: the policy can extend its KV cache turn by turn, and the learner sees
exactly the tokens the policy saw. Only assistant content (and its end marker) carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

SYSTEM = ("You are an agent acting in a text environment. Each user message is what you observe. "
          "Reply with the next action as 'Action: <action>', optionally after 'Thought: <reasoning>'.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_PREFIX = "Action: "
SPECIAL_TOKENS = (IM_START, IM_END)
# the embedded model's markup as a chat template (set on its tokenizer by fedse.model), and the fallback for a
# tokenizer without one (a base model that was never chat-tuned)
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
_PROBE = ("FEDSEPROBEA", "FEDSEPROBEB", "FEDSEPROBEC")  # contents no template rewrites, found again in its output


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class MarkupError(ValueError):
    """A chat template this renderer cannot split into per-message pieces; one line naming why."""


@dataclass(frozen=True)
class Markup:
    """The text around each message of a chat, as the model's own chat template writes it.

    Why pieces and not `apply_chat_template` on the whole episode: acting extends a KV cache turn by turn and
    learning masks the loss to the agent's tokens, both of which need each message's tokens to stay the same
    as the episode grows. So the template is rendered once on probe messages and cut around their contents.
    `end` is the assistant's end-of-turn text (what the agent is trained to emit and generation stops at);
    `close` is what the template writes after it.
    """

    system: tuple[str, str]
    user: tuple[str, str]
    assistant_open: str
    end: str
    close: str

    @classmethod
    def chatml(cls) -> Markup:
        return cls((f"{IM_START}system\n", f"{IM_END}\n"), (f"{IM_START}user\n", f"{IM_END}\n"),
                   f"{IM_START}assistant\n", IM_END, "\n")

    @classmethod
    def of(cls, tokenizer: object) -> Markup:
        """The tokenizer's chat template cut into pieces; ChatML when it has none."""
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return cls.chatml()
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"

        def render(messages: list[dict[str, str]], generation: bool = False) -> str:
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False,  # type: ignore[attr-defined]
                                                     add_generation_prompt=generation)
            except Exception as exc:  # jinja raises whatever the template author chose
                raise MarkupError(f"chat template of {name} cannot render a system/user/assistant chat: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

        a, b, c = _PROBE
        chat = [{"role": "system", "content": a}, {"role": "user", "content": b}, {"role": "assistant", "content": c}]
        texts = [render(chat[:1]), render(chat[:2]), render(chat[:3])]
        opened = render(chat[:2], generation=True)
        if not (texts[1].startswith(texts[0]) and texts[2].startswith(texts[1]) and opened.startswith(texts[1])):
            raise MarkupError(f"chat template of {name} rewrites earlier messages as a chat grows; fedse needs each "
                              "message's text to stay fixed (give the tokenizer a chat_template that does not)")
        system = _around(texts[0], a, name)
        user = _around(texts[1][len(texts[0]):], b, name)
        head, tail = _around(texts[2][len(texts[1]):], c, name)
        opening = opened[len(texts[1]):]
        if head != opening:
            raise MarkupError(f"chat template of {name}: the assistant's generation prompt {opening!r} is not how its "
                              f"messages open ({head!r})")
        end = tail.rstrip()
        if not end:
            raise MarkupError(f"chat template of {name} writes no end-of-turn marker after an assistant message")
        return cls(system, user, opening, end, tail[len(end):])


def _around(text: str, probe: str, name: str) -> tuple[str, str]:
    """(before, after) the one occurrence of `probe` in `text`."""
    if text.count(probe) != 1:
        raise MarkupError(f"chat template of {name} does not write a message's content once and unchanged")
    before, after = text.split(probe)
    return before, after


@dataclass
class Encoded:
    """Token ids of an episode and, per token, whether the agent produced it (the loss mask)."""

    ids: list[int] = field(default_factory=list)
    agent: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], agent: bool = False) -> None:
        self.ids.extend(ids)
        self.agent.extend([agent] * len(ids))


class Renderer:
    """Piece-wise tokeniser of chat episodes in the model's markup, with a cache for the constant pieces."""

    def __init__(self, tokenizer: Tokenizer, markup: Markup | None = None) -> None:
        self.tok = tokenizer
        self.markup = markup or Markup.of(tokenizer)
        self._const: dict[str, list[int]] = {}

    def piece(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def const(self, text: str) -> list[int]:
        """Pieces that never change (markup, headers) are tokenised once."""
        if text not in self._const:
            self._const[text] = self.piece(text)
        return self._const[text]

    def system(self) -> list[int]:
        before, after = self.markup.system
        return self.const(before) + self.const(SYSTEM) + self.const(after)

    def user(self, observation: str) -> list[int]:
        before, after = self.markup.user
        return self.const(before) + self.piece(observation) + self.const(after)

    def assistant_open(self) -> list[int]:
        """What the prompt ends with when the agent is to act (constrained mode also commits to `Action: `)."""
        return self.const(self.markup.assistant_open)

    def end_ids(self) -> list[int]:
        """The assistant's end-of-turn tokens: trained as the reply's last, where generation stops."""
        return self.const(self.markup.end)

    @cached_property
    def newline_ids(self) -> frozenset[int]:
        """The vocabulary's tokens whose text holds a newline (a vocabulary scan, once per renderer): only after
        one of these can a generated reply's action line be whole."""
        tok: Any = self.tok
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        return frozenset(i for i, piece in enumerate(pieces)
                         if piece is not None and "\n" in tok.convert_tokens_to_string([piece]))

    def reply(self, action: str, thought: str = "") -> tuple[list[int], list[int]]:
        """(agent tokens, closing tokens) of one assistant turn; the end marker is the agent's to predict."""
        content = (self.piece(f"Thought: {thought}\n") if thought else []) + self.const(ACTION_PREFIX) \
            + self.piece(action) + self.end_ids()
        return content, self.const(self.markup.close)

    def candidate(self, action: str) -> list[int]:
        """Tokens scored for an admissible action after `assistant_open() + Action: ` in constrained mode."""
        return self.piece(action) + self.end_ids()

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


@dataclass
class Rendered:
    """Token ids of an episode's head and of each finished turn, extended as the episode goes on (histories only
    grow, so acting tokenises each turn once)."""

    head: list[int] | None = None
    turns: list[list[int]] = field(default_factory=list)


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
