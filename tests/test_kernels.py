"""Portable CPU kernels: the same adapter bytes whatever path the host would pick; native paths differ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedse.kernels import KernelError, choose

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import hashlib, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from fedse.corpus import CorpusSpec
from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.learner import LearnerSpec, train
from fedse.model import ModelSpec, adapter_state, load_agent
from fedse.scripted import expert_policy
from fedse.tiny import TinySpec

micro = TinySpec(d_model=64, layers=2, heads=2, kv_heads=1, vocab=600, context=1024, corpus=CorpusSpec(episodes=6),
                 pretrain_steps=3, batch=4, window=256)
agent = load_agent(ModelSpec(preset="tiny", cache_dir=Path({cache!r}), tiny=micro, kernels={kind!r}), seed=0)
pool = EnvPool(lambda: make_env("maze"), list(range(10_050, 10_058)))
pool.run(expert_policy())
train(agent, pool.trajectories("maze", policy="expert"), LearnerSpec(lr=3e-3, epochs=1, batch_size=4, threads=1))
state = adapter_state(agent)
print(hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest())
"""


def trained(kind: str, cache: Path, **host: str) -> str:
    """The adapter digest a fresh process trains with `kind` kernels on a host whose libraries would pick the
    paths `host` names (ATEN_CPU_CAPABILITY, MKL_CBWR: what another CPU generation picks natively)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")} | host
    done = subprocess.run([sys.executable, "-c", TRAIN.format(root=str(ROOT), cache=str(cache), kind=kind)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def host_native() -> str:
    """The kernel path this host's torch picks on its own (AVX512, AVX2, ...), from a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


def test_portable_kernels_give_the_same_bytes_where_native_ones_differ(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    trained("native", cache)  # builds the micro base once
    native = {trained("native", cache), trained("native", cache, ATEN_CPU_CAPABILITY="default",
                                                 MKL_CBWR="COMPATIBLE")}
    assert len(native) == 2, "another kernel path trains a different adapter from the same data and seed"
    portable = {trained("portable", cache), trained("portable", cache, ATEN_CPU_CAPABILITY="default",
                                                    MKL_CBWR="COMPATIBLE")}
    assert len(portable) == 1
    if host_native() == "AVX2":  # this host's own path is the portable one: its native run is the portable run
        assert portable < native
    else:
        assert not portable & native


def test_a_process_that_already_computed_natively_is_refused() -> None:
    if host_native() == "AVX2":
        pytest.skip("this host's native kernels are the portable ones (AVX2): nothing computed natively differs")
    code = ("import torch; torch.ones(4).add_(1)\n"
            "from fedse.kernels import KernelError, choose\n"
            "try:\n    choose('portable')\nexcept KernelError as e:\n    print('refused:', e)")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "refused: model.kernels portable: torch already computes with" in done.stdout, done.stderr[-1000:]


def test_the_test_process_computes_with_portable_kernels() -> None:
    assert choose("portable") == "AVX2"
    assert issubclass(KernelError, ValueError), "the CLI turns it into one line"
