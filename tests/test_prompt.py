from __future__ import annotations

import copy

import pytest

from fedse.model import Agent
from fedse.prompt import ACTION_PREFIX, CHATML_TEMPLATE, SYSTEM, Markup, MarkupError, Renderer, fit_window

# a Llama-3-style template: a BOS, headers instead of ChatML's markers, an end-of-turn token and nothing after it
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


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


def test_the_embedded_model_renders_through_its_own_chatml_template(micro_agent: Agent) -> None:
    """The tiny model carries its markup as a chat template, cut into the very pieces written before templates."""
    assert micro_agent.tokenizer.chat_template == CHATML_TEMPLATE
    assert micro_agent.renderer.markup == Markup.chatml()


def test_pieces_joined_are_the_templates_own_rendering(micro_agent: Agent) -> None:
    """For any template the renderer can split, the episode's text is exactly what apply_chat_template writes for
    the same chat, and the assistant's end-of-turn token is the last token the agent is trained on."""
    tok = copy.deepcopy(micro_agent.tokenizer)  # the loaded tokenizer may be shared with other tests
    tok.chat_template = LLAMA3
    r = Renderer(tok)
    assert r.markup.end == "<|eot_id|>" and r.markup.close == ""
    obs, acts = ["first obs", "second obs"], ["move up"]
    enc = r.episode(obs, acts)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": obs[0]},
            {"role": "assistant", "content": ACTION_PREFIX + acts[0]}, {"role": "user", "content": obs[1]}]
    assert tok.decode(enc.ids) == tok.apply_chat_template(chat, tokenize=False)
    agent_tokens = [i for i, a in zip(enc.ids, enc.agent, strict=True) if a]
    assert tok.decode(agent_tokens) == "Action: move up<|eot_id|>"


def test_no_template_falls_back_to_chatml_and_a_rewriting_template_is_one_line(micro_agent: Agent) -> None:
    tok = copy.deepcopy(micro_agent.tokenizer)
    tok.chat_template = None
    assert Markup.of(tok) == Markup.chatml()
    # keeps only the last message's content: earlier messages change as the chat grows
    tok.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}-{% endif %}{% endfor %}"
    with pytest.raises(MarkupError, match=r"rewrites earlier messages") as err:
        Markup.of(tok)
    assert "\n" not in str(err.value)
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(MarkupError, match=r"cannot render a system/user/assistant chat.*System role not supported"):
        Markup.of(tok)


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


def test_thoughts_are_optional_so_a_thoughtless_seed_reply_is_a_whole_react_reply(micro_agent: Agent) -> None:
    """The ReAct format chosen for issue 29: expert seeds carry no thoughts, the system prompt makes thoughts
    optional, and a reply rendered without one is what the parser reads back as that action with no thought;
    a reply with a thought keeps it (the agent's own trajectories are trained on with their thoughts)."""
    from fedse.policy import parse_reply

    r = micro_agent.renderer
    assert "optionally after 'Thought: <reasoning>'" in SYSTEM
    for thought in ("", "the key opens the door"):
        content, _ = r.reply("open door", thought)
        text = micro_agent.tokenizer.decode(content)
        assert text.startswith("Thought: " if thought else ACTION_PREFIX)
        assert parse_reply(text, r.markup.end) == (thought, "open door")
