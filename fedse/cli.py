"""The `fedse` command line. Each command parses, calls the library, and prints; no logic lives here.

Errors a user can cause (bad params file, unknown env or policy, task id out of range) end in one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedse.config import Config, ConfigError, load_config, run_config
from fedse.model import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Federated self-evolution of LLM agents (Fed-SE).",
                  epilog="Example: fedse run --profile quick --method fedse --seed 0")
envs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The five private environments.",
                       epilog="Example: fedse envs play maze --task 4 --policy expert")
app.add_typer(envs_app, name="envs")
base_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="The embedded tiny base model (built offline from its spec).",
                       epilog="Example: fedse base info")
app.add_typer(base_app, name="base")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Ed25519 keys that sign what this organisation uploads, and the keys it trusts.",
                       epilog="Example: fedse keys init client_maze (then hand the printed public key over)")
app.add_typer(keys_app, name="keys")

# piped output (CI logs, `| less`) gets a wide page instead of rich's 80 columns, where tables fold to "…"
out = Console(width=None if Console().is_terminal else 200)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class State:
    params: Path = Path("params.yaml")
    overrides: tuple[str, ...] = ()
    _config: Config | None = None

    @classmethod
    def config(cls) -> Config:
        """The config, read once per process on first use."""
        if cls._config is None:
            cls._config = load_config(cls.params, overrides=list(cls.overrides))
        return cls._config


def clear_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, ValueError, KeyError, ModelError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(params: Path = typer.Option(Path("params.yaml"), "--params", envvar="FEDSE_PARAMS",
                                     help="params file (defaults apply when ./params.yaml is absent)"),
         sets: list[str] = typer.Option(None, "--set", help="override a parameter for any command, e.g. "
                                        "learner.epochs=4 (repeatable)")) -> None:
    State.params = params
    State.overrides = tuple(sets or ())
    State._config = None


def env_options(name: str) -> dict[str, Any]:
    return State.config().envs.options.get(name, {})


@envs_app.command("list", epilog="Example: fedse envs list")
@clear_errors
def envs_list() -> None:
    """List registered environments with their turn limits and task-id ranges."""
    from fedse.envs.registry import env_class, env_names

    table = Table("env", "turns", "test ids", "train ids", title="environments")
    for name in env_names():
        cls = env_class(name)
        table.add_row(name, str(cls.max_turns), _rng(cls.test_ids), _rng(cls.train_ids))
    out.print(table)


def show(text: str, style: str | None = None) -> None:
    """Environment text verbatim: WebShop's `[buttons]` are not rich markup, and lines are not re-wrapped."""
    out.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _rng(ids: range) -> str:
    return f"{ids.start}–{ids.stop - 1} ({len(ids):,})"


@envs_app.command("play", epilog="Example: fedse envs play wordle --task 0 --policy random --seed 1")
@clear_errors
def envs_play(env: str = typer.Argument(..., help="environment name (see `fedse envs list`)"),
              task: int = typer.Option(0, "--task", help="task id (test or train)"),
              policy: str = typer.Option("human", "--policy", help="human, random or expert"),
              seed: int = typer.Option(0, "--seed", help="seed of the random policy")) -> None:
    """Play one episode: type actions yourself, or watch the random or expert policy."""
    from fedse.envs.registry import make_env
    from fedse.scripted import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    game = make_env(env, **env_options(env))
    observation, info = game.reset(task)
    rng = random.Random(seed)
    out.print(f"[bold]{env}[/] task {task} ({game.split_of(task)}), at most {game.max_turns} turns\n")
    show(observation)
    done = False
    while not done:
        if policy == "human":
            show(f"actions: {' | '.join(info['admissible_actions'])}", style="dim")
            try:
                action = input("> ")
            except EOFError:
                out.print("\n(input closed; episode abandoned)")
                return
        else:
            action = game.expert_action() if policy == "expert" else rng.choice(info["admissible_actions"])
            show(f"> {action}", style="cyan")
        observation, reward, terminated, truncated, info = game.step(action)
        done = terminated or truncated
        show(observation)
    verdict = "[green]success[/]" if info["success"] else "[red]failure[/]"
    out.print(f"\n{verdict} after {info['turn']} turns, reward {reward:.3f}")


@envs_app.command("check", epilog="Example: fedse envs check --episodes 25 --json")
@clear_errors
def envs_check(episodes: int = typer.Option(None, "--episodes", min=1, help="test tasks per env [params]"),
               as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Expert and random success on the first N test tasks of every environment, and steps/s."""
    from fedse.envs.check import check_env

    cfg = State.config()
    n = episodes or cfg.check.episodes
    results: dict[str, dict[str, float]] = {}
    with _progress(disable=as_json) as bar:
        job = bar.add_task("checking environments", total=len(cfg.envs.names))
        for name in cfg.envs.names:
            bar.update(job, description=f"checking {name}")
            results[name] = check_env(name, n, cfg.seed, env_options(name))
            bar.advance(job)
    if as_json:
        print(json.dumps({"envs": results}))
        return
    table = Table("env", "tasks", "expert success", "expert turns", "random success", "steps/s",
                  title=f"fedse envs check — first {n} test tasks (random: mean of 4 passes; 95% Wilson intervals "
                        "over the tasks)")
    for name, r in results.items():
        table.add_row(name, str(r["tasks"]), _with_ci(r["expert_success"], r["expert_ci95"]),
                      f"{r['expert_turns']:.1f}", _with_ci(r["random_success"], r["random_ci95"]),
                      f"{r['steps_per_sec']:,.0f}")
    out.print(table)


def _with_ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _seed_list(text: str) -> list[int]:
    """'0-4' or '0,2,5' -> run seeds; anything else is one clear error."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a range like 0-4 or a list like 0,2,5") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: expected at least one run seed, none negative")
    return seeds


@envs_app.command("audit", epilog="Example: fedse envs audit --profile quick --profile full --seeds 0-4")
@clear_errors
def envs_audit(profiles: list[str] = typer.Option(None, "--profile", help="whose exploration draws to audit, "
                                                  "repeatable: one table each [params: profile]"),
               seeds: str = typer.Option("0-4", "--seeds", help="run seeds whose seed and exploration draws to "
                                         "audit, e.g. 0-4 or 0,2"),
               seed_dir: Path = typer.Option(None, "--seed-dir", help="seed files to audit as well (s<seed>/<env>."
                                             "jsonl, where present) [params: seed_data.dir]"),
               as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Count test and validation tasks whose content recurs among validation, seed, exploration or pretraining
    tasks; exits 1 on any overlap."""
    from fedse.envs.contamination import SOURCES, audit, first

    runs = [State.config()] if not profiles else \
        [load_config(State.params, profile=p, overrides=list(State.overrides)) for p in profiles]
    dirty = []
    for cfg in runs:
        reports = audit(cfg, _seed_list(seeds), seed_dir or cfg.seed_data.dir)
        if as_json:
            print(json.dumps({"profile": cfg.profile, "seeds": seeds, "envs": [r.as_dict() for r in reports]}))
        else:
            table = Table("env", "test keys", "val keys", "val ∩ test", *[f"{s}\n→ test / val" for s in SOURCES],
                          title=f"held-out content among what is trained or tuned on (profile {cfg.profile}, "
                                f"run seeds {seeds}); every cell must be 0")
            for r in reports:
                cells = [f"{len(r.sources[s][1])} / {len(r.sources[s][2])}  ({r.sources[s][0]:,} tasks)"
                         for s in SOURCES]
                table.add_row(r.env, str(r.test_keys), str(r.val_keys), str(len(r.val_in_test)), *cells,
                              style=None if r.clean else "bold red")
            out.print(table)
        dirty += [(cfg.profile, r) for r in reports if not r.clean]
    for profile, r in dirty:
        found = [f"{name} ({first(t + v)})" for name, (_, t, v) in r.sources.items() if t or v]
        if r.val_in_test:
            found.insert(0, f"validation ({first(r.val_in_test)})")
        err.print(f"[bold red]overlap:[/] {r.env} (profile {profile}): held-out content in {'; '.join(found)}",
                  highlight=False, soft_wrap=True)
    if dirty:
        raise typer.Exit(1)


@app.command("seed", epilog="Example: fedse seed --seed 1 --out seeds --env maze --env wordle --count 16")
@clear_errors
def seed(out_dir: Path = typer.Option(None, "--out", help="seed-data root [params: seed_data.dir]"),
         env: list[str] = typer.Option(None, "--env", help="only these environments (repeatable)"),
         count: int = typer.Option(None, "--count", min=0, help="trajectories per env [params]"),
         run_seed: int = typer.Option(None, "--seed", min=0, help="the run seed whose draw to write [params: seed]"),
         ) -> None:
    """Write the expert seed trajectories of one run seed (train task ids only) as <out>/s<seed>/<env>.jsonl."""
    from fedse.seed import seed_dir, write_seed_file

    cfg = State.config()
    names = env or cfg.envs.names
    target = out_dir or cfg.seed_data.dir
    drawn = cfg.seed if run_seed is None else run_seed
    table = Table("env", "trajectories", "expert success", "mean turns", "file",
                  title=f"expert seed trajectories in {seed_dir(target, drawn)}/ (run seed {drawn}, train ids only)")
    with _progress() as bar:
        for name in names:
            n = count if count is not None else cfg.seed_data.counts.get(name, 0)
            job = bar.add_task(f"seeding {name}", total=n)
            summary = write_seed_file(name, n, target, drawn, env_options(name),
                                      advance=lambda k, job=job: bar.advance(job, k))
            table.add_row(name, str(summary.written), f"{summary.expert_success:.3f}",
                          f"{summary.mean_turns:.1f}", summary.path.name)
    out.print(table)


def _agent(adapter: Path | None, bar: Progress):
    """Load the configured base + adapter, showing the one-off tiny-model build as a progress bar."""
    from transformers.utils import logging as hf_logging

    from fedse.model import find_tiny, load_agent

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    spec = State.config().agent_spec()  # the LoRA the run's aggregation rule needs
    job = None
    if spec.preset == "tiny" and find_tiny(spec) is None:
        job = bar.add_task("building the tiny base model (once)", total=spec.tiny.pretrain_steps)

    def advance(step: int, loss: float) -> None:
        if job is not None:
            bar.update(job, completed=step, description=f"building the tiny base model (loss {loss:.2f})")

    return load_agent(spec, adapter, seed=State.config().seed, advance=advance)


@base_app.command("build", epilog="Example: fedse base build (then git add models/), or "
                  "fedse --set model.tiny.pretrain_steps=500 base build")
@clear_errors
def base_build(out_dir: Path = typer.Option(None, "--out", help="folder [params: model.models_dir/tiny-<spec key>, "
                                            "the committed location]"),
               workers: int = typer.Option(None, "--workers", min=1, help="processes playing the corpus [all cores]"),
               force: bool = typer.Option(False, "--force", help="rebuild even if a valid base is there")) -> None:
    """Build the tiny base of params' `model.tiny` spec (mixed-skill corpus, tokenizer, pretraining).

    Deterministic from the spec; about 1.7 hours on 2 CPU cores at the shipped budget. An interrupted build
    resumes where it last saved (every 100 steps, `.tiny-<key>.resume.pt` beside the target) when run again.
    The result carries its spec hash and the sha256 of its weights, so a committed copy is loaded in seconds.
    """
    import os
    import time

    import torch

    from fedse.model import committed_dir, verify_tiny
    from fedse.tiny import INFO, build

    spec = State.config().model
    target = out_dir or committed_dir(spec)
    if target.exists() and not force:
        verify_tiny(target, spec)
        out.print(f"{target} already holds this spec's base (verified); --force rebuilds it", highlight=False)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    with _progress() as bar:
        job = bar.add_task("pretraining", total=spec.tiny.pretrain_steps)

        def advance(step: int, loss: float) -> None:
            bar.update(job, completed=step, description=f"pretraining (loss {loss:.3f})")

        build(spec.tiny, target, advance, workers=workers or os.cpu_count() or 1)
    info = json.loads((target / INFO).read_text())
    out.print(f"built {target} in {time.perf_counter() - started:,.0f} s: spec {info['key']}, "
              f"{info['tokens_seen']:,} tokens seen, loss {info['loss_first']:.3f} → {info['loss_last']:.3f}, "
              f"weights sha256 {info['weights_sha256'][:12]}", highlight=False)


@base_app.command("info", epilog="Example: fedse base info --json")
@clear_errors
def base_info(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Which stored base params' spec resolves to (committed or cached, verified), and how it was built."""
    from fedse.model import committed_dir, find_tiny, tiny_dir
    from fedse.tiny import INFO

    spec = State.config().model
    found = find_tiny(spec)
    info = json.loads((found / INFO).read_text()) if found else {}
    if as_json:
        print(json.dumps({"key": spec.tiny.key(), "path": str(found) if found else None, **info}))
        return
    if found is None:
        out.print(f"spec {spec.tiny.key()}: no base at {committed_dir(spec)} or {tiny_dir(spec)}; the first command "
                  "that needs it builds it (or run `fedse base build`)", highlight=False)
        return
    table = Table("", "value", title=f"tiny base {spec.tiny.key()}")
    table.add_row("path", str(found))
    table.add_row("weights sha256", info["weights_sha256"])
    table.add_row("tokens seen", f"{info['tokens_seen']:,}")
    table.add_row("loss", f"{info['loss_first']:.3f} → {info['loss_last']:.3f}")
    for env, c in info.get("corpus", {}).items():
        table.add_row(f"corpus {env}", f"{c['episodes']} episodes, player success {c['success']:.2f}, "
                      f"{c['mean_turns']:.1f} turns")
    out.print(table)


@app.command("train", epilog="Example: fedse train --env maze --data data/seed/maze.jsonl --out ad_maze --limit 400")
@clear_errors
def train_cmd(env: str = typer.Option(..., "--env", help="environment the trajectories come from"),
              data: Path = typer.Option(..., "--data", help="trajectories (JSONL), e.g. data/seed/maze.jsonl"),
              out_dir: Path = typer.Option(..., "--out", help="folder for the trained adapter (PEFT format)"),
              adapter: Path = typer.Option(None, "--adapter", help="start from this adapter [fresh]"),
              limit: int = typer.Option(None, "--limit", min=1, help="use only the first N trajectories")) -> None:
    """SFT of a LoRA adapter on successful trajectories of one environment."""
    from fedse.learner import train
    from fedse.model import save_adapter
    from fedse.policy import acting_window
    from fedse.trajectory import read_jsonl

    cfg = State.config()
    if not data.exists():
        raise ValueError(f"{data}: trajectory file not found (write seeds with `fedse seed`)")
    records = [t for t in read_jsonl(data) if t.env == env and t.success][:limit]
    if not records:
        raise ValueError(f"{data}: no successful {env} trajectories in it")
    with _progress() as bar:
        agent = _agent(adapter, bar)
        job = bar.add_task(f"training on {len(records)} {env} trajectories", total=None)

        def advance(step: int, total: int, loss: float) -> None:
            bar.update(job, completed=step, total=total, description=f"training {env} (loss {loss:.3f})")

        stats = train(agent, records, cfg.learner, seed=cfg.seed, advance=advance,
                      window=acting_window(agent, cfg.policy))
        digest = save_adapter(agent, out_dir, {"env": env, "data": str(data), "trajectories": len(records),
                                           "steps": stats.steps, "tokens": stats.tokens})
    typer.echo(f"{stats.steps} steps, {stats.tokens:,} tokens ({stats.tokens_per_sec:,.0f}/s), loss "
               f"{stats.loss_first:.3f} → {stats.loss_last:.3f}; adapter {out_dir} (sha256 {digest[:12]})")


@app.command("eval", epilog="Example: fedse eval --adapter ad_maze --env maze --split val --episodes 50")
@clear_errors
def eval_cmd(adapter: Path = typer.Option(None, "--adapter", help="adapter folder [none: the base model]"),
             env: str = typer.Option("all", "--env", help="an environment name, or all"),
             episodes: int = typer.Option(None, "--episodes", min=1, help="first N tasks per env [all]"),
             split: str = typer.Option("test", "--split", help="test (report) or val (held-out train ids: tune)"),
             passes: int = typer.Option(None, "--passes", min=1, help="plays of each task [params: eval.passes]"),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Success and mean reward on held-out tasks (at policy.eval_temperature), micro/macro averages, 95% intervals.

    `--split val` scores the validation ids instead (train-distribution tasks no seed or client uses), which
    is where hyperparameters are chosen; test tasks are for reporting only. Each task is played `--passes`
    times on draws fixed by (seed, env, task, pass), the same ones the round loop's evaluation uses.
    """
    from fedse.envs.registry import env_class
    from fedse.evaluate import score, summarise
    from fedse.rollout import rollout

    cfg = State.config()
    if split not in ("test", "val"):
        raise ValueError(f"--split {split!r}: choose test or val")
    names = cfg.envs.names if env == "all" else [env_class(env).name]
    n = episodes or cfg.eval.episodes
    passes = passes or cfg.eval.passes
    per_env = {}
    with _progress(disable=as_json) as bar:
        agent = _agent(adapter, bar)
        for name in names:
            cls = env_class(name)
            ids = list(cls.test_ids if split == "test" else cls.validation_ids())[:n]
            job = bar.add_task(f"evaluating {name}", total=len(ids) * passes)
            records = rollout(agent, name, ids, cfg.policy, evaluation=True, seed=cfg.seed,
                              env_options=env_options(name), advance=lambda k, job=job: bar.advance(job, k),
                              passes=passes)
            per_env[name] = score(records, records.pace.decisions, records.pace.seconds)
    result = summarise(per_env)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("env", "success", "95% CI", "reward", "n",
                  title=f"fedse eval ({split}, {passes} pass{'es' if passes > 1 else ''} per task) — "
                        f"{adapter or 'base model (no adapter)'}",
                  caption=f"{result['eval_decisions']} decisions in {result['eval_seconds']:.1f} s")
    for name, s in per_env.items():
        table.add_row(name, f"{s.success:.3f}", f"{s.ci_low:.2f}–{s.ci_high:.2f}", f"{s.reward:.3f}", str(s.n))
    table.add_row("micro", f"{result['micro']:.3f}", "", "", "")
    table.add_row("macro", f"{result['macro']:.3f}", "", "", "")
    out.print(table)


@app.command("run", epilog="Example: fedse run --profile quick --method fedse --seed 0")
@clear_errors
def run_cmd(method: str = typer.Option(None, "--method", help="fedse, fedit, local, centralized, pretrained, "
                                       "no_filter, no_history, weighted, local_se [params: federation.method]"),
            profile: str = typer.Option(None, "--profile", help="smoke, quick, full, smollm2, paper [params: profile]"),
            seed: int = typer.Option(None, "--seed", help="run seed [params: seed]"),
            out_dir: Path = typer.Option(None, "--out", help="run folder [runs/<method>-<profile>-s<seed>]"),
            sets: list[str] = typer.Option(None, "--set", help="override a parameter, e.g. model.lora.r=4"),
            resume: Path = typer.Option(None, "--resume", help="continue the killed run in this folder (same "
                                        "parameters): finished rounds and clients are not redone")) -> None:
    """Run the federated round loop of one method with plain function calls; writes metrics.json, curves.png."""
    from fedse.federation import Federation
    from fedse.memory import gate
    from fedse.report import round_line

    cfg = run_config(State.params, profile, method, seed, [*State.overrides, *(sets or [])])
    State._config = cfg
    if resume is not None and out_dir is not None and Path(out_dir) != Path(resume):
        raise ValueError(f"--out {out_dir} and --resume {resume} name different folders; give one")
    memory_line = gate(cfg)  # refuses (one line) a run whose estimated peak memory cannot fit this device
    if memory_line:
        out.print(memory_line, highlight=False, soft_wrap=True)
    out_dir = resume or out_dir or cfg.federation.out / run_name(cfg)
    with _progress() as bar:
        agent = _agent(None, bar)
        fed = Federation(agent, cfg, out_dir, progress=RichProgress(bar), resume=resume is not None)
        fed.on_round = lambda round, record, *_: out.print(round_line(record, fed.total_rounds), highlight=False)
        doc = fed.run()
    summarise_run(doc, out_dir)


def summarise_run(doc: dict[str, Any], out_dir: Path) -> Path:
    """The final round as a table, the learning-curve PNG written next to metrics.json; returns the plot."""
    from fedse.plots import run_curves

    plot = run_curves(doc, out_dir / "curves.png")
    last = doc["rounds"][-1]
    out.print(f"{doc['method']} after {len(doc['rounds'])} round(s), profile {doc['profile']}, seed {doc['seed']}:",
              highlight=False)
    table = Table("env", "success", "95% CI", "n")
    for name, s in last["envs"].items():
        table.add_row(name, f"{s['success']:.3f}", f"{s['ci95'][0]:.2f}–{s['ci95'][1]:.2f}", str(s["n"]))
    table.add_row("micro", f"{last['micro']:.3f}", "", "")
    table.add_row("macro", f"{last['macro']:.3f}", f"{last['macro_ci95'][0]:.2f}–{last['macro_ci95'][1]:.2f}", "")
    out.print(table)
    out.print(f"metrics: {out_dir / 'metrics.json'}\nplot:    {plot}", highlight=False)
    if "exchange" in doc:
        ex = doc["exchange"]
        out.print(f"adapters exchanged: {ex['uri']} ({ex['dtype']}; what left each client: fedse audit -e "
                  f"{ex['experiment']})", highlight=False, soft_wrap=True)
    return plot


def run_name(cfg: Config) -> str:
    """Default run folder name: method, profile, seed, and the rank when it is not the default 8."""
    rank = "" if cfg.model.lora.r == 8 else f"-r{cfg.model.lora.r}"
    return f"{cfg.federation.method}-{cfg.profile or 'base'}-s{cfg.seed}{rank}"


@app.command("report", epilog="Example: fedse report runs/fedse-quick-s0 runs/fedit-quick-s0 --out reports/mine")
@clear_errors
def report_cmd(runs: list[Path] = typer.Argument(..., help="run folders (each with a metrics.json)"),
               out_dir: Path = typer.Option(Path("reports"), "--out", help="folder for results.md and the figures"),
               main: list[str] = typer.Option(None, "--main", help="a label of the main comparison (repeatable) "
                                              "[pretrained, fedit, fedse]")) -> None:
    """Markdown table of final success per env and method (mean ± 95% CI over seeds, paired differences with
    both intervals) and figures: curves.png (the main comparison in one panel, with intervals over seeds),
    ablations.png (every other method beside Fed-SE), forest.png (every paired difference, both intervals),
    exploration.png (every method, and what its clients found exploring), and curves.csv for `dvc plots show`.

    Each run's metrics.json is copied to `OUT/runs/<run>.json`, so the report can be rebuilt from OUT alone:
    `fedse report OUT/runs/*.json --out OUT`.
    """
    from fedse.atomic import write_json, write_text
    from fedse.plots import curves_csv, forest, main_comparison, method_curves, small_multiples
    from fedse.report import forest_rows, labeller, load_runs, markdown

    docs = load_runs(runs)
    for path, doc in zip(runs, docs, strict=True):  # the small metrics files travel with the report (reviewable)
        name = path.name if path.is_dir() else path.stem
        if not (path.is_file() and path.resolve().parent == (out_dir / "runs").resolve()):
            write_json(out_dir / "runs" / f"{name}.json", doc)
    names = main or ["pretrained", "fedit", "fedse"]
    plot = main_comparison(docs, out_dir / "curves.png", names, label=labeller(docs))
    others = small_multiples(docs, out_dir / "ablations.png", names, label=labeller(docs))
    differences = forest(forest_rows(docs), out_dir / "forest.png")
    method_curves(docs, out_dir / "exploration.png", label=labeller(docs))
    curves_csv(docs, out_dir / "curves.csv", label=labeller(docs))  # the same lines for `dvc plots show`
    text = markdown(docs, plot, [p for p in (others, differences) if p is not None])
    write_text(out_dir / "results.md", text)
    out.print(text, markup=False, highlight=False)
    out.print(f"table: {out_dir / 'results.md'}\nplots: {plot}, {others}, {differences}")


@app.command("compare", epilog="Example: fedse compare --tracking-uri http://127.0.0.1:5000 --json")
@clear_errors
def compare_cmd(model: str = typer.Option("fedse-global", "--model", help="registered model name"),
                uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                        help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default the served "
                                        "http://127.0.0.1:5000]"),
                as_json: bool = typer.Option(False, "--json", help="print one JSON list")) -> None:
    """Registered global adapters side by side: success per env, micro/macro, method, round, alias.

    The one command that reaches the MLOps layer (`tasks/`, MLflow); the library modules never import it.
    """
    from tasks.compare import versions

    uri = uri or "http://127.0.0.1:5000"
    try:
        rows = versions(uri, model)
    except Exception as exc:  # an unreachable server surfaces as many exception types: one line for all
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{uri}: cannot read the MLflow registry ({type(exc).__name__}); is the server up "
                         "(make serve)?") from None
    if as_json:
        out.print_json(json.dumps(rows))
        return
    envs = sorted({e for r in rows for e in r["success"]})
    table = Table("version", "alias", "experiment", "method", "round", "seed", "scored on", *envs, "micro",
                  "macro", title=f"{model} ({uri}); figures compare only within one 'scored on' task set")
    for r in rows:
        table.add_row(str(r["version"]), ",".join(a.split("-")[0] for a in r["aliases"]), r["experiment"] or "",
                      r["method"] or "", str(r["round"]), str(r["seed"]), r.get("task_set") or "",
                      *(_cell(r["success"].get(e)) for e in envs), _cell(r["micro"]), _cell(r["macro"]))
    out.print(table)


@app.command("audit", epilog="Example: fedse audit -e EXPERIMENT --tensors (no -e: lists the experiments)")
@clear_errors
def audit_cmd(experiment: str = typer.Option(None, "--experiment", "-e", help="the run's name in the store "
                                             "(metrics.json: exchange.experiment); omitted: list the known ones"),
              logs: Path = typer.Option(None, "--dir", help="where egress logs are [params: transport.audit_dir, "
                                        "else the run folders under federation.out]"),
              tensors: bool = typer.Option(False, "--tensors", help="also list every tensor's name and shape"),
              as_json: bool = typer.Option(False, "--json", help="print the log entries as one JSON list"),
              verify: bool = typer.Option(False, "--verify", help="check each log's hash chain; exit 1 where a "
                                          "line was removed, inserted, reordered or edited")) -> None:
    """What left each client per round: tensors, shapes, dtype, bytes, sha256, the metadata sent and where it
    went; and the round requests an organisation refused.

    Read from the clients' own egress logs (one JSON line per upload, written before the upload returns, each
    chained to the line before by its hash).
    """
    from fedse import audit

    cfg = State.config()
    root = logs or cfg.transport.audit_dir or cfg.federation.out
    if experiment is None:
        table = Table("experiment", "egress log", title=f"experiments with egress logs under {root}")
        for name, folder in audit.known(root):
            table.add_row(name, str(folder / name))
        out.print(table)
        return
    folders = audit.find(root, experiment)
    if verify:
        logs = sorted(p for f in folders for p in (Path(f) / experiment).glob("*.jsonl"))
        problems = [line for path in logs for line in audit.verify(path)]
        for line in problems:
            err.print(line, markup=False, highlight=False)
        out.print(f"{len(logs)} egress log(s) of {experiment}: " + ("chain intact" if not problems else
                                                                     f"{len(problems)} break(s)"))
        raise typer.Exit(1 if problems else 0)
    entries = audit.read(folders, experiment)
    if as_json:
        print(json.dumps(entries))
        return
    table = Table("round", "sender", "tensors", "values", "dtype", "bytes", "sha256", "metadata", "destination",
                  "record ε", title=f"egress of {experiment}: every object that left a client (and the server's "
                  "broadcasts); record ε: the (ε, δ) its trajectories had spent under DP-SGD, '-' without DP")
    for entry in entries:
        row = audit.summary(entry)
        if "refused" in row:
            table.add_row(str(row["round"]), row["sender"], "-", "-", "-", "-", "-", f"refused: {row['refused']}", "-",
                          "-")
            continue
        table.add_row(str(row["round"]), row["sender"], str(row["tensors"]), f"{row['values']:,}", row["dtype"],
                      f"{row['bytes']:,}", row["sha256"][:16], json.dumps(row["metadata"]), row["destination"],
                      f"{row['epsilon']:.2f}" if "epsilon" in row else "-")
    out.print(table)
    if tensors:
        for entry in (e for e in entries if e.get("kind", "upload") == "upload"):
            show(f"round {entry['round']} {entry['sender']} ({entry['key']}):")
            for name, shape in entry["tensors"].items():
                show(f"  {name} {tuple(shape)} {entry['dtype']}")


def _keys_dir() -> Any:
    return typer.Option(Path("keys"), "--dir", envvar="FEDSE_KEYS", help="the keyring folder [env FEDSE_KEYS, "
                        "else ./keys]")


@keys_app.command("init", epilog="Example: fedse keys init client_maze --dir .orgs/client_maze/keys")
@clear_errors
def keys_init(name: str = typer.Argument(..., help="signer name: server, client_<env>, …"),
              keys_dir: Path = _keys_dir()) -> None:
    """Create the signing key NAME if absent (an existing key is kept) and print its public key."""
    from fedse.signing import Keyring

    ring = Keyring(keys_dir)
    existed = ring.has(name)
    fingerprint = ring.init(name)
    public = ring.public_hex(name)
    show(f"{name}  key {fingerprint}  ({'existing' if existed else 'new'}, {keys_dir / (name + '.key')})")
    show(f"public key: {public}")
    show(f"the other party runs: fedse keys trust {name} {public}")


@keys_app.command("rotate", epilog="Example: fedse keys rotate server")
@clear_errors
def keys_rotate(name: str = typer.Argument(..., help="own signer name"), keys_dir: Path = _keys_dir()) -> None:
    """Retire the key NAME (kept under retired/) and create a new one; signatures by the old key stop verifying."""
    from fedse.signing import Keyring

    ring = Keyring(keys_dir)
    old, new = ring.rotate(name)
    public = ring.public_hex(name)
    show(f"{name}  key {old} -> {new}  (old pair in {keys_dir / 'retired'})")
    show(f"public key: {public}")
    show(f"every party that checks {name}'s signatures must now run: fedse keys trust {name} {public} --replace")


@keys_app.command("trust", epilog="Example: fedse keys trust server keys/server.pub --dir .orgs/client_maze/keys")
@clear_errors
def keys_trust(name: str = typer.Argument(..., help="the other party's signer name"),
               public: str = typer.Argument(..., help="its public key: 64 hex digits, or a .pub file"),
               keys_dir: Path = _keys_dir(),
               replace: bool = typer.Option(False, "--replace", help="replace a different key already trusted "
                                            "for NAME (after it rotated)")) -> None:
    """Trust NAME's public key for checking its signatures."""
    from fedse.signing import Keyring

    source = Path(public)
    if source.is_file():
        try:
            public = source.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read public key file {source}: {exc}") from None
    elif "/" in public or public.endswith(".pub"):
        raise ValueError(f"no such public key file {source}")
    fingerprint = Keyring(keys_dir).trust(name, public, replace=replace)
    show(f"{name}  key {fingerprint}  trusted ({keys_dir / 'trusted' / (name + '.pub')})")


@keys_app.command("show", epilog="Example: fedse keys show --json")
@clear_errors
def keys_show(keys_dir: Path = _keys_dir(),
              as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """The own and trusted keys of the keyring, with fingerprints and public keys."""
    from fedse.signing import Keyring

    ring = Keyring(keys_dir)
    names = ring.names()
    rows = {kind: [{"name": n, "fingerprint": ring.fingerprint(n), "public": ring.public_hex(n)} for n in found]
            for kind, found in names.items()}
    if as_json:
        print(json.dumps({"dir": str(keys_dir), **rows}))
        return
    table = Table("name", "kind", "fingerprint", "public key", title=f"keys in {keys_dir}")
    for kind, entries in rows.items():
        for row in entries:
            table.add_row(row["name"], kind, row["fingerprint"], row["public"])
    out.print(table)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


class RichProgress:
    """The library's progress protocol drawn as rich progress bars."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar

    def start(self, label: str, total: int | None) -> Any:
        return self.bar.add_task(label, total=total)

    def update(self, job: Any, advance: int = 0, completed: int | None = None, total: int | None = None,
               label: str | None = None) -> None:
        self.bar.update(job, advance=advance or None, completed=completed, total=total, description=label)

    def finish(self, job: Any) -> None:
        self.bar.remove_task(job)


def _progress(disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, disable=disable or not sys.stderr.isatty(), transient=True)


if __name__ == "__main__":
    app()
