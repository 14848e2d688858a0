"""The memory estimate (fedse/memory.py): its counts against real models, the direction each setting moves it,
and the check's one line, which names the setting that would make a run fit."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from fedse import memory
from fedse.config import load_config
from fedse.learner import IGNORE, Example, collate
from fedse.memory import Acting, GiB, Shape, Training, saved_by_autograd

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-7B-Instruct's config.json (the paper profile's model; no hub here)
QWEN_7B = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_position_embeddings": 32768}


def paper(*sets: str):
    """The paper profile's config with overrides, planned for a bf16 GPU (none here: the device is named)."""
    cfg = load_config(ROOT / "params.yaml", profile="paper", overrides=list(sets))
    return cfg, memory.plan(cfg, Shape.from_config(QWEN_7B), torch.device("cuda"), torch.bfloat16)


def test_weights_and_adapter_counts_are_the_models_own(micro_agent) -> None:
    shape = Shape.from_config(micro_agent.model.config)
    base = sum(p.numel() for n, p in micro_agent.model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in micro_agent.model.named_parameters() if "lora_" in n)
    assert shape.params() == base
    assert memory.lora_params(shape, Training(tokens=1, width=1, rank=8)) == (lora, lora)
    _, b_only = memory.lora_params(shape, Training(tokens=1, width=1, rank=8, freeze_a=True))
    assert b_only == sum(p.numel() for n, p in micro_agent.model.named_parameters() if "lora_B" in n)
    assert abs(Shape.from_config(QWEN_7B).params() / 7.61e9 - 1) < 0.005  # Qwen2.5-7B: 7.61 B parameters


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activations_match_what_autograd_keeps(micro_spec, attention: str) -> None:
    """Every tensor autograd saves for the backward pass, counted once (by storage), weights left out: the
    estimate's activations are within 10 % of it on a real (micro) model with padded rows."""
    from fedse.model import load_agent

    agent = load_agent(micro_spec.model_copy(update={"attn_implementation": attention}))
    width, rows = 256, 3
    gen = torch.Generator().manual_seed(0)
    examples = []
    for r in range(rows):
        ids = torch.randint(10, 500, (width - 31 * r,), generator=gen).tolist()
        examples.append(Example(ids, [t if k % 8 == 0 else IGNORE for k, t in enumerate(ids)]))
    ids, labels, mask = collate(examples, 0)
    kept = saved_by_autograd(agent.model, ids, mask, labels)
    shape = Shape.from_config(agent.model.config)
    estimate = memory.training(shape, Training(tokens=rows * width, width=width, attention=attention, mask_bytes=4))
    assert abs(estimate.parts["activations"] / kept - 1) < 0.10


def test_each_setting_moves_the_estimate_the_right_way() -> None:
    shape = Shape.from_config(QWEN_7B)
    base = Training(tokens=16384, width=4096, weight_bytes=2, act_bytes=2)

    def total(**change) -> float:
        return memory.training(shape, dataclasses.replace(base, **change)).total

    assert total(checkpointing=True) < total() / 3
    assert total(tokens=8192) < total() < total(tokens=32768)
    assert total(attention="eager") > total() > total(attention="flash_attention_2")
    assert total(attention="eager", width=2048) < total(attention="eager")
    assert total(weight_bytes=4, act_bytes=4) > total()
    assert total(freeze_a=True) < total() < total(rank=64)
    assert total(dp_rows=4) > total()
    assert total(labelled=0.1) < total()
    act = Acting(batch=32, context=4096, weight_bytes=2, merged=False)
    size = lambda **change: memory.acting(shape, dataclasses.replace(act, **change)).total  # noqa: E731
    assert size(batch=8) < size() and size(context=1024) < size() < size(merged=True) < size(attention="eager")


def test_the_paper_profile_without_checkpointing_is_refused_naming_the_setting_that_fits() -> None:
    cfg, plan = paper("learner.gradient_checkpointing=false")
    found = memory.verdict(plan, 80 * GiB, "free on an 80 GiB GPU")
    assert found.fits is False and "\n" not in found.line
    assert "set learner.gradient_checkpointing=true" in found.line
    tokens = int(re.search(r"learner\.batch_tokens<=(\d+)", found.line).group(1))
    fits = lambda n: memory.peak(plan, dataclasses.replace(plan.train, tokens=n)) <= 0.9 * 80 * GiB  # noqa: E731
    assert fits(tokens) and not fits(tokens + 1) and tokens >= cfg.learner.max_len
    shipped = memory.verdict(paper()[1], 80 * GiB, "free on an 80 GiB GPU")  # the profile as shipped
    assert shipped.fits is True and shipped.line.endswith(": fits")


def test_when_one_setting_is_not_enough_the_combination_is_named() -> None:
    """16 × 4096 tokens on 48 GiB: checkpointing alone leaves too many logits, and no token budget fits
    without it (one full 4096-token window alone is over); both together do."""
    _, plan = paper("learner.gradient_checkpointing=false", "learner.batch_size=16")
    line = memory.verdict(plan, 48 * GiB, "free").line
    n = int(re.search(r"set learner\.gradient_checkpointing=true and learner\.batch_tokens<=(\d+)", line).group(1))
    assert memory.peak(plan, dataclasses.replace(plan.train, tokens=n, checkpointing=True)) <= 0.9 * 48 * GiB


def test_acting_that_cannot_fit_names_the_policy_batch() -> None:
    _, plan = paper("model.attn_implementation=eager")
    line = memory.verdict(plan, 80 * GiB, "free").line
    n = int(re.search(r"set policy\.batch_size<=(\d+)", line).group(1))
    assert 1 <= n < 32
    assert memory.peak(plan, act=dataclasses.replace(plan.act, batch=n)) <= 0.9 * 80 * GiB


def test_a_model_too_big_for_the_device_says_so() -> None:
    _, plan = paper()
    line = memory.verdict(plan, 8 * GiB, "free").line
    assert "a smaller model: the weights alone need 14.2 GiB" in line


def test_the_gate_refuses_warns_or_stays_silent_as_configured(micro_params: Path) -> None:
    cfg = load_config(micro_params, profile="smoke", overrides=["learner.batch_size=64"])
    tiny = (64 * 2 ** 20, "RAM available")  # 64 MiB: the micro model's 64 × 1024-token batch cannot fit
    with pytest.raises(memory.MemoryRefused, match=r"does not fit .* set learner\.batch_tokens<=\d+ .* "
                       r"\(or model\.memory_check=warn to run anyway\)$"):
        memory.gate(cfg, tiny)
    warn = cfg.model_copy(update={"model": cfg.model.model_copy(update={"memory_check": "warn"})})
    assert "does not fit" in memory.gate(warn, tiny)
    off = cfg.model_copy(update={"model": cfg.model.model_copy(update={"memory_check": "off"})})
    assert memory.gate(off, tiny) is None
    assert memory.gate(cfg, (64 * GiB, "RAM available")).endswith(": fits")


def test_a_model_whose_config_cannot_be_read_gets_no_verdict(micro_params: Path, tmp_path: Path) -> None:
    cfg = load_config(micro_params, overrides=[f"model.preset={tmp_path}"])  # a folder without config.json
    found = memory.check(cfg)
    assert found.fits is None and found.line.startswith("memory: no estimate (")


def test_model_copies_follow_the_orchestration() -> None:
    quick = load_config(ROOT / "params.yaml", profile="quick")  # a process pool of two workers
    assert memory.copies(quick) == 2
    threads = load_config(ROOT / "params.yaml", profile="quick", overrides=["orchestration.task_runner=thread"])
    assert memory.copies(threads) == 1


def test_checkpointing_keeps_only_the_layer_inputs(micro_agent) -> None:
    """With checkpointing on, the forward pass keeps each layer's input (and the head's few tensors) only."""
    ids = torch.randint(10, 500, (2, 128), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.arange(128) % 8 == 0, ids, IGNORE)
    mask = torch.ones_like(ids)

    assert saved_by_autograd(micro_agent.model, ids, mask, labels, checkpoint=True) < \
        saved_by_autograd(micro_agent.model, ids, mask, labels) / 4


