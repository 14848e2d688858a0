from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import ConstrainedPolicy, episode_tokens, gumbel, gumbel_pick, parse_reply, score_naive


def worst_difference_from_naive(agent: Agent, policy: ConstrainedPolicy, env: str, tasks: list[int],
                                capacity: int | None = None, turns: list[int] | None = None) -> float:
    """Play `tasks` with `policy` (at most `capacity` at once, the next starting when one ends; episode i ends
    after `turns[i]` turns at most) and return the largest gap between its cached scores and `score_naive`'s."""
    torch.manual_seed(0)
    for p in agent.model.parameters():  # make LoRA non-trivial so the adapter is in the numbers too
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    worst = 0.0
    decisions = 0

    def act(envs, slots):
        nonlocal worst, decisions
        prompts = [episode_tokens(agent, s, policy.budget, True, policy.keep_turns) for s in slots]
        cands = [[agent.renderer.candidate(a) for a in s.info["admissible_actions"]] for s in slots]
        actions = policy(envs, slots)
        for cached, naive in zip(policy.last_scores, score_naive(agent, prompts, cands), strict=True):
            worst = max(worst, float((cached - naive).abs().max()))
        decisions += len(slots)
        return actions

    limits = iter(turns or [])

    def make():
        game = make_env(env)
        game.max_turns = next(limits, game.max_turns)
        return game

    EnvPool(make, tasks, capacity=capacity).run(act)
    assert decisions >= len(tasks)
    return worst


@pytest.mark.parametrize(("env", "keep", "context"), [("maze", None, 1536), ("wordle", None, 1536),
                                                      ("webshop", None, 1536), ("maze", 2, 1536), ("webshop", 4, 1536),
                                                      ("webshop", None, 400), ("textcraft", 2, 1536)])
def test_cached_scores_equal_padded_naive_scores(micro_agent: Agent, env: str, keep: int | None, context: int) -> None:
    """The shared-cache scorer is an optimisation only: same log-probs as scoring prompt+candidate rows (also
    when windows drop turns and keep the head's cache, at context 400 or with few kept turns)."""
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, context=context, keep_turns=keep)
    assert worst_difference_from_naive(micro_agent, policy, env, [0, 1, 2]) < 1e-4


@pytest.mark.parametrize(("env", "keep"), [("maze", None), ("textcraft", 2)])
def test_episodes_that_join_a_running_batch_are_scored_as_alone(micro_agent: Agent, env: str, keep: int | None,
                                                                 ) -> None:
    """Continuous batching: a new episode takes the row of one that ended, prefilled in a forward of its own,
    while the other rows keep their cache (not reset, not re-encoded): still the naive scorer's numbers."""
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, keep_turns=keep)
    joined = []
    align = policy.cache.align

    def spy(slots):
        before = {id(row.slot) for row in policy.cache.rows}
        places = align(slots)
        new = [p for s, p in zip(slots, places, strict=True) if id(s) not in before]
        if before and new:
            joined.append((len(new), len(slots), policy.cache.kv.cache is not None))
        return places

    policy.cache.align = spy  # type: ignore[method-assign]
    turns = [3, 6, 9, 4, 7, 5, 8]  # episodes of different lengths (the micro model solves nothing)
    assert worst_difference_from_naive(micro_agent, policy, env, list(range(7)), capacity=3, turns=turns) < 1e-4
    assert joined and all(kept for _, _, kept in joined)  # episodes joined a batch whose cache was kept
    assert any(count < size for count, size, _ in joined)


def test_compacting_the_cache_changes_no_score(micro_agent: Agent) -> None:
    """Dropping padding and forgotten columns (a gather of cached keys and values) at every step: same numbers."""
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, keep_turns=2)
    policy.cache.compact_ratio, policy.cache.compact_slack = 1.0, 0  # compact whenever a single hole exists
    compactions = []
    compact = policy.cache.compact

    def spy() -> None:
        before = policy.cache.kv.width
        compact()
        compactions.append(policy.cache.kv.width < before)

    policy.cache.compact = spy  # type: ignore[method-assign]
    assert worst_difference_from_naive(micro_agent, policy, "maze", [0, 1, 2, 3]) < 1e-4
    assert sum(compactions) > 1


def test_greedy_is_deterministic_and_sampling_follows_the_key(micro_agent: Agent) -> None:
    def play(temperature: float, seed: int, keys: list[str] | None = None) -> list[list[str]]:
        pool = EnvPool(lambda: make_env("maze"), [0, 1, 2, 3], keys)
        pool.run(ConstrainedPolicy(micro_agent, temperature, seed))
        return [[a for a, _ in s.history] for s in pool.slots]

    assert play(0.0, 0) == play(0.0, 1)
    assert play(1.0, 7) == play(1.0, 7)
    assert play(1.0, 7) != play(1.0, 8)  # a bare pool's noise is keyed by the policy's seed and the task
    keyed = ["a", "b", "c", "d"]
    assert play(1.0, 7, keyed) == play(1.0, 8, keyed)  # an episode's own key wins over the policy's seed
    assert play(1.0, 7, keyed) != play(1.0, 7, ["e", "f", "g", "h"])


def test_gumbel_noise_is_a_pure_function_of_key_turn_and_action() -> None:
    import math
    import statistics

    assert gumbel("k", 3, "move up") == gumbel("k", 3, "move up")
    assert len({gumbel("k", 3, "move up"), gumbel("k", 4, "move up"), gumbel("j", 3, "move up"),
                gumbel("k", 3, "move down")}) == 4
    draws = [gumbel("k", t, "a") for t in range(4000)]
    assert statistics.mean(draws) == pytest.approx(0.5772, abs=0.06)  # Euler–Mascheroni: standard Gumbel
    assert statistics.pstdev(draws) == pytest.approx(math.pi / math.sqrt(6), abs=0.08)


def test_gumbel_max_samples_the_softmax() -> None:
    """argmax(score / T + g) over many keys picks each action with probability softmax(score / T)."""
    scores = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    actions = ["a", "b", "c"]
    picks = [gumbel_pick(scores, 0.5, f"episode-{i}", 0, actions) for i in range(6000)]
    expected = torch.softmax(scores / 0.5, dim=0)
    for k in range(3):
        assert picks.count(k) / len(picks) == pytest.approx(float(expected[k]), abs=0.02)
    assert gumbel_pick(scores, 0.0, "any", 0, actions) == 0


def test_long_episodes_are_refitted_to_the_window(micro_agent: Agent) -> None:
    """Windows that drop turns re-encode only what follows the head; the cache always holds exactly the
    window (the scores' equality with the naive scorer under refits is checked above, at context 400)."""
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, context=400)
    pool = EnvPool(lambda: make_env("webshop"), [0, 1])
    kept_heads = []
    restart = policy.cache.restart_row

    def spy(i: int, window: list[int]) -> None:
        restart(i, window)
        row = policy.cache.rows[i]
        kept_heads.append(row.skip == len(row.rendered.head or []) > 0)

    policy.cache.restart_row = spy  # type: ignore[method-assign]

    def act(envs, slots):
        prompts = [episode_tokens(micro_agent, s, policy.budget, True) for s in slots]
        choice = policy(envs, slots)
        assert policy.cache.kv.length == [len(p) for p in prompts]  # cached real tokens = the fitted window
        assert max(policy.cache.kv.length) <= 400
        return choice

    pool.run(act)
    assert all(s.done for s in pool.slots)
    assert len(kept_heads) > 1 and all(kept_heads)


@pytest.mark.parametrize(("text", "thought", "action"), [
    ("Thought: go left first.\nAction: move left<|im_end|>", "go left first.", "move left"),
    ("Action: click[buy now]\nmore text", "", "click[buy now]"),
    ("just words", "", "just words"),
    ("Thought: hmm\nAction:", "hmm", "Thought: hmm\nAction:"),
])
def test_parse_reply(text: str, thought: str, action: str) -> None:
    assert parse_reply(text) == (thought, action)


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_greedy_choice_is_the_argmax_of_the_configured_score(micro_agent: Agent, score: str) -> None:
    """`mean` divides each candidate's summed log-prob by its token count (no bias towards short actions)."""
    policy = ConstrainedPolicy(micro_agent, temperature=0.0, seed=0, score=score)
    checked = 0

    def act(envs, slots):
        nonlocal checked
        actions = policy(envs, slots)
        for slot, scores, action in zip(slots, policy.last_scores, actions, strict=True):
            cands = slot.info["admissible_actions"]
            lengths = torch.tensor([len(micro_agent.renderer.candidate(a)) for a in cands], dtype=scores.dtype)
            value = scores / lengths if score == "mean" else scores
            assert action == cands[int(torch.argmax(value))]
            checked += 1
        return actions

    EnvPool(lambda: make_env("textcraft"), [0, 1]).run(act)
    assert checked >= 2


def constrained_decoding_reference(agent: Agent, prompt: list[int], cands: list[list[int]]) -> torch.Tensor:
    """log P(candidate) under token-by-token decoding restricted to admissible continuations, computed the
    slow way: one full forward pass per candidate, renormalising at every position over the allowed tokens."""
    return torch.tensor([constrained_logp(agent, prompt, cand, cands) for cand in cands], dtype=torch.float64)


def constrained_logp(agent: Agent, prompt: list[int], cand: list[int], cands: list[list[int]]) -> float:
    """One candidate's `constrained_decoding_reference`."""
    ids = torch.tensor([prompt + cand])
    with torch.no_grad():
        logp = torch.log_softmax(agent.model(input_ids=ids).logits[0].double(), -1)
    total = 0.0
    for j, token in enumerate(cand):
        allowed = sorted({c[j] for c in cands if len(c) > j and c[:j] == cand[:j]})
        row = logp[len(prompt) + j - 1]
        total += float(row[token] - torch.logsumexp(row[allowed], 0))
    return total


def test_trie_score_is_the_probability_of_constrained_decoding(micro_agent: Agent) -> None:
    """score=trie: each token renormalised over the admissible continuations of its prefix, so the
    candidates' probabilities sum to one and a long action copied token by token pays only for its choices."""
    torch.manual_seed(1)
    for p in micro_agent.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, score="trie")
    checked = 0

    def act(envs, slots):
        nonlocal checked
        prompts = [episode_tokens(micro_agent, s, policy.budget, True) for s in slots]
        actions = policy(envs, slots)
        for slot, prompt, scores in zip(slots, prompts, policy.last_scores, strict=True):
            cands = [micro_agent.renderer.candidate(a) for a in slot.info["admissible_actions"]]
            assert float(torch.exp(scores).sum()) == pytest.approx(1.0, abs=1e-6)
            if checked < 6:
                assert torch.allclose(scores, constrained_decoding_reference(micro_agent, prompt, cands), atol=1e-4)
            checked += 1
        return actions

    EnvPool(lambda: make_env("textcraft"), [0, 1]).run(act)
    assert checked >= 6


def test_evaluation_plays_at_the_evaluation_temperature(micro_agent: Agent) -> None:
    from fedse.policy import PolicySpec, make_policy

    spec = PolicySpec(temperature=1.0, eval_temperature=0.0)
    assert make_policy(micro_agent, spec, evaluation=True).temperature == 0.0
    assert make_policy(micro_agent, spec, evaluation=False).temperature == 1.0
    sampled = PolicySpec(temperature=1.0, eval_temperature=0.7)
    assert make_policy(micro_agent, sampled, evaluation=True).temperature == 0.7


def test_merged_lora_leaves_the_base_untouched_and_follows_the_adapter(micro_agent: Agent) -> None:
    """Acting runs LoRA merged into swapped-in weights: same logits as the unmerged model, the base's own
    tensors come back unchanged, and an adapter loaded between two uses is the one merged."""
    from fedse.model import adapter_state, set_adapter_state
    from fedse.policy import MergedLora

    model = micro_agent.model
    base = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base.items()}
    merged = MergedLora(model)
    assert merged.layers
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for scale in (0.05, 0.2):  # two adapters, one after the other, through the same MergedLora
        state = {k: torch.randn_like(v) * scale for k, v in adapter_state(micro_agent).items()}
        set_adapter_state(micro_agent, state, origin="test")
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with merged():
                fused = model(input_ids=ids).logits
        assert float((plain - fused).abs().max()) < 1e-4
    for n, p in base.items():
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1])
    assert not any(m.disable_adapters for m in merged.layers)


def test_react_cached_replies_equal_uncached_generation(tiny_agent: Agent) -> None:
    """ReAct feeds only what is new since its last reply, over a cache that outlives turns, window restarts
    (2 kept turns) and episodes that join the batch as others end; greedy replies are exactly those of
    `generate` on the whole prompt, one episode at a time, with nothing cached."""
    from fedse.policy import ReactPolicy

    policy = ReactPolicy(tiny_agent, temperature=0.0, max_new_tokens=24, keep_turns=2)
    restarts = []
    restart = policy.cache.restart_row

    def spy(i: int, window: list[int]) -> None:
        restarts.append(i)
        restart(i, window)

    policy.cache.restart_row = spy  # type: ignore[method-assign]
    checked = 0

    def act(envs, slots):
        nonlocal checked
        prompts = [episode_tokens(tiny_agent, s, policy.budget, False, policy.keep_turns) for s in slots]
        actions = policy(envs, slots)
        for prompt, action in zip(prompts, actions, strict=True):
            with torch.no_grad():
                out = tiny_agent.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                eos_token_id=policy.end_id,
                                                pad_token_id=tiny_agent.tokenizer.pad_token_id)
            assert action == parse_reply(tiny_agent.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))[1]
            checked += 1
        return actions

    EnvPool(lambda: make_env("textcraft"), [0, 1, 2, 3, 4], capacity=3).run(act)
    assert checked > 10 and restarts


def test_react_rows_stop_at_their_own_end(tiny_agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that wrote its end token leaves the decoding batch: the decoding steps feed exactly the rows still
    writing, so each row costs its own reply's length, not the longest reply's."""
    from fedse.kvcache import KVRows
    from fedse.policy import ReactPolicy

    policy = ReactPolicy(tiny_agent, temperature=1.0, max_new_tokens=40)
    feeds: list[list[int]] = []  # the delta lengths of every forward, in order
    feed = KVRows.feed

    def recording(self, agent, deltas, dtype):
        feeds.append([len(d) for d in deltas])
        return feed(self, agent, deltas, dtype)

    monkeypatch.setattr(KVRows, "feed", recording)
    replies: list[list[int]] = []
    generate = policy._generate
    policy._generate = lambda deltas: replies.extend(generate(deltas)) or replies  # type: ignore[method-assign]
    pool = EnvPool(lambda: make_env("textcraft"), [0, 1, 2, 3])
    running = pool.running()
    policy([pool.envs[i] for i in running], [pool.slots[i] for i in running])
    assert len(replies) == 4 and all(r[-1] == policy.end_id for r in replies if len(r) < 40)
    assert len({len(r) for r in replies}) > 1  # replies of different lengths, so stopping per row matters
    prefill, *steps = feeds  # the first turn of a batch: one forward over every window, then one per step
    assert len(prefill) == 4 and min(prefill) > 1 and all(set(step) == {1} for step in steps)
    assert len(steps) == max(len(r) for r in replies) - 1
    assert sum(len(step) for step in steps) == sum(len(r) - 1 for r in replies)


def randomised_lora(agent: Agent, seed: int) -> None:
    torch.manual_seed(seed)
    for p in agent.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)


@pytest.mark.parametrize(("env", "walk_nodes", "keep"), [("wordle", 0, None), ("textcraft", 0, 2), ("maze", 0, None),
                                                         ("wordle", 100, 2)])
def test_a_walk_down_the_trie_has_the_trie_score_of_the_action_it_draws(micro_agent: Agent, env: str,
                                                                        walk_nodes: int, keep: int | None) -> None:
    """A walked decision's log-prob (the product of each drawn token's probability renormalised over the
    admissible children) is constrained decoding's for that action, computed the slow way from the prompt the
    episode's history rebuilds: so the walk draws from the trie distribution, and the tokens it leaves in the
    cache are exactly the episode's window, turn after turn (windows that drop turns too, with `keep`)."""
    randomised_lora(micro_agent, 2)
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, score="trie", keep_turns=keep,
                               walk_nodes=walk_nodes)
    walked = 0

    def act(envs, slots):
        nonlocal walked
        prompts = [episode_tokens(micro_agent, s, policy.budget, True, keep) for s in slots]
        actions = policy(envs, slots)
        for slot, prompt, action, scores, logp in zip(slots, prompts, actions, policy.last_scores, policy.last_logp,
                                                      strict=True):
            cands = [micro_agent.renderer.candidate(a) for a in slot.info["admissible_actions"]]
            reference = constrained_logp(micro_agent, prompt, micro_agent.renderer.candidate(action), cands)
            assert logp == pytest.approx(reference, abs=1e-4)
            walked += scores is None
        return actions

    EnvPool(lambda: make_env(env), [0, 1, 2], capacity=2).run(act)
    assert walked >= 6  # wordle's 1624 tree tokens exceed 100; every env's exceed 0


def test_walking_draws_as_often_as_the_trie_scores_say(micro_agent: Agent) -> None:
    """Monte Carlo over 600 episode keys on one TextCraft decision: how often the walk picks each action against
    the softmax of the trie scores of the same decision (within 4 standard errors), and the same for Gumbel-max
    over the scored candidates, the path it replaces."""
    randomised_lora(micro_agent, 5)
    keys = [f"mc-{i}" for i in range(600)]

    def make():
        game = make_env("textcraft")
        game.max_turns = 1
        return game

    def first_actions(walk_nodes: int | None) -> list[str]:
        pool = EnvPool(make, [0] * len(keys), keys)
        pool.run(ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, score="trie", walk_nodes=walk_nodes))
        return [s.history[0][0] for s in pool.slots]

    scorer = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, score="trie")
    probe: list[str] = []

    def act(envs, slots):
        probe.extend(slots[0].info["admissible_actions"])
        return scorer(envs, slots)

    EnvPool(make, [0], ["probe"]).run(act)
    scores = scorer.last_scores[0]
    assert scores is not None
    expected = torch.softmax(scores, 0)
    assert float(expected.max()) < 0.9  # a decision with real uncertainty, or the check tells nothing
    for walk_nodes in (0, None):
        picks = first_actions(walk_nodes)
        for action, p in zip(probe, expected.tolist(), strict=True):
            error = (p * (1 - p) / len(keys)) ** 0.5
            assert picks.count(action) / len(keys) == pytest.approx(p, abs=4 * error + 1e-9), (walk_nodes, action)


def test_a_walk_is_keyed_by_its_episode_and_greedy_at_temperature_zero(micro_agent: Agent) -> None:
    randomised_lora(micro_agent, 3)

    def play(temperature: float, keys: list[str]) -> list[list[str]]:
        pool = EnvPool(lambda: make_env("wordle"), [0, 1, 2], keys, capacity=2)
        pool.run(ConstrainedPolicy(micro_agent, temperature, 0, score="trie", walk_nodes=0))
        return [[a for a, _ in s.history] for s in pool.slots]

    assert play(1.0, ["a", "b", "c"]) == play(1.0, ["a", "b", "c"])
    assert play(1.0, ["a", "b", "c"]) != play(1.0, ["d", "e", "f"])
    assert play(0.0, ["a", "b", "c"]) == play(0.0, ["d", "e", "f"])


def test_only_a_tree_whose_candidates_end_at_leaves_of_their_own_is_walked() -> None:
    from fedse.policy import candidate_trie

    assert candidate_trie([[1, 2], [1, 3], [4]]).walkable()
    assert not candidate_trie([[1, 2], [1, 2, 3]]).walkable()  # a candidate that is another's prefix
    assert not candidate_trie([[1, 2], [1, 2]]).walkable()  # a repeated candidate
    assert not candidate_trie([[], [1]]).walkable()


def test_only_trie_scoring_walks(micro_agent: Agent) -> None:
    """A walk draws what trie scoring scores; with `sum` or `mean` every decision is scored, whatever walk_nodes."""
    for score in ("sum", "mean"):
        policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, score=score, walk_nodes=0)
        pool = EnvPool(lambda: make_env("wordle"), [0])
        running = pool.running()
        policy([pool.envs[i] for i in running], [pool.slots[i] for i in running])
        assert policy.last_scores[0] is not None and len(policy.last_scores[0]) == 400


@pytest.mark.parametrize(("text", "thought", "action"), [
    ("Action: move up\nThought: later", "", "move up"),  # a thought after the action is not the reply's
    ("Thought: a\nAction:\n  go west\nAction: other", "a", "go west"),
])
def test_a_reply_ends_with_its_first_whole_action_line(text: str, thought: str, action: str) -> None:
    assert parse_reply(text) == (thought, action)


@given(st.text(alphabet="ab :\nThoughtAcion", max_size=40), st.text(alphabet="xy \n", min_size=1, max_size=8),
       st.text(max_size=30))
def test_what_follows_a_whole_action_line_changes_no_parse(before: str, action: str, after: str) -> None:
    """Decoding stops once the action line is whole (`complete_reply`): sound only if no continuation can
    change the parsed thought or action."""
    from fedse.policy import complete_reply

    text = before + "Action: " + action
    whole = complete_reply(text)
    if whole is None:
        return
    assert parse_reply(whole + after) == parse_reply(whole)


def test_react_stops_a_row_at_the_end_of_its_action_line(tiny_agent: Agent, monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    """A row whose reply holds a whole action line stops decoding there (the newline's token is its last), and
    the action is what the whole reply would have given."""
    from fedse.policy import ReactPolicy

    policy = ReactPolicy(tiny_agent, temperature=1.0, max_new_tokens=60)
    script = tiny_agent.tokenizer.encode("Thought: near\nAction: get 1 oak log\nObservation: you got it",
                                         add_special_tokens=False)
    drawn: list[int] = []

    def scripted(hidden, draws):
        drawn.append(script[len(drawn)])
        return [drawn[-1]] * hidden.shape[0]

    monkeypatch.setattr(policy, "_sample", scripted)
    pool = EnvPool(lambda: make_env("textcraft"), [0])
    actions = policy([pool.envs[0]], [pool.slots[0]])
    from fedse.policy import complete_reply

    first_whole = next(k for k in range(1, len(script) + 1)
                       if complete_reply(tiny_agent.tokenizer.decode(script[:k])) is not None)
    assert actions == ["get 1 oak log"] and len(drawn) == first_whole < len(script)
    assert parse_reply(tiny_agent.tokenizer.decode(script)) == ("near", "get 1 oak log")
