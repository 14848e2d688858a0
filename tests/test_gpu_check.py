"""bench/gpu.sh, the prepared GPU check: its CPU dry run end to end, and its refusals in one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu import old_transformers, parse, slug, summary_line  # noqa: E402


def gpu_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_dry_run_scores_both_methods_and_prints_one_summary_line(tmp_path: Path) -> None:
    seed = tmp_path / "seed"  # absent, as on a clean clone: the check writes the seed files it needs first
    done = gpu_sh("--dry-run", "--out", str(tmp_path), "--set", f"seed_data.dir={seed}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "seed: writing expert trajectories for maze, wordle" in done.stdout
    assert sorted(p.name for p in (seed / "s0").iterdir()) == ["maze.jsonl", "wordle.jsonl"]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu check on cpu (profile smoke): fedit ") and f"-> {tmp_path}" in last
    meta = json.loads((tmp_path / "gpu.json").read_text())
    assert set(meta["seconds"]) == {"phases", "fedit", "fedse"} and meta["skipped"] == []
    # the per-phase table: acting in both modes before and after issue 29, training, shares of the measured bound
    table = (tmp_path / "phases.md").read_text()
    for phase in ("act react (before)", "act react (after)", "act constrained (before)", "act constrained (after)",
                  "train"):
        assert f"| {phase} |" in table and f"| {phase} |" in done.stdout
    figures = json.loads((tmp_path / "phases.json").read_text())
    assert figures["device"] == "cpu" and figures["act.react.generated_tokens_per_sec"] > 0
    assert figures["act.react.decisions_per_sec"] > 0 and figures["act.react.before.decisions_per_sec"] > 0
    assert 0 < figures["train.share_of_fp32_bound"] < 1.5 and figures["train.tokens_per_sec"] > 0
    assert meta["device"] == "cpu" and "model.device=cpu" in meta["sets"]
    for method in ("fedit", "fedse"):
        first, final = meta["macro_first_last"][method]
        assert 0.0 <= first <= 1.0 and 0.0 <= final <= 1.0
        assert (tmp_path / "runs" / f"{method}-s0.json").exists()
    assert "fedse" in (tmp_path / "results.md").read_text() and (tmp_path / "curves.png").stat().st_size > 0
    # each method's own log stays beside the report (a lease that ends mid-check still says what ran)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["fedit.log", "fedse.log", "phases.log"]
    assert "macro" in (tmp_path / "logs" / "fedse.log").read_text()


def test_the_default_profile_is_the_real_lm_with_the_constrained_policy() -> None:
    from fedse.config import load_config

    args = parse([])
    cfg = load_config(ROOT / "params.yaml", profile=args.profile)
    assert args.profile == "smollm2" and cfg.model.preset == "smollm2-135m" and cfg.policy.mode == "constrained"
    assert cfg.federation.rounds >= 3


def test_an_older_transformers_than_the_pin_is_named() -> None:
    from importlib.metadata import version

    assert old_transformers((99, 0)) == version("transformers")
    assert old_transformers((5, 0)) is None


def test_an_unknown_profile_is_one_line() -> None:
    done = gpu_sh("--profile", "nope")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "not a profile" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_line() -> None:
    done = gpu_sh("--profile", "quick", "--device", "cuda")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "sees no CUDA device" in done.stderr


def test_a_spent_budget_runs_nothing_and_says_so(tmp_path: Path) -> None:
    done = gpu_sh("--dry-run", "--budget", "-1", "--out", str(tmp_path))
    assert done.returncode == 1 and "spent before any method ran" in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_device_folder_names_and_the_summary_line() -> None:
    assert slug("NVIDIA H200") == "nvidia-h200" and slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    line = summary_line("NVIDIA H200", "smollm2", {"pretrained": (0.2, 0.2), "fedse": (0.2, 0.3)}, ["fedit"],
                        412.0, 600.0, Path("reports/gpu/nvidia-h200"))
    assert line == ("gpu check on NVIDIA H200 (profile smollm2): pretrained 0.200 | fedse 0.200->0.300 | "
                    "fedit skipped (budget) | 412 s of 600 s -> reports/gpu/nvidia-h200")
