"""The exposure measure (fedse/exposure.py): its bounds and its random baseline, canaries that the buffer keeps
as separate records and the learner trains on, and memorisation that it can see."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse import exposure
from fedse.buffer import Buffer
from fedse.learner import IGNORE, LearnerSpec, encode, train
from fedse.model import Agent
from fedse.seed import expert_trajectories


@given(st.lists(st.floats(0, 100), min_size=1, max_size=50), st.floats(0, 100))
def test_exposure_lies_between_zero_and_the_cap(pool: list[float], bits: float) -> None:
    value = exposure.exposure(bits, pool)
    assert 0 <= value <= math.log2(len(pool) + 1) + 1e-12
    assert exposure.exposure(-1.0, pool) == pytest.approx(math.log2(len(pool) + 1))  # likelier than all
    assert exposure.exposure(1e9, pool) == pytest.approx(0.0)  # less likely than all


def test_a_secret_the_model_knows_nothing_of_averages_the_random_baseline() -> None:
    rng = random.Random(0)
    pool = [rng.gauss(30, 3) for _ in range(2000)]
    mean = sum(exposure.exposure(rng.gauss(30, 3), pool) for _ in range(4000)) / 4000
    assert mean == pytest.approx(1 / math.log(2), abs=0.08)  # E[−log₂ U] for a uniform rank


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32))
def test_secrets_are_distinct_and_avoid_what_they_must(seed: int) -> None:
    rng = random.Random(seed)
    first = exposure.secrets(rng, 5)
    more = exposure.secrets(rng, 200, avoid=first)
    assert len(set(first + more)) == 205 and all(len(s) == exposure.DIGITS for s in more)


def test_every_copy_of_a_canary_is_kept_and_its_reply_is_what_the_agent_learns(micro_agent: Agent, tmp_path) -> None:
    context = expert_trajectories("maze", 1, seed=0)[0][0]
    secret = (3, 1, 4, 1, 5, 9)
    copies = exposure.planted(context, {secret: 4})
    buffer = Buffer(tmp_path / "buffer")
    assert len(buffer.add(copies)) == 4  # distinct records: the buffer de-duplicates by content hash
    (example,) = encode(micro_agent, copies[0], 4096)
    learned = micro_agent.tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert exposure.reply(secret) in learned and context.turns[0].observation not in learned


def test_training_on_a_canary_raises_its_exposure(micro_agent: Agent) -> None:
    context = expert_trajectories("maze", 1, seed=0)[0][0]
    rng = random.Random(1)
    secret, *unplanted = exposure.secrets(rng, 6)
    pool = exposure.secrets(rng, 300, avoid=[secret, *unplanted])

    def exposures() -> tuple[float, float]:
        bits = exposure.log_perplexity(micro_agent, context, [secret, *unplanted])
        pool_bits = exposure.log_perplexity(micro_agent, context, pool)
        return exposure.exposure(bits[0], pool_bits), max(exposure.exposure(b, pool_bits) for b in bits[1:])

    before, _ = exposures()
    train(micro_agent, exposure.planted(context, {secret: 8}), LearnerSpec(lr=1e-2, epochs=6, batch_size=4))
    after, unseen = exposures()
    assert after >= math.log2(len(pool) + 1) - 1 > before + 2  # at (or next to) the cap: memorised
    assert unseen < after - 2  # the secrets never planted did not come along
