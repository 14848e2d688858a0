"""The embedded default model: a small Qwen3-architecture LM built offline, deterministically, in minutes.

No hub can be reached, so the frozen base gets its language competence here: a byte-level BPE tokenizer and
language-model pretraining on transcripts of the *random valid-action policy* playing every environment's
**pretrain** task ids (a range disjoint from train and test ids). It therefore learns the chat format, what
observations look like and which actions are admissible — but not how to succeed, since a random policy
rarely does. It never sees a client's buffer, the expert seed data or a test task. Everything is a function
of the spec (seeded), and the result is cached on disk under a hash of the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.atomic import atomic_dir
from fedse.prompt import SPECIAL_TOKENS, Renderer

PAD = "<|pad|>"


class TinySpec(BaseModel):
    """Architecture and pretraining budget of the tiny model (all of it goes into the cache key)."""

    model_config = ConfigDict(extra="forbid")

    d_model: int = Field(256, ge=32)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    vocab: int = Field(4096, ge=512)
    context: int = Field(2048, ge=256)
    envs: list[str] = Field(default_factory=lambda: ["babyai", "webshop", "textcraft", "maze", "wordle"])
    corpus_episodes: int = Field(300, ge=1, description="random-policy episodes per environment")
    pretrain_steps: int = Field(300, ge=0)
    batch: int = Field(16, ge=1)
    block: int = Field(256, ge=16)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def transcripts(spec: TinySpec) -> list[tuple[list[str], list[str]]]:
    """(observations, actions) of random-policy episodes on the pretrain ids of each environment."""
    from fedse.envs.pool import EnvPool
    from fedse.envs.registry import env_class, make_env
    from fedse.scripted import random_policy

    episodes = []
    for name in spec.envs:
        ids = env_class(name).pretrain_ids()
        rng = random.Random(f"tiny-corpus-{name}-{spec.seed}")
        task_ids = rng.sample(range(ids.start, ids.stop), spec.corpus_episodes)
        pool = EnvPool(lambda name=name: make_env(name), task_ids)
        pool.run(random_policy(spec.seed))
        for slot in pool.slots:
            observations = [slot.first_observation] + [obs for _, obs in slot.history[:-1]]
            episodes.append((observations, [a for a, _ in slot.history]))
    random.Random(spec.seed).shuffle(episodes)
    return episodes


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


def architecture(spec: TinySpec, tokenizer):  # -> Qwen3ForCausalLM
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.d_model, intermediate_size=int(spec.d_model * 2.75) // 8 * 8,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.d_model // spec.heads, max_position_embeddings=spec.context, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    return Qwen3ForCausalLM(config)


def pretrain(model, blocks: torch.Tensor, spec: TinySpec, advance: Callable[[int, float], None] | None = None,
             ) -> list[float]:
    """Plain LM training on packed blocks (loss on every token); returns the loss curve."""
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, s / max(1, spec.pretrain_steps))))))
    model.train()
    losses = []
    for step in range(spec.pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (spec.batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if advance:
            advance(step + 1, losses[-1])
    model.eval()
    return losses


def pack(renderer: Renderer, episodes: list[tuple[list[str], list[str]]], block: int) -> torch.Tensor:
    """Concatenate episodes (each starts with the system header, a natural separator) into fixed blocks."""
    stream: list[int] = []
    for observations, actions in episodes:
        stream.extend(renderer.episode(observations, actions).ids)
    usable = len(stream) // block * block
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block)


def build(spec: TinySpec, out_dir: Path, advance: Callable[[int, float], None] | None = None) -> Path:
    """Build tokenizer and model into `out_dir` atomically (a crash leaves no half-built model)."""
    torch.manual_seed(spec.seed)
    episodes = transcripts(spec)
    texts = [_plain(obs, acts) for obs, acts in episodes]
    tokenizer = train_tokenizer(texts, spec.vocab)
    model = architecture(spec, tokenizer)
    blocks = pack(Renderer(tokenizer), episodes, spec.block)
    losses = pretrain(model, blocks, spec, advance)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fedse_tiny.json").write_text(json.dumps({
            "spec": spec.model_dump(), "corpus_episodes": len(episodes), "corpus_tokens": int(blocks.numel()),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "loss_curve": losses[:: max(1, len(losses) // 50)],
        }, indent=2))
    return out_dir


def _plain(observations: list[str], actions: list[str]) -> str:
    """The text the tokenizer is trained on: the same chat markup the renderer produces."""
    from fedse.prompt import ACTION_PREFIX, IM_END, IM_START, SYSTEM

    parts = [f"{IM_START}system\n{SYSTEM}{IM_END}\n"]
    for i, obs in enumerate(observations):
        parts.append(f"{IM_START}user\n{obs}{IM_END}\n")
        if i < len(actions):
            parts.append(f"{IM_START}assistant\n{ACTION_PREFIX}{actions[i]}{IM_END}\n")
    return "".join(parts)
