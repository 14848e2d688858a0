"""Peak memory of LoRA training and of acting, estimated from a model's config before a run, and the check that
refuses a run that cannot fit (naming the setting that would make it fit).

Why an estimate: a 7B model at the `paper` profile's batch (4 × 4096 tokens) needs ~130 GiB of activations
without gradient checkpointing and dies out of memory hours into a run; the numbers below follow from the
model's config.json alone (no weights downloaded), so the run is refused in its first second instead.

Inputs (`Shape.from_config`, any Llama/Qwen/Mistral-style causal LM's config): L layers, hidden size h, MLP
size i, a query heads and kv key/value heads of size d, vocabulary V, tied or separate output head. Bytes: w
per frozen weight (the model's dtype) and b per activation, taken equal to w (fp32 weights under bf16
autocast keep their norms and residual stream in fp32, so they count as fp32). Per batch: T padded tokens
(`learner.batch_tokens`, or batch_size × max_len), rows at most W = max_len long, n = s·T labelled tokens.

Training peak = weights + adapter + activations + logits (+ DP-SGD's per-row gradients):

- weights: P·w, P counted from the shapes (embeddings, the untied head, every projection, the norms, Qwen2's
  q/k/v biases): exact for the tiny model and for Qwen2.5-7B's published 7.61 B (tests/test_memory.py);
- adapter: LoRA's A and B are fp32 (PEFT keeps adapters in fp32 over bf16 weights): 4 bytes each, and each
  trainable one (B only with `freeze_a`) has an fp32 gradient and AdamW's two fp32 moments: 12 more;
- activations without checkpointing, L·T·a_layer + 4h·T (the final norm), where a_layer is what autograd keeps
  per token and layer for the backward pass (a frozen projection keeps nothing: its weight suffices):
  each RMSNorm's fp32 copy of its input, 4h twice; each LoRA-wrapped projection's dropout output and mask,
  (b + m)·n_in (n_in = h for q, k, v, gate, up; a·d for o; i for down; m = 1 on CUDA, whose fused dropout
  keeps a bool mask, m = b on a CPU, whose dropout multiplies by a mask of the input's dtype) and its rank-r
  hidden state, b·r; the attention's q, k, v and output, b·(2a + 2kv')·d with kv' = a (transformers repeats k
  and v to every query head when a padding mask is passed, as in every batch of rows of unequal lengths;
  flash_attention_* never does: kv' = kv), its fp32 log-sum-exp, 4a, and sdpa's additive padding mask, b·W;
  Qwen3's q/k norms, 4(a + kv)·d; the SwiGLU MLP's gate output, its SiLU and the up projection, 3b·i. With
  `attn_implementation: eager` each head keeps its softmax row over the row's width in fp32 and, below fp32,
  cast back: (4 + b)·a·W per token (4a·W at fp32), and no mask. An unpadded batch (one row, or rows of one
  length) keeps neither the mask nor the repeated k and v: the estimate is then ~10 % high;
- activations with gradient checkpointing: each layer keeps only its input, L·T·b·h, plus one layer's full
  set, T·a_layer, while that layer is recomputed in the backward pass;
- logits: only the n labelled positions go through the output head (fedse.learner.lm_loss): the head's output
  cast to fp32 (b more when below fp32), the saved log-softmax, and in the backward the fp32 gradients of both:
  n·V·(12 + b) (n·V·12 at fp32). s = 0.4 before a run: the largest share of labelled tokens in any one training
  window of the seed data (0.36, TextCraft; 0.05–0.20 on average over an environment);
- DP-SGD (privacy.record): Opacus's per-row gradient of every trainable LoRA tensor, rows × trainable × 4
  (rows = batch_size, or batch_tokens / 128 under a token budget: no window is shorter than its head, ≥ 190
  tokens in every environment). Not counted: the sum per sampled trajectory (the sample's size grows with
  the buffer, unknown before the run).

Acting peak = weights + merged copy + KV cache + prefill + logits: the constrained policy runs each
LoRA-wrapped projection as one matmul with W + ΔW (fedse.policy.MergedLora), a second copy of those weights,
Σ in·out·w per layer; the KV cache of batch_size episodes × their context (+ max_new_tokens for ReAct),
2·L·kv·d·w per token; one layer's prefill intermediates, batch × context × (3i + 2h)·w (plus eager's
a × context² fp32 scores per episode); the next-token distributions over a reply's worth of positions,
batch × max_new_tokens × V × 4. Acting is not measured yet (bench/memory.py measures training).

The check (`gate`, before `fedse run` and `python -m flows.experiment`) asks for the larger of the two peaks,
times the model copies this machine holds at once (one per worker process of the `process` task runner or a
local Dask cluster), within 90 % of the free memory (CUDA's free memory; on a CPU the RAM available to the
process, cgroup limit included). Not counted, hence the 10 %: the process's own memory (Python, torch, the CUDA
context, ~0.5 GiB), transient copies inside a kernel, the allocator's slack. On a CPU that slack can be large:
glibc's malloc keeps freed heap memory, and bench/memory.py measured the resident peak of a SmolLM2 step at
1.4–1.5× the live tensors without checkpointing and ~9× with it (the estimate is 1 … 28 % above the live
tensors); `MALLOC_MMAP_THRESHOLD_=65536` in the environment brings the resident peak down to the live tensors
at 1.2–1.5× the step time (docs/benchmarks.md; `MALLOC_TRIM_THRESHOLD_=0` did the same in the one case tried).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedse.config import Config

GiB = 1024 ** 3
LABELLED_SHARE = 0.4  # the largest share of labelled tokens in one training window of the seed data (0.36)
SHORTEST_ROW = 128  # no training window is shorter than its head (≥ 190 tokens): rows per token budget
HEADROOM = 0.9  # the estimate must fit in 90 % of the free memory (see the module's "Not counted")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
          "gate_proj": "mlp input", "up_proj": "mlp input"}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a causal LM's config (Llama/Qwen/Mistral-style decoder, SwiGLU MLP)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm on every query and key head
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    context: int = 2048  # the model's window (max_position_embeddings)

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        """From a transformers config object or its config.json as a mapping; a missing field is one line."""
        get: Callable[[str, Any], Any] = (config.get if isinstance(config, Mapping)
                                          else lambda key, default=None: getattr(config, key, default))
        kind = str(get("model_type", "") or "")
        needed = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if get(k, None) is None]
        if missing:
            raise ValueError(f"cannot estimate memory for model type {kind or '?'}: its config has no "
                             f"{', '.join(missing)}")
        heads = int(get("num_attention_heads", None))
        hidden = int(get("hidden_size", None))
        return cls(layers=int(get("num_hidden_layers", None)), hidden=hidden,
                   intermediate=int(get("intermediate_size", None)), heads=heads,
                   kv_heads=int(get("num_key_value_heads", None) or heads),
                   head_dim=int(get("head_dim", None) or hidden // heads), vocab=int(get("vocab_size", None)),
                   tied=bool(get("tie_word_embeddings", False)), qk_norm=kind.startswith("qwen3"),
                   qkv_bias=bool(get("attention_bias", kind == "qwen2")),
                   context=int(get("max_position_embeddings", None) or 2048))

    def projections(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each projection of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> int:
        """Every weight of the model: embeddings, untied head, projections, norms (and Qwen2's q/k/v biases)."""
        per_layer = sum(n_in * n_out for n_in, n_out in self.projections().values()) + 2 * self.hidden
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * per_layer + self.hidden


def lora_targets(target: str | list[str]) -> list[str]:
    """Which projections a LoRA `target` wraps: all-linear (every projection; PEFT leaves the output head out),
    a list of module names, or a regular expression over them; an unknown name counts as all (an overestimate)."""
    if target == "all-linear":
        return list(PROJECTIONS)
    chosen = [p for p in PROJECTIONS if p in target] if isinstance(target, list) else \
        [p for p in PROJECTIONS if re.search(target, p)]
    return chosen or list(PROJECTIONS)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes, by part (the line and the tables print the parts)."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> str:
        return f"{self.total / GiB:.1f} GiB"

    def detail(self) -> str:
        return ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.parts.items() if value)


@dataclass(frozen=True)
class Training:
    """One training setting: the batch and the choices that change its memory."""

    tokens: int  # padded tokens of the largest batch (rows × longest row)
    width: int  # the longest row (max_len)
    weight_bytes: int = 4
    act_bytes: int = 4
    checkpointing: bool = False
    attention: str = "sdpa"  # eager | sdpa | flash_attention_2 | …
    rank: int = 8
    target: str | list[str] = "all-linear"
    dropout: bool = True
    mask_bytes: int = 1  # a dropout mask's element: bool on CUDA (fused dropout), the input's dtype on a CPU
    freeze_a: bool = False
    labelled: float = LABELLED_SHARE  # share of the batch's tokens that carry loss
    dp_rows: int = 0  # DP-SGD: rows of a micro-batch whose per-row gradients Opacus holds


def lora_params(shape: Shape, setting: Training) -> tuple[int, int]:
    """(all LoRA parameters, the trainable ones)."""
    shapes = [shape.projections()[t] for t in lora_targets(setting.target)]
    total = shape.layers * sum(setting.rank * (n_in + n_out) for n_in, n_out in shapes)
    trainable = shape.layers * sum(setting.rank * n_out for _, n_out in shapes) if setting.freeze_a else total
    return total, trainable


def layer_bytes(shape: Shape, setting: Training) -> float:
    """Bytes autograd keeps per token in one decoder layer (the module docstring's a_layer)."""
    b, r = setting.act_bytes, setting.rank
    h, i, d, a, kv = shape.hidden, shape.intermediate, shape.head_dim, shape.heads, shape.kv_heads
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": a * d, "gate_proj": h, "up_proj": h, "down_proj": i}
    targets = lora_targets(setting.target)
    if setting.dropout:  # each wrapped projection draws its own dropout: its output and its mask
        lora = sum((b + setting.mask_bytes) * inputs[t] for t in targets)
    else:  # the input itself is kept, once per distinct input (q, k, v share one; gate and up another)
        lora = sum(b * n for n in {SHARED.get(t, t): inputs[t] for t in targets}.values())
    lora += len(targets) * b * r
    flash = setting.attention.startswith("flash")
    kv_kept = kv if flash else a  # repeated to every query head, except by flash attention
    attention = b * (2 * a + 2 * kv_kept) * d + 4 * a
    if setting.attention == "eager":  # every head's softmax row, in fp32 and (when not fp32) cast back
        attention += (4 + (b if b < 4 else 0)) * a * setting.width
    elif not flash:  # sdpa keeps the padding mask as an additive float mask, one per layer
        attention += b * setting.width
    norms = 2 * 4 * h + (4 * (a + kv) * d if shape.qk_norm else 0)
    mlp = 3 * b * i
    return norms + lora + attention + mlp


def training(shape: Shape, setting: Training) -> Estimate:
    """Peak bytes of one training step at this setting (module docstring)."""
    total, trainable = lora_params(shape, setting)
    per_layer = layer_bytes(shape, setting)
    if setting.checkpointing:
        activations = shape.layers * setting.tokens * setting.act_bytes * shape.hidden + setting.tokens * per_layer
    else:
        activations = shape.layers * setting.tokens * per_layer
    activations += setting.tokens * 4 * shape.hidden  # the final norm's fp32 input
    b = setting.act_bytes
    logits = setting.labelled * setting.tokens * shape.vocab * (12 + (b if b < 4 else 0))
    parts = {"weights": float(shape.params() * setting.weight_bytes),
             "adapter": float(4 * total + 12 * trainable), "activations": float(activations),
             "logits": float(logits)}
    if setting.dp_rows:
        parts["per-row gradients"] = float(setting.dp_rows * trainable * 4)
    return Estimate(parts)


@dataclass(frozen=True)
class Acting:
    """One acting setting: episodes per forward pass and their context."""

    batch: int
    context: int
    max_new_tokens: int = 64
    weight_bytes: int = 4
    merged: bool = True  # the constrained policy's W + ΔW copy of the wrapped projections
    attention: str = "sdpa"
    target: str | list[str] = "all-linear"


def acting(shape: Shape, setting: Acting) -> Estimate:
    """Peak bytes of one acting forward pass with its KV cache (module docstring)."""
    w, tokens = setting.weight_bytes, setting.batch * setting.context
    wrapped = sum(n_in * n_out for name, (n_in, n_out) in shape.projections().items()
                  if name in lora_targets(setting.target))
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * w * tokens
    prefill = tokens * (3 * shape.intermediate + 2 * shape.hidden) * w
    if setting.attention == "eager":
        prefill += setting.batch * shape.heads * setting.context ** 2 * 4
    parts = {"weights": float(shape.params() * w), "merged copy": float(shape.layers * wrapped * w if setting.merged
                                                                       else 0), "KV cache": float(kv),
             "prefill": float(prefill), "logits": float(setting.batch * setting.max_new_tokens * shape.vocab * 4)}
    return Estimate(parts)


# ------------------------------------------------------------------ a run's settings, and the check

@dataclass(frozen=True)
class Plan:
    """A run's model shape and its training and acting settings, on its device."""

    shape: Shape
    train: Training
    act: Acting
    device: str
    copies: int  # model copies this machine holds at once (process pool / local Dask workers)


def model_shape(cfg: Config) -> Shape:
    """The run's model's shape from its config only: the tiny spec, SmolLM2's GGUF header, or config.json."""
    from transformers import AutoConfig

    from fedse.model import find_tiny, smollm2_gguf

    spec = cfg.model
    if spec.preset == "tiny":
        from fedse.tiny import config as tiny_config

        found = find_tiny(spec)
        return Shape.from_config(AutoConfig.from_pretrained(found) if found else
                                 tiny_config(spec.tiny, spec.tiny.vocab))
    if spec.preset == "smollm2-135m":
        gguf = smollm2_gguf()
        return Shape.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    source = Path(spec.preset) if Path(spec.preset).exists() else spec.preset
    return Shape.from_config(AutoConfig.from_pretrained(source))


def plan(cfg: Config, shape: Shape | None = None, device: torch.device | None = None,
         dtype: torch.dtype | None = None) -> Plan:
    """The run's settings as the estimate sees them. With `shape`, `device` and `dtype` given, nothing is looked
    up (bench/memory.py: a 7B model on a GPU this machine does not have, in bf16 with bf16 activations)."""
    from fedse.model import pick_device, pick_dtype

    device = device or pick_device(cfg.model.device)
    weight_bytes = (dtype or pick_dtype(cfg.model.dtype, device)).itemsize
    act_bytes = weight_bytes  # fp32 weights under bf16 autocast keep fp32 norms and residuals: taken as fp32
    spec, lora = cfg.learner, cfg.agent_spec().lora
    tokens = spec.batch_tokens or spec.batch_size * spec.max_len
    rows = (spec.batch_size if spec.batch_tokens is None else max(1, spec.batch_tokens // SHORTEST_ROW)) \
        if cfg.privacy.record.enabled else 0
    attention = "sdpa" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    shape = shape or model_shape(cfg)
    train = Training(tokens=tokens, width=spec.max_len, weight_bytes=weight_bytes, act_bytes=act_bytes,
                     checkpointing=spec.gradient_checkpointing, attention=attention, rank=lora.r, target=lora.target,
                     dropout=lora.dropout > 0, mask_bytes=1 if device.type == "cuda" else act_bytes,
                     freeze_a=lora.freeze_a, dp_rows=rows)
    policy = cfg.policy
    react = policy.mode == "react" or (policy.mode == "auto" and cfg.model.preset != "tiny")
    context = min(policy.context, shape.context)
    act = Acting(batch=policy.batch_size, context=context + (policy.max_new_tokens if react else 0),
                 max_new_tokens=policy.max_new_tokens, weight_bytes=weight_bytes, merged=not react,
                 attention=attention, target=lora.target)
    return Plan(shape, train, act, str(device), copies(cfg))


def copies(cfg: Config) -> int:
    """Models this machine holds at once: one per worker process of a process pool or a local Dask cluster
    (never more than the round's clients), else one (threads share it; an organisation's worker is elsewhere)."""
    o = cfg.orchestration
    local_pool = (o.mode == "inprocess" and o.task_runner == "process") or (o.mode == "dask" and not o.dask_address)
    clients = cfg.federation.clients_per_round or len(cfg.client_names())
    return min(o.workers, clients) if local_pool else 1


def free_memory(device: str) -> tuple[float, str]:
    """Bytes free on the device, and what they are: CUDA's free memory, or the RAM available to this process
    (the lower of the system's available memory and what its cgroup's limit leaves)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), f"free on {device}"
    import psutil

    free = float(psutil.virtual_memory().available)
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    try:
        text = limit.read_text().strip()
        if text != "max":
            free = min(free, float(int(text) - int(used.read_text())))
    except (OSError, ValueError):
        pass
    return free, "RAM available"


@dataclass(frozen=True)
class Verdict:
    """The check's outcome: one line to print, and whether the run fits (None: no estimate was possible)."""

    line: str
    fits: bool | None
    train: Estimate | None = None
    act: Estimate | None = None


def peak(p: Plan, train: Training | None = None, act: Acting | None = None) -> float:
    """This machine's peak: each model copy at the larger of its training and acting peaks."""
    return p.copies * max(training(p.shape, train or p.train).total, acting(p.shape, act or p.act).total)


def largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n) (fits is monotone: true up to some n); None if not even low."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def remedies(p: Plan, budget: float) -> list[str]:
    """Settings that would make the run fit in `budget` bytes: for acting, then for training (the least change
    first, at most two alternatives); both joined with "and" when both are over."""
    act, train = acting_remedy(p, budget), training_remedies(p, budget)
    if act and train:
        return [f"{act} and {train[0]}"]
    return [act] if act else train


def acting_remedy(p: Plan, budget: float) -> str | None:
    """None when acting fits; else fewer episodes per forward pass, or the weights are the problem."""
    a = p.act

    def need(n: int) -> float:
        return p.copies * acting(p.shape, dataclasses.replace(a, batch=n)).total

    if need(a.batch) <= budget:
        return None
    n = largest(lambda n: need(n) <= budget, 1, a.batch)
    return f"policy.batch_size<={n} (acting ~{need(n) / GiB:.1f} GiB)" if n else too_big(p)


def training_remedies(p: Plan, budget: float) -> list[str]:
    """[] when training fits; else each single setting that makes it fit, or the combination that does."""
    t, replace = p.train, dataclasses.replace

    def need(setting: Training) -> float:
        return p.copies * training(p.shape, setting).total

    def fits(setting: Training) -> bool:
        return need(setting) <= budget

    def size(setting: Training) -> str:
        return f"(training ~{need(setting) / GiB:.1f} GiB)"

    if fits(t):
        return []
    found = []
    if not t.checkpointing and fits(replace(t, checkpointing=True)):
        found.append(f"learner.gradient_checkpointing=true {size(replace(t, checkpointing=True))}")
    if t.attention == "eager" and fits(replace(t, attention="sdpa")):
        found.append(f"model.attn_implementation=sdpa {size(replace(t, attention='sdpa'))}")
    n = largest(lambda n: fits(replace(t, tokens=n)), t.width, t.tokens)
    if n is not None:
        found.append(f"learner.batch_tokens<={n} {size(replace(t, tokens=n))}")
    if found:
        return found[:2]
    best = replace(t, checkpointing=True, attention="sdpa" if t.attention == "eager" else t.attention)
    change = "learner.gradient_checkpointing=true" + (", model.attn_implementation=sdpa"
                                                      if best.attention != t.attention else "")
    n = largest(lambda n: fits(replace(best, tokens=n)), t.width, t.tokens)
    if n is not None:
        return [f"{change} and learner.batch_tokens<={n} {size(replace(best, tokens=n))}"]
    m = largest(lambda m: fits(replace(best, tokens=m, width=m)), 32, t.width)
    if m is not None:
        return [f"{change} and learner.max_len<={m} with learner.batch_tokens={m} "
                f"{size(replace(best, tokens=m, width=m))}"]
    return [too_big(p)]


def too_big(p: Plan) -> str:
    """The remedy when no batch setting helps: the frozen weights themselves."""
    weights = p.copies * p.shape.params() * p.train.weight_bytes / GiB
    halve = " or model.dtype=bfloat16 (halves them)" if p.train.weight_bytes == 4 and p.device.startswith("cuda") \
        else ""
    return f"a smaller model{halve}: the weights alone need {weights:.1f} GiB"


def verdict(p: Plan, free: float, where: str) -> Verdict:
    """The line for this plan against `free` bytes: the estimate and, when it cannot fit, what would."""
    train, act = training(p.shape, p.train), acting(p.shape, p.act)
    need = peak(p)
    copies = f" × {p.copies} model copies" if p.copies > 1 else ""
    head = (f"memory: training ~{train.gib()} ({train.detail()}), acting ~{act.gib()}{copies}: "
            f"{need / GiB:.1f} GiB of {free / GiB:.1f} GiB {where}")
    if need <= HEADROOM * free:
        return Verdict(f"{head}: fits", True, train, act)
    fixes = remedies(p, HEADROOM * free)
    return Verdict(f"{head}: does not fit (with 10 % headroom); set {' or '.join(fixes)}", False, train, act)


def check(cfg: Config, free: tuple[float, str] | None = None) -> Verdict | None:
    """The run's memory verdict on this machine (or against `free`: bytes and what they are); None when
    `model.memory_check` is off. A model whose config cannot be read (an uncached hub id offline) gets a line
    saying so and no verdict."""
    if cfg.model.memory_check == "off":
        return None
    try:
        p = plan(cfg)
    except (OSError, ValueError) as exc:
        return Verdict(f"memory: no estimate ({(str(exc).splitlines() or [type(exc).__name__])[0]})", None)
    return verdict(p, *(free or free_memory(p.device)))


class MemoryRefused(ValueError):
    """A run whose estimated peak memory does not fit this device; the message is the check's one line."""


def gate(cfg: Config, free: tuple[float, str] | None = None) -> str | None:
    """The line to print before a run (None when `model.memory_check` is off); raises MemoryRefused with that
    line instead when the run cannot fit and the check is `refuse`."""
    found = check(cfg, free)
    if found is None:
        return None
    if found.fits is False and cfg.model.memory_check == "refuse":
        raise MemoryRefused(found.line + " (or model.memory_check=warn to run anyway)")
    return found.line


def saved_by_autograd(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                      checkpoint: bool = False) -> int:
    """Bytes of every tensor autograd keeps for the backward pass of one `lm_loss`, each storage once, weights
    left out (torch's saved-tensor hooks see each one as it is saved): the measured counterpart of the
    activation estimate, which bench/memory.py tabulates and tests/test_memory.py bounds."""
    import torch

    from fedse import learner

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with learner.training(model), learner.checkpointing(model, checkpoint), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        learner.lm_loss(model, ids, mask, labels)
    return sum(saved.values())
