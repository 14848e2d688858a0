"""The tiny base's build: an interrupted pretraining resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedse import tiny
from fedse.corpus import CorpusSpec
from fedse.prompt import Renderer

SPEC = tiny.TinySpec(d_model=32, layers=1, heads=2, kv_heads=1, vocab=520, context=512,
                     corpus=CorpusSpec(envs=["maze"], episodes=4), pretrain_steps=7, batch=2, window=128)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def parts():
    corpus = tiny.build_corpus(SPEC.corpus, 1)
    tokenizer = tiny.train_tokenizer(tiny.corpus_texts(corpus), SPEC.vocab)
    return tokenizer, tiny.examples(Renderer(tokenizer), corpus, SPEC)


def fresh(tokenizer):
    torch.manual_seed(SPEC.seed)
    return tiny.architecture(SPEC, tokenizer)


def test_an_interrupted_build_resumes_to_the_same_weights(parts, tmp_path: Path) -> None:
    tokenizer, data = parts
    straight = fresh(tokenizer)
    losses, tokens = tiny.pretrain(straight, data, SPEC, tokenizer.pad_token_id)

    state = tmp_path / "resume.pt"

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        tiny.pretrain(fresh(tokenizer), data, SPEC, tokenizer.pad_token_id, crash_at_5, resume=state, every=2)
    assert torch.load(state, weights_only=False)["step"] == 4  # the last multiple of `every` before the crash

    resumed = fresh(tokenizer)
    steps: list[int] = []
    again, tokens_again = tiny.pretrain(resumed, data, SPEC, tokenizer.pad_token_id,
                                        lambda step, loss: steps.append(step), resume=state, every=2)
    assert steps == [5, 6, 7]  # only the missing steps ran
    assert again == losses and tokens_again == tokens
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_saved_state_of_another_spec_is_ignored(parts, tmp_path: Path) -> None:
    tokenizer, data = parts
    state = tmp_path / "resume.pt"
    other = SPEC.model_copy(update={"lr": SPEC.lr / 2})
    torch.save({"key": other.key(), "step": 6}, state)
    steps: list[int] = []
    tiny.pretrain(fresh(tokenizer), data, SPEC, tokenizer.pad_token_id, lambda step, loss: steps.append(step),
                  resume=state, every=100)
    assert steps == list(range(1, SPEC.pretrain_steps + 1))


def test_build_removes_its_training_state_when_done(tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny-x"
    tiny.build(SPEC, out)
    assert (out / "model.safetensors").exists() and not tiny.resume_path(out).exists()


def test_the_committed_base_was_pretrained_on_what_todays_environments_play() -> None:
    """The committed base's corpus fingerprint (the content keys of every task its corpus played) is what the
    corpus recipe in params.yaml gives with today's environments: the audit's pretraining column (computed from
    the recipe) is then about the base that is actually committed."""
    import json

    from fedse.config import load_config
    from fedse.corpus import corpus_fingerprint
    from fedse.model import committed_dir

    root = Path(__file__).resolve().parents[1]
    spec = load_config(root / "params.yaml").model
    info = json.loads((root / committed_dir(spec) / tiny.INFO).read_text())
    assert info["key"] == spec.tiny.key()
    assert info["corpus_fingerprint"] == corpus_fingerprint(spec.tiny.corpus)
