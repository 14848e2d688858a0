from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedse.model import Agent, ModelError, ModelSpec, load_adapter, load_agent, load_base, save_adapter


def logits(agent: Agent) -> torch.Tensor:
    ids = torch.tensor([agent.renderer.episode(["The goal is at position 8, 6."], []).ids])
    with torch.no_grad():
        return agent.model(input_ids=ids).logits


def perturb(agent: Agent, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in agent.model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_saved_adapter_reloads_to_identical_logits_and_plain_peft_loads_it(
        micro_spec: ModelSpec, micro_agent: Agent, tmp_path: Path) -> None:
    perturb(micro_agent)
    before = logits(micro_agent)
    digest = save_adapter(micro_agent, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}

    fresh = load_agent(micro_spec)
    assert not torch.equal(logits(fresh), before)
    assert load_adapter(fresh, tmp_path / "adapter") == digest
    assert torch.equal(logits(fresh), before)

    from peft import PeftModel

    base, _, _ = load_base(micro_spec)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([micro_agent.renderer.episode(["The goal is at position 8, 6."], []).ids])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, before, atol=1e-6)


def test_a_fresh_adapter_changes_nothing(micro_spec: ModelSpec, micro_agent: Agent) -> None:
    base, _, _ = load_base(micro_spec)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, micro_agent.model(input_ids=ids).logits)


def test_save_is_atomic_over_an_existing_adapter(micro_agent: Agent, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "adapter"
    save_adapter(micro_agent, target)
    old = (target / "adapter_model.safetensors").read_bytes()
    perturb(micro_agent, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(micro_agent.model, "save_pretrained", crash)
    with pytest.raises(OSError):
        save_adapter(micro_agent, target)
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors not found"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "not a readable safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:300]), "not a readable safetensors"),
])
def test_broken_adapter_files_give_one_clear_line(micro_agent: Agent, tmp_path: Path, damage, message: str) -> None:
    save_adapter(micro_agent, tmp_path / "a")
    damage(tmp_path / "a")
    with pytest.raises(ModelError, match=message) as info:
        load_adapter(micro_agent, tmp_path / "a")
    assert "\n" not in str(info.value)


def test_adapter_of_another_rank_is_refused(micro_spec: ModelSpec, micro_agent: Agent, tmp_path: Path) -> None:
    other = load_agent(micro_spec.model_copy(update={"lora": micro_spec.lora.model_copy(update={"r": 4})}))
    save_adapter(other, tmp_path / "r4")
    with pytest.raises(ModelError, match="shape"):
        load_adapter(micro_agent, tmp_path / "r4")


def test_nan_adapter_is_refused(micro_agent: Agent, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_adapter(micro_agent, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(path)
    first = sorted(state)[0]
    state[first][0, 0] = float("nan")
    save_file(state, path)
    with pytest.raises(ModelError, match="NaN"):
        load_adapter(micro_agent, tmp_path / "a")


def test_unknown_preset_and_missing_path_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model preset 'gpt5'"):
        load_base(ModelSpec(preset="gpt5"))
    with pytest.raises(ModelError, match="cannot load model"):
        load_base(ModelSpec(preset=str(tmp_path / "no-such-model")))


def test_a_committed_base_is_used_only_when_its_weights_match_its_spec(micro_spec: ModelSpec, micro_agent: Agent,
                                                                      tmp_path: Path) -> None:
    import json
    import shutil

    from fedse.model import committed_dir, find_tiny, tiny_dir

    spec = micro_spec.model_copy(update={"models_dir": tmp_path / "models"})
    shutil.copytree(tiny_dir(spec), committed_dir(spec))  # what `fedse base build` + git commit leave
    assert find_tiny(spec) == committed_dir(spec)
    weights = committed_dir(spec) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in a weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=r"model\.safetensors: sha256 \w+ does not match"):
        load_agent(spec)
    shutil.copy(tiny_dir(spec) / "model.safetensors", weights)
    info = committed_dir(spec) / "fedse_tiny.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "key": "0123456789ab"}))
    with pytest.raises(ModelError, match="built from spec 0123456789ab"):
        load_agent(spec)
