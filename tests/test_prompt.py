from __future__ import annotations

from fedse.model import Agent
from fedse.prompt import fit_window


def test_pieces_are_prefix_stable(micro_agent: Agent) -> None:
    """Tokens of a prefix never change as the episode grows, so a KV cache can be extended turn by turn."""
    r = micro_agent.renderer
    obs, acts = ["first obs 1, 2", "second", "third"], ["move up", "craft 1 stick using 2 planks"]
    short = r.episode(obs[:2], acts[:1]).ids
    long = r.episode(obs, acts).ids
    assert long[: len(short)] == short


def test_only_agent_replies_carry_loss(micro_agent: Agent) -> None:
    r = micro_agent.renderer
    enc = r.episode(["obs a", "obs b"], ["move left"])
    agent_tokens = [i for i, a in zip(enc.ids, enc.agent, strict=True) if a]
    text = micro_agent.tokenizer.decode(agent_tokens)
    assert text.startswith("Action: move left") and text.endswith("<|im_end|>")
    assert "obs" not in text


def test_fit_window_keeps_head_and_newest_turns() -> None:
    head, turns = [0, 0], [[1] * 5, [2] * 5, [3] * 5]
    ids, dropped = fit_window(turns, head, 12, refill=1.0)
    assert ids == [0, 0] + [2] * 5 + [3] * 5 and dropped == 1
    assert fit_window(turns, head, 100) == ([0, 0] + [1] * 5 + [2] * 5 + [3] * 5, 0)


def test_fit_window_drops_to_the_refill_level_then_grows_again() -> None:
    head, turns = [0, 0], [[k] * 5 for k in range(1, 8)]
    # budget 22, refill 0.5 → 11: turn 5 overflows (2 + 25); dropping down to ≤ 11 leaves [5] (7 tokens);
    # after that the window grows again ([5, 6], [5, 6, 7]) without dropping anything more
    windows = [fit_window(turns[:t], head, 22)[1] for t in range(1, 8)]
    assert windows == [0, 0, 0, 0, 4, 4, 4]
    ids, dropped = fit_window(turns, head, 22)
    assert dropped == 4 and ids == [0, 0] + [5] * 5 + [6] * 5 + [7] * 5
