"""The embedded default model: a small Qwen3-architecture LM built offline, deterministically, from a spec.

No hub can be reached, so the frozen base gets its competence here: a byte-level BPE tokenizer and
pretraining (behaviour cloning) on transcripts of players of *mixed skill* playing every environment's
**pretrain** task ids (`fedse.corpus`; a range disjoint from train, validation and test ids). The model
learns the chat format, what observations look like, which actions are admissible and — latently, since
the players' skill is never written down — how a good player chooses: the competence a web-pretrained LLM
brings and that self-evolution sharpens. It never sees a client's buffer, the expert seed data or a test
task. Everything is a function of the spec (seeded), and the result is stored under a hash of the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.atomic import atomic_dir, atomic_file
from fedse.corpus import CorpusSpec, build_corpus, corpus_fingerprint, summary
from fedse.prompt import SPECIAL_TOKENS, Renderer
from fedse.trajectory import Trajectory

PAD = "<|pad|>"
INFO = "fedse_tiny.json"


class TinySpec(BaseModel):
    """Architecture, corpus and pretraining budget of the tiny model (all of it goes into the cache key)."""

    model_config = ConfigDict(extra="forbid")

    d_model: int = Field(256, ge=32)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    vocab: int = Field(4096, ge=512)
    context: int = Field(2048, ge=256)
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    pretrain_steps: int = Field(3000, ge=0)
    batch: int = Field(16, ge=1, description="examples per step")
    window: int = Field(512, ge=64, description="tokens per example: head + a run of turns (fedse.learner.pieces)")
    loss: Literal["actions", "all"] = Field("actions", description="which tokens carry loss: the players' "
                                            "actions (behaviour cloning) or every token (plain LM)")
    lr: float = Field(2e-3, gt=0)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def corpus_texts(corpus: dict[str, list[Trajectory]]) -> list[str]:
    """Plain chat text of every transcript: what the tokenizer is trained on."""
    return [_plain([t.observation for t in traj.turns] + [traj.final_observation], [t.action for t in traj.turns])
            for records in corpus.values() for traj in records]


def train_tokenizer(texts: list[str], vocab: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE with single digits (so positions and counts compose) and the chat markers as specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[PAD, *SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=SPECIAL_TOKENS[1],
                                   bos_token=None, unk_token=None)


def config(spec: TinySpec, vocab: int, pad: int | None = None, eos: int | None = None):  # -> Qwen3Config
    """The tiny model's transformers config (fedse/memory.py reads its shape from it before a base exists)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab, hidden_size=spec.d_model, intermediate_size=int(spec.d_model * 2.75) // 8 * 8,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.d_model // spec.heads, max_position_embeddings=spec.context, tie_word_embeddings=True,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
    )


def architecture(spec: TinySpec, tokenizer):  # -> Qwen3ForCausalLM
    from transformers import Qwen3ForCausalLM

    built = config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(spec.seed)
    return Qwen3ForCausalLM(built)


def examples(renderer: Renderer, corpus: dict[str, list[Trajectory]], spec: TinySpec) -> list:
    """Training windows of every transcript, shuffled; labels on actions only or on every token."""
    from fedse.learner import pieces

    out = []
    for records in corpus.values():
        for traj in records:
            for ex in pieces(renderer, traj, spec.window):
                if spec.loss == "all":
                    ex.labels = list(ex.ids)
                out.append(ex)
    random.Random(spec.seed).shuffle(out)
    return out


def pretrain(model, data: list, spec: TinySpec, pad: int, advance: Callable[[int, float], None] | None = None,
             resume: Path | None = None, every: int = 100) -> tuple[list[float], int]:
    """Full-parameter training on length-bucketed batches of windows, cosine schedule; returns the losses and
    the number of (non-padding) tokens processed.

    With `resume`, the whole training state (weights, optimizer, schedule, batch order, RNGs, losses) is saved
    there every `every` steps and picked up on the next call: a base build takes hours on a laptop and must
    survive an interrupted session, and a resumed build gives the same weights as an uninterrupted one.
    """
    from fedse.learner import batches, collate, lm_loss

    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, s / max(1, spec.pretrain_steps))))))
    model.train()
    losses: list[float] = []
    tokens = 0
    plan: list = []
    first = 0
    if resume is not None and resume.exists():
        state = torch.load(resume, weights_only=False)
        if state["key"] == spec.key():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            plan, losses, tokens, first = state["plan"], state["losses"], state["tokens"], state["step"]
    for step in range(first, spec.pretrain_steps):
        if not plan:
            plan = batches(data, spec.batch, rng)
        ids, labels, mask = collate(plan.pop(), pad)
        tokens += int(mask.sum())
        loss = lm_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if advance:
            advance(step + 1, losses[-1])
        if resume is not None and (step + 1) % every == 0 and step + 1 < spec.pretrain_steps:
            with atomic_file(resume, binary=True) as fh:  # an interrupted save keeps the previous state
                torch.save({"key": spec.key(), "step": step + 1, "model": model.state_dict(),
                            "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.getstate(),
                            "torch_rng": torch.get_rng_state(), "plan": plan, "losses": losses,
                            "tokens": tokens}, fh)
    model.eval()
    return losses, tokens


def resume_path(out_dir: Path) -> Path:
    """Where a build of `out_dir` keeps its training state until it finishes (next to it, never inside)."""
    return out_dir.parent / f".{out_dir.name}.resume.pt"


def build(spec: TinySpec, out_dir: Path, advance: Callable[[int, float], None] | None = None,
          workers: int = 1) -> Path:
    """Build tokenizer and model into `out_dir` atomically (a crash leaves no half-built model; an interrupted
    build resumes from its last saved step, see `pretrain`)."""
    torch.manual_seed(spec.seed)
    corpus = build_corpus(spec.corpus, workers)
    tokenizer = train_tokenizer(corpus_texts(corpus), spec.vocab)
    model = architecture(spec, tokenizer)
    data = examples(Renderer(tokenizer), corpus, spec)
    resume = resume_path(out_dir)
    losses, tokens = pretrain(model, data, spec, tokenizer.pad_token_id, advance, resume)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        (tmp / INFO).write_text(json.dumps({
            "spec": spec.model_dump(), "key": spec.key(), "weights_sha256": file_sha256(weights),
            "corpus": summary(corpus), "corpus_fingerprint": corpus_fingerprint(spec.corpus), "examples": len(data),
            "tokens_seen": tokens, "corpus_tokens": sum(len(e.ids) for e in data),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "loss_curve": losses[:: max(1, len(losses) // 50)],
        }, indent=2))
    resume.unlink(missing_ok=True)
    return out_dir


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(observations: list[str], actions: list[str]) -> str:
    """The text the tokenizer is trained on: the same chat markup the renderer produces."""
    from fedse.prompt import ACTION_PREFIX, IM_END, IM_START, SYSTEM

    parts = [f"{IM_START}system\n{SYSTEM}{IM_END}\n"]
    for i, obs in enumerate(observations):
        parts.append(f"{IM_START}user\n{obs}{IM_END}\n")
        if i < len(actions):
            parts.append(f"{IM_START}assistant\n{ACTION_PREFIX}{actions[i]}{IM_END}\n")
    return "".join(parts)
