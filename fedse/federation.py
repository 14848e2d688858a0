"""The Fed-SE round loop, written once; every baseline and ablation is a `Method` switch of it.

One round t (DESIGN §1):
  broadcast φ_t → each client: explore its train tasks at temperature 1.0 → success filter → cumulative
  buffer → SFT from φ_t → upload φ_k → server: φ_{t+1} = mean_k φ_k → evaluate φ_{t+1} on every test set.

Upload and broadcast go through `fedse.transport` (a folder by default, S3 when served): the server averages
exactly the adapters it downloaded and verified, and a client starts round t+1 from the global adapter it
downloaded; what each client sent is logged by `fedse.audit`.

The loop is written once, `Federation`: rounds, checkpoints and resume (fedse.checkpoint), missing clients
and the quorum, the server step (`server_round`), evaluation, metrics.json. Who does a round's work is its
`Runner`: `InProcess` calls the small step functions (`explore`, `client_data`, `local_train`,
`evaluate_adapter`) one client at a time on one agent (`fedse run`); the Prefect flow's runner
(flows/round_loop.py) submits the very same calls as tasks. In process, all clients share one frozen base
model and swap adapter tensors in and out of it: the base is the same everywhere, only φ differs, exactly as
on separate machines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from fedse import audit, checkpoint, dpsgd, privacy
from fedse.aggregate import Aggregate, aggregate, orthonormal_init, personalised, state_bytes
from fedse.atomic import write_json
from fedse.buffer import Buffer, Keep, shortest_per_task, success_filter
from fedse.config import Config
from fedse.envs.registry import env_class, make_env
from fedse.evaluate import EnvScore, score, summarise
from fedse.kernels import choose as choose_kernels
from fedse.learner import TrainStats, train
from fedse.methods import Method, method
from fedse.model import Agent, adapter_state, read_adapter, save_adapter, set_adapter_state, state_hash
from fedse.policy import acting_window
from fedse.prune import prune
from fedse.quality import experience
from fedse.rollout import Episodes, Pace, rollout
from fedse.screen import screen, with_quorum
from fedse.seed import seed_file
from fedse.trajectory import Trajectory, read_jsonl
from fedse.transport import Transport, TransportError, Upload, experiment_name

AdapterState = dict[str, torch.Tensor]
POOLED = "pooled"


class Progress(Protocol):
    """Where long work reports itself (the CLI draws rich progress bars; tests pass nothing)."""

    def start(self, label: str, total: int | None) -> Any: ...
    def update(self, job: Any, advance: int = 0, completed: int | None = None, total: int | None = None,
               label: str | None = None) -> None: ...
    def finish(self, job: Any) -> None: ...


class Silent:
    def start(self, label: str, total: int | None) -> None:
        return None

    def update(self, job: Any, advance: int = 0, completed: int | None = None, total: int | None = None,
               label: str | None = None) -> None:
        return None

    def finish(self, job: Any) -> None:
        return None


@dataclass
class Client:
    """One organisation: its environment(s), its private buffer, and (without a server) its own adapter."""

    name: str
    envs: list[str]
    buffer: Buffer
    state: AdapterState | None = None


# ------------------------------------------------------------------ the steps (what the flow's tasks call)
def env_of(client: str) -> str:
    """The environment a client organisation plays: its own name, or <env> of <env>-k (`orgs_per_env`)."""
    return client.partition("-")[0]


def org_index(client: str) -> int:
    """Which organisation of its environment a client is: 0 for a client named after its env, k − 1 for
    <env>-k (`federation.orgs_per_env`)."""
    _, _, k = client.partition("-")
    return int(k) - 1 if k else 0


def seed_records(cfg: Config, env: str, shard: int = 0) -> list[Trajectory]:
    """A client's expert seeds: the `shard`-th block of `seeds_per_client` records of the run seed's file
    `<seed_data.dir>/s<seed>/<env>.jsonl` (the first block for the paper's one client per env; organisations of
    one env get disjoint blocks)."""
    path = seed_file(cfg.seed_data.dir, cfg.seed, env)
    if not path.exists():
        raise ValueError(f"{path}: seed trajectories of run seed {cfg.seed} not found (run `fedse seed --seed "
                         f"{cfg.seed}` or `dvc repro seed@{cfg.seed}`)")
    limit = cfg.federation.seeds_per_client
    if limit is None and shard:
        raise ValueError("federation.orgs_per_env > 1 needs federation.seeds_per_client (each organisation's share)")
    skip = shard * (limit or 0)
    records = []
    for i, traj in enumerate(read_jsonl(path)):
        if limit is not None and len(records) >= limit:
            break
        if i >= skip:
            records.append(traj)
    if limit is not None and len(records) < limit:
        raise ValueError(f"{path}: holds {skip + len(records)} trajectories, the profile asks for {limit} per client"
                         + (f" for {shard + 1} organisations" if shard else ""))
    return records


#: Candidates drawn per explored task when exploration prefers unsolved tasks (`federation.explore_unsolved`).
UNSOLVED_DRAWS = 32


def explore_candidates(env: str, round: int, count: int, seed: int, client: str | None = None,
                       unsolved: bool = False) -> list[int]:
    """The round's seeded sample of the client's explore range (each organisation of an env its own): `count`
    tasks, or UNSOLVED_DRAWS times as many to choose unsolved ones from. Every task a client explores is one."""
    ids = env_class(env).explore_ids()
    rng = random.Random(f"explore-{client or env}-{seed}-{round}")
    return [ids[i] for i in rng.sample(range(len(ids)), min(len(ids), count * (UNSOLVED_DRAWS if unsolved else 1)))]


def explore_task_ids(env: str, round: int, count: int, seed: int, client: str | None = None,
                     solved: set[str] | None = None, key: Callable[[int], str] | None = None) -> list[int]:
    """The train tasks a client plays in a round: a fresh seeded sample of its explore range each round. With
    `solved` (content keys, `key` giving a task id's), the first candidates whose task the client has not yet
    solved, each task once, topped up with solved ones when too few are left."""
    if solved is None or key is None:
        return explore_candidates(env, round, count, seed, client)
    candidates = explore_candidates(env, round, count, seed, client, unsolved=True)
    chosen: list[int] = []
    taken: set[str] = set()
    for task in candidates:
        k = key(task)
        if k not in solved and k not in taken:
            chosen.append(task)
            taken.add(k)
            if len(chosen) == count:
                return chosen
    picked = set(chosen)
    return chosen + [t for t in candidates if t not in picked][:count - len(chosen)]


def solved_keys(buffer: Buffer, env: str, options: dict[str, Any] | None = None,
                ) -> tuple[set[str], Callable[[int], str]]:
    """The content keys of the env's tasks the buffer holds a success on, and the key of a task id."""
    game = make_env(env, **(options or {}))
    return {game.content_key(t.task_id) for t in buffer.records if t.success and t.env == env}, game.content_key


def explore(agent: Agent, cfg: Config, env: str, state: AdapterState, round: int, seed: int,
            advance: Callable[[int], None] | None = None, client: str | None = None,
            buffer: Buffer | None = None) -> Episodes:
    """Play this round's train tasks with the broadcast adapter at the exploration temperature (episodes keyed
    by run seed, env, round and task: fresh draws every round); the records carry the rollout's pace. With
    `federation.explore_unsolved`, tasks the client's `buffer` already holds a success on are passed over
    (and with `explore_attempts` k, each unsolved task gets k tries: best-of-k where it is needed)."""
    set_adapter_state(agent, state, origin="global adapter")
    fed = cfg.federation
    solved, key = (solved_keys(buffer, env, cfg.envs.options.get(env))
                   if fed.explore_unsolved and buffer is not None else (None, None))
    ids = explore_task_ids(env, round, fed.explore_episodes // fed.explore_attempts, seed, client, solved, key)
    return rollout(agent, env, ids, cfg.policy, evaluation=False, seed=seed, adapter_hash=state_hash(state),
                   round=round, env_options=cfg.envs.options.get(env), advance=advance,
                   passes=fed.explore_attempts)


def keep(fresh: list[Trajectory], how: Method, attempts: int = 1, pruned: bool = False,
         options: dict[str, Any] | None = None) -> list[Trajectory]:
    """The success filter, or (w/o filter) every episode; with several attempts per task, only the shortest
    success of each task (`federation.explore_attempts`); with `pruned` (`buffer.prune`), each success
    without its loops and no-op steps where a replay in the client's own environment still succeeds."""
    if how.keep_failures:
        return list(fresh)
    kept = success_filter(fresh)
    kept = shortest_per_task(kept) if attempts > 1 else kept
    return [prune(t, options) for t in kept] if pruned else kept


def task_key(cfg: Config) -> Callable[[Trajectory], str]:
    """A record's task by content (`TextEnv.content_key`, each env with its configured options): records on
    ids with the same secret, goal or maze instance are records of one task."""
    games: dict[str, Any] = {}

    def key(traj: Trajectory) -> str:
        if traj.env not in games:
            games[traj.env] = make_env(traj.env, **cfg.envs.options.get(traj.env, {}))
        return f"{traj.env}:{games[traj.env].content_key(traj.task_id)}"

    return key


def client_data(buffer: Buffer, kept: list[Trajectory], round: int, how: Method,
                seeds: list[Trajectory], options: dict[str, Any] | None = None, keep_mode: Keep = "all",
                key: Callable[[Trajectory], str] | None = None, own_cap: float | None = None,
                ) -> tuple[list[Trajectory], dict[str, Any]]:
    """Put this round's kept episodes in the buffer; return what the client trains on and the manifest.

    With history (Fed-SE) that is the whole cumulative buffer; without, only this round's new records (the
    seeds, given in the client's first round only, count as that round's data). The manifest also says how
    much of the buffer is the agent's own and how direct its new successes are against the expert's
    (`fedse.quality`). `keep_mode` and `key`: `Buffer.add` (`buffer.keep`, records keyed by task content);
    `own_cap`: `mix` (`federation.own_cap`).
    """
    added = buffer.add(seeds + kept, keep_mode, key)
    manifest = buffer.commit(round, added, experience(buffer.records, added, options))
    data = buffer.records if how.history else added
    return mix(data, own_cap), manifest


def mix(data: list[Trajectory], own_cap: float | None) -> list[Trajectory]:
    """The training set with the agent's own records capped at `own_cap` × the expert seeds in it (the newest
    own records kept), so the expert-to-own ratio is a setting rather than an accident of the counts (the
    paper: hundreds to thousands of expert trajectories per client); None = every record."""
    if own_cap is None:
        return data
    own = [t for t in data if t.policy != "expert"]
    room = int(own_cap * (len(data) - len(own)))
    kept = {id(t) for t in own[max(0, len(own) - room):]} if room else set()
    return [t for t in data if t.policy == "expert" or id(t) in kept]


def local_train(agent: Agent, cfg: Config, start: AdapterState, data: list[Trajectory], seed: int,
                advance: Callable[[int, int, float], None] | None = None) -> tuple[AdapterState, TrainStats]:
    """SFT from the broadcast adapter on the client's data; returns the new adapter (what it uploads)."""
    set_adapter_state(agent, start, origin="start adapter")
    limit = cfg.federation.max_buffer
    data = data[-limit:] if limit else data
    window = acting_window(agent, cfg.policy)
    if cfg.privacy.record.enabled:  # DP-SGD: each trajectory clipped and noised (fedse/dpsgd.py)
        stats = dpsgd.train(agent, data, cfg.learner, record_dp_plan(cfg), seed=seed, advance=advance, window=window)
    else:
        mu = cfg.aggregation.fedprox_mu if method(cfg.federation.method).federated else 0.0
        stats = train(agent, data, cfg.learner, seed=seed, advance=advance, prox_mu=mu, window=window)
    return adapter_state(agent), stats


def record_dp_plan(cfg: Config) -> dict[str, float]:
    """The organisation's record-level DP plan (fedse/privacy.py), fixed by its config before its first round;
    refused in one line when its target ε cannot be met."""
    return privacy.record_plan(cfg.privacy.record, cfg.federation.rounds, cfg.learner.steps)


def reported_dp(dp: Any) -> bool:
    """Whether a client's reported DP-SGD round is well-formed (in workers mode it crosses the boundary in the
    organisation's status): numbers in range, else it is not counted."""
    try:
        return (isinstance(dp, dict) and 0 <= float(dp["noise"]) and 0 < float(dp["sample_rate"]) <= 1
                and isinstance(dp["steps"], int) and 0 <= dp["steps"] <= 10**7 and 0 < float(dp["delta"]) < 1)
    except (KeyError, TypeError, ValueError):
        return False


def record_spent(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """(ε, δ) of each client's trajectories after the rounds recorded, from the DP-SGD steps each client
    reported per round (in workers mode each organisation sets its own `privacy.record`), so a resumed run goes
    on from its records rather than restarting the count; None when no client trained under DP-SGD."""
    histories: dict[str, list[tuple[float, float, int]]] = {}
    deltas: dict[str, float] = {}
    for record in rounds:
        for name, stats in record.get("clients", {}).items():
            dp = stats.get("privacy") if isinstance(stats, dict) else None
            if reported_dp(dp):
                histories.setdefault(name, []).append((dp["noise"], dp["sample_rate"], dp["steps"]))
                deltas[name] = max(deltas.get(name, 0.0), dp["delta"])
    return privacy.record_epsilon(histories, deltas) if histories else None


def scored_split(cfg: Config, round: int) -> Literal["test", "val"]:
    """The ids a round is scored on. The first and last rounds are the reported ones (final, final − round 0);
    with `curve_split: val` the rounds between only draw the curve, on validation tasks, so a long run pays
    for its test sets twice instead of every round."""
    fed = cfg.federation
    if fed.eval_split == "val" or round in (0, fed.rounds - 1):
        return fed.eval_split
    return fed.curve_split


def eval_task_ids(cfg: Config, env: str, round: int) -> list[int]:
    """The first N tasks of the round's split (the same ones every round that split is scored on); more of them
    after the first and last round, so the start and end of a run are measured more tightly than the curve."""
    fed = cfg.federation
    edge = round in (0, fed.rounds - 1) and fed.final_eval_episodes is not None
    cls = env_class(env)
    ids = cls.test_ids if scored_split(cfg, round) == "test" else cls.validation_ids()
    count = fed.final_eval_episodes if edge else fed.eval_episodes
    return list(ids)[:None if count == "all" else count]


def evaluate_adapter(agent: Agent, cfg: Config, state: AdapterState, env: str, seed: int, round: int,
                     advance: Callable[[int], None] | None = None) -> EnvScore:
    """Success on this round's evaluation tasks of the env (at `policy.eval_temperature`), each played
    `eval.passes` times. The episodes are keyed by (seed, env, task, pass) only, never by `round` or the
    method, so every round and every method faces the same draws: differences are the adapters'."""
    set_adapter_state(agent, state, origin="evaluated adapter")
    ids = eval_task_ids(cfg, env, round)
    played = rollout(agent, env, ids, cfg.policy, evaluation=True, seed=seed, env_options=cfg.envs.options.get(env),
                     advance=advance, passes=cfg.eval.passes)
    return score(played, played.pace.decisions, played.pace.seconds)


def client_groups(cfg: Config, how: Method) -> list[tuple[str, list[str]]]:
    """(client name, its environments): one client per environment, or one pooled client (centralized)."""
    if how.pooled and how.explore:
        raise ValueError(f"method {how.name}: a pooled client cannot explore several environments")
    if how.pooled:
        return [(POOLED, cfg.client_envs())]
    return [(name, [env_of(name)]) for name in cfg.client_names()]


def start_state(how: Method, global_state: AdapterState, own: AdapterState | None,
                initial: AdapterState) -> AdapterState:
    """Where a client's round starts: the broadcast global adapter, or (no server) its own previous one."""
    return global_state if how.federated else (own if own is not None else initial)


def client_seeds(cfg: Config, client: str, envs: list[str], round: int) -> list[Trajectory]:
    """The expert seeds enter the buffer once, in the first round the client takes part in (round 0 unless
    `federation.clients_per_round` leaves it out)."""
    if round != first_round(cfg, client):
        return []
    return [t for env in envs for t in seed_records(cfg, env, org_index(client))]


def participants(cfg: Config, round: int) -> list[str]:
    """The clients that take part in `round`, in client order: all of them, or `federation.clients_per_round`
    drawn afresh each round, seeded by (run seed, round) alone, so every method and a resumed run draw the
    same clients."""
    names = [name for name, _ in client_groups(cfg, method(cfg.federation.method))]
    k = cfg.federation.clients_per_round
    if k is None or k >= len(names):
        return names
    chosen = set(random.Random(f"participants-{cfg.seed}-{round}").sample(names, k))
    return [name for name in names if name in chosen]


def first_round(cfg: Config, client: str) -> int:
    """The first round `client` takes part in (`federation.rounds` if it never does)."""
    return next((r for r in range(cfg.federation.rounds) if client in participants(cfg, r)), cfg.federation.rounds)


def last_round(cfg: Config, client: str, up_to: int) -> int:
    """The last round ≤ `up_to` that `client` took part in (−1 if none): the state its buffer was left in."""
    return next((r for r in range(up_to, -1, -1) if client in participants(cfg, r)), -1)


def update_stats(fresh: list[Trajectory], manifest: dict[str, Any], data: list[Trajectory], stats: TrainStats,
                 state: AdapterState, upload: Upload | None = None, pace: Pace | None = None) -> dict[str, Any]:
    """Every per-client number recorded for a round (metrics.json, MLflow); `bytes_sent` is the size of the
    object the client uploaded (0 when nothing left it). `explore_decisions` / `explore_seconds` are the
    exploration's pace (`pace`, by default the one `fresh` carries when it came from `rollout`; zero when the
    client did not explore)."""
    pace = pace or getattr(fresh, "pace", None) or Pace()
    return {
        "explored": len(fresh), "explore_success": _rate(fresh), "added": manifest["added"],
        "self_share": manifest.get("self_share"), "self_added": manifest.get("self_added"),
        "length_ratio": manifest.get("length_ratio"),
        "explore_decisions": pace.decisions, "explore_seconds": pace.seconds,
        "buffer": manifest["count"], "trained_on": len(data), "successes_trained_on": successes(data),
        "steps": stats.steps, "tokens": stats.tokens, "loss_first": stats.loss_first,
        "loss_last": stats.loss_last, "train_seconds": stats.seconds,
        "bytes_sent": upload.bytes if upload else 0, "adapter_sha256": state_hash(state),
        **({"privacy": stats.privacy} if stats.privacy else {}),
        **({"upload_sha256": upload.sha256, "transfer_dtype": upload.dtype} if upload else {}),
    }


def failure(exc: BaseException) -> str:
    """A client's failure as one line for metrics.json, MLflow and the round table."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def successes(data: list[Trajectory]) -> int:
    """The weight of a client's upload under weighted averaging: successful trajectories it trained on."""
    return sum(t.success for t in data)


# ------------------------------------------------------------------ the exchange (fedse.transport)
def open_exchange(cfg: Config, folder: Path, experiment: str | None = None) -> Transport | None:
    """The run's exchange; None when no adapter travels (local, centralized, pretrained: there is no server).
    A new run's (no `experiment` given) is checked to be unused; a resumed run reopens its own."""
    how = method(cfg.federation.method)
    if not how.federated:
        return None
    transport = Transport(cfg.transport, experiment or experiment_name(cfg.transport, folder), folder)
    if experiment is None:
        transport.check_fresh([name for name, _ in client_groups(cfg, how)])
    return transport


def exchange_info(transport: Transport | None) -> dict[str, Any] | None:
    """What metrics.json says about the exchange: where the adapters went and in which dtype."""
    if transport is None:
        return None
    spec = transport.spec
    return {"backend": spec.backend, "dtype": spec.dtype, "experiment": transport.experiment, "uri": transport.uri()}


def send_update(transport: Transport, cfg: Config, folder: Path, round: int, client: str, state: AdapterState,
                weight: int, request: str | None = None, dp: dict[str, Any] | None = None) -> Upload:
    """Client side: upload the adapter, with the success count only when the server weighs by it (nothing
    leaves a client that the server does not use), and log the upload, with where it went and (`dp`: this
    round's DP-SGD, `TrainStats.privacy`) the (ε, δ) its trajectories have spent so far, in the client's egress
    log."""
    metadata = {"successes": weight} if method(cfg.federation.method).aggregation == "weighted" else {}
    upload = transport.upload(round, client, state, metadata, request)
    egress = audit.egress_dir(cfg.transport.audit_dir, folder)
    spent = upload_privacy(audit.log_path(egress, upload.experiment, upload.sender), round, dp) if dp else None
    audit.record(egress, upload, transport.destination(), spent)
    return upload


def upload_privacy(log: Path, round: int, dp: dict[str, Any]) -> dict[str, Any]:
    """The record-level (ε, δ) an upload leaves with: this round's DP-SGD steps composed with those of the
    organisation's earlier uploads of the experiment, read from its own egress log (its last line per round: a
    retried upload is one round), so the organisation counts without trusting the server's records."""
    earlier: dict[int, tuple[float, float, int]] = {}
    for entry in audit.entries(log):
        mine = (entry.get("privacy") or {}).get("record")
        if entry.get("kind") == "upload" and mine and entry["round"] < round:
            earlier[entry["round"]] = (mine["noise"], mine["sample_rate"], mine["steps"])
    step, delta = (dp["noise"], dp["sample_rate"], dp["steps"]), dp["delta"]
    return {"record": {"noise": step[0], "sample_rate": step[1], "steps": step[2], "delta": delta,
                       "round_epsilon": privacy.composed([step], delta),
                       "epsilon": privacy.composed([*earlier.values(), step], delta)}}


def weight_bound(cfg: Config, client: str, round: int) -> int:
    """The most successes a client can have trained on by round `round` (its seeds and every episode it
    explored): a declared weight above it is a lie that would let one client outweigh the rest."""
    seeds = cfg.federation.seeds_per_client
    if seeds is None:
        seeds = cfg.seed_data.counts.get(env_of(client), 0)
    return seeds + cfg.federation.explore_episodes * (round + 1)


def receive_update(transport: Transport, cfg: Config, round: int, client: str, reported: Upload | None = None,
                   ) -> tuple[str, AdapterState, int]:
    """Server side: a client's upload as downloaded and verified (signature, manifest, tensors), checked
    against what the client reported it sent (`reported`: same bytes, same round request) and with a declared
    weight within what the client can have earned (1 if none declared)."""
    state, upload = transport.fetch_client(round, client)
    if reported is not None and (upload.sha256, upload.request) != (reported.sha256, reported.request):
        raise TransportError(f"the upload of {client} round {round} (sha256 {upload.sha256[:12]}) is not the one "
                             f"it reported (sha256 {reported.sha256[:12]})")
    weight = upload.metadata.get("successes", 1)
    bound = weight_bound(cfg, client, round)
    if type(weight) is not int or not 0 <= weight <= bound:
        raise TransportError(f"the upload of {client} round {round} declares weight {weight!r}; at most {bound} "
                             "successes are possible by this round")
    return client, state, weight


def foreign_objects(transport: Transport, cfg: Config, round: int) -> dict[str, Any]:
    """Objects in this round of the exchange outside its layout (`Transport.unexpected`), for the round's
    aggregation record: the server reads none of them, and says they are there."""
    names = [name for name, _ in client_groups(cfg, method(cfg.federation.method))]
    found = transport.unexpected(round, names)
    return {"unexpected_objects": found} if found else {}


def publish(transport: Transport, how: Method, round: int, state: AdapterState) -> tuple[AdapterState, Upload]:
    """Server side: broadcast the new global adapter; returns it as the clients receive it."""
    return transport.publish_global(round, state, {"method": how.name})


def round_start(transport: Transport | None, how: Method, round: int, client: str, global_state: AdapterState,
                own: AdapterState | None, initial: AdapterState) -> AdapterState:
    """Client side: after the first round a federated client starts from the global adapter it downloads."""
    if transport is not None and round > 0:
        return transport.fetch_global(round - 1, client)
    return start_state(how, global_state, own, initial)


def global_record(digest: str, state: AdapterState, sent: Upload | None) -> dict[str, Any]:
    """What a round records of its global adapter (both drivers): its hash and size, and what the server's
    broadcast weighed on the wire when it went through the exchange."""
    return {"sha256": digest, "bytes": state_bytes(state)} | (
        {"bytes_sent": sent.bytes, "upload_sha256": sent.sha256} if sent else {})


def initial_state(cfg: Config, fresh: AdapterState) -> AdapterState:
    """Where every run starts: the freshly initialised adapter (B = 0, so exactly the base model); under
    `fedsvd` its A factors are orthonormalised first, as the server keeps them from then on."""
    if cfg.rule() == "fedsvd" and method(cfg.federation.method).federated:
        return orthonormal_init(fresh)
    return fresh


def lora_scale(cfg: Config) -> float:
    """alpha / r of the adapters the clients train (the same for every rule: `agent_spec` keeps it)."""
    lora = cfg.agent_spec().lora
    return lora.alpha / lora.r


def next_global(cfg: Config, how: Method, updates: Iterable[tuple[str, AdapterState, int]],
                global_state: AdapterState, momentum: AdapterState | None = None, round: int = 0,
                missing: dict[str, str] | None = None) -> Aggregate:
    """The server step: the uploads screened (fedse/screen.py), then the method's aggregation rule over those
    kept (weights 1, or each client's successes for `weighted`) if a quorum remains, counting `missing`
    clients (name: why) as absent; without a server the updates are only consumed (local keeps each client's
    own adapter; centralized's single client is the model)."""
    if how.federated:
        weighted = how.aggregation == "weighted"
        uploads = [(name, state, float(weight) if weighted else 1.0) for name, state, weight in updates]
        kept, rejected = screen(uploads, global_state, cfg.aggregation.max_norm_ratio)
        with_quorum(kept, rejected, missing or {}, cfg.quorum(len(uploads) + len(missing or {})), round)
        if cfg.privacy.client.enabled:
            step = private_step(cfg, kept, global_state, round)
        else:
            step = aggregate(kept, global_state, cfg.aggregation, lora_scale(cfg), momentum, rule=cfg.rule())
        step.info |= {"rejected": [{"client": r.client, "reason": r.reason} for r in rejected]} if rejected else {}
        step.info |= {"missing": dict(missing)} if missing else {}
        return step
    last = global_state
    for _, state, _ in updates:
        last = state
    return Aggregate(dict(last if how.pooled else global_state))


def client_dp_plan(cfg: Config) -> dict[str, float]:
    """The run's client-level DP plan (fedse/privacy.py), fixed by the config: refused in one line before any
    round when its target ε cannot be met."""
    return privacy.client_plan(cfg.privacy.client, cfg.federation.rounds, len(cfg.client_names()),
                               cfg.federation.clients_per_round)


def private_step(cfg: Config, kept: list[tuple[str, AdapterState, float]], global_state: AdapterState,
                 round: int) -> Aggregate:
    """The server step under client-level DP (DP-FedAvg), with the (ε, δ) spent after this round, which follows
    from the round's index alone, so a resumed run goes on counting."""
    plan = client_dp_plan(cfg)
    state, info = privacy.dp_fedavg(kept, global_state, plan, cfg.aggregation.server_lr,
                                    privacy.noise_generator(cfg.seed, round))
    spent = privacy.client_epsilon(plan, round + 1)
    return Aggregate(state, None, {"rule": "dp_fedavg", "clients": len(kept), "server_lr": cfg.aggregation.server_lr,
                                   "privacy": {"client": spent | {"sample_rate": plan["sample_rate"]} | info}})


def eval_state(how: Method, env: str, own: dict[str, AdapterState], global_state: AdapterState,
               initial: AdapterState, personal: str = "none") -> AdapterState:
    """The adapter scored on `env`: the global one; for `local` that env's own client's adapter; with
    `aggregation.personal: b`, the global A with that env's client's own B."""
    if how.train and not how.federated and not how.pooled:
        return own.get(env, initial)
    if personal == "b" and how.federated:
        return personalised(global_state, own.get(env))
    return global_state


def personal_start(cfg: Config, start: AdapterState, own: AdapterState | None) -> AdapterState:
    """Where a client acts and trains from: the broadcast adapter, or with `aggregation.personal: b` the
    broadcast A factors with its own B (what it trained last round; the broadcast B before its first)."""
    return personalised(start, own) if cfg.aggregation.personal == "b" else start


def server_round(cfg: Config, how: Method, round: int, out: Path, exchange: Transport | None,
                 updates: list[tuple[str, AdapterState, int]], delivered: dict[str, Upload | None],
                 global_state: AdapterState,
                 momentum: AdapterState | None, missing: dict[str, str],
                 save: Callable[[AdapterState, Path, dict[str, Any]], str],
                 ) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None, dict[str, Any]]:
    """The server's step of a round, whatever runs it: download and verify the `delivered` clients' uploads
    (name: the upload each reported, None when unknown) from the exchange, a client whose upload fails
    verification counting as missing with its reason (or, without a server, take `updates`); screen and
    aggregate them, publish the new global adapter, and `save` it (PEFT format) under
    `out/adapters/round_<t>`. Returns the new global adapter, its record (None when a method has no global
    adapter), the server's momentum and what the rule logged."""
    missing = dict(missing)
    received = updates
    if exchange is not None:
        received = []
        for name in delivered:  # one client's bad upload costs that client its round, not the round itself
            try:
                received.append(receive_update(exchange, cfg, round, name, delivered[name]))
            except (TransportError, ValueError) as exc:
                missing[name] = f"upload refused: {exc}"
    step = next_global(cfg, how, received, global_state, momentum, round, missing)
    if exchange is not None:
        step.info |= foreign_objects(exchange, cfg, round)
    new, sent = step.state, None
    if exchange is not None:
        new, sent = publish(exchange, how, round, new)
    if not (how.federated or how.pooled):
        return new, None, step.momentum, step.info
    folder = out / "adapters" / f"round_{round}"
    digest = save(new, folder, {"method": how.name, "round": round, "seed": cfg.seed})
    return new, global_record(digest, new, sent) | {"path": str(folder)}, step.momentum, step.info


# ------------------------------------------------------------------ the round loop, and how its clients run
@dataclass
class ClientJob:
    """One client's work in a round: its environments, and the adapter it starts from (None: the global
    adapter of the previous round, which the client downloads from the exchange itself)."""

    name: str
    envs: list[str]
    start: AdapterState | None
    own: AdapterState | None = None  # its adapter after its last round, when it keeps a part (personal b)


@dataclass
class ClientOutcome:
    """What a client's round hands back to the loop: its trained adapter (the server reads the verified
    upload from the exchange, not this), the round's numbers, its weight under weighted averaging, what it
    uploaded, and the DVC hash of its buffer version when the runner versions buffers."""

    state: AdapterState
    stats: dict[str, Any]
    weight: int
    upload: Upload | None = None
    buffer_version: str | None = None


class Runner(Protocol):
    """How the clients' work, the server step and the evaluation run: plain calls in this process
    (`InProcess`), or Prefect tasks (flows/round_loop.py). The round loop around them (`Federation`) is one."""

    model: str  # the base model's name, for metrics.json

    def initial(self) -> AdapterState: ...

    def clients(self, fed: Federation, round: int, jobs: list[ClientJob],
                ) -> Iterator[tuple[str, ClientOutcome | Exception]]: ...

    def server(self, fed: Federation, round: int, updates: list[tuple[str, AdapterState, int]],
               delivered: dict[str, Upload | None], global_state: AdapterState, momentum: AdapterState | None,
               missing: dict[str, str]) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None,
                                                 dict[str, Any]]: ...

    def evaluate(self, fed: Federation, round: int, states: dict[str, AdapterState]) -> dict[str, EnvScore]: ...


class InProcess:
    """Every step a plain call on one agent in this process, one client at a time (`fedse run`); long work
    reports to `progress`."""

    def __init__(self, agent: Agent, progress: Progress | None = None) -> None:
        self.agent, self.progress, self.model = agent, progress or Silent(), agent.name

    def initial(self) -> AdapterState:
        return adapter_state(self.agent)

    def clients(self, fed: Federation, round: int, jobs: list[ClientJob],
                ) -> Iterator[tuple[str, ClientOutcome | Exception]]:
        for job in jobs:
            try:
                yield job.name, self.client(fed, round, job)
            except Exception as exc:
                yield job.name, exc

    def client(self, fed: Federation, round: int, job: ClientJob) -> ClientOutcome:
        """One client's round: (download the global adapter,) explore, filter, buffer, train, upload."""
        how, cfg = fed.method, fed.cfg
        start = round_start(fed.exchange, how, round, job.name, job.start or {}, job.start, fed.initial)
        start = personal_start(cfg, start, job.own)
        fresh: list[Trajectory] = []
        buffer = Buffer(fed.out / "buffers" / job.name)
        if how.explore:
            bar = self.progress.start(f"round {round}: {job.name} explores", cfg.federation.explore_episodes)
            fresh = explore(self.agent, cfg, job.envs[0], start, round, cfg.seed,
                            advance=lambda n, bar=bar: self.progress.update(bar, advance=n),
                            client=job.name, buffer=buffer)
            self.progress.finish(bar)
        data, manifest = client_data(buffer,
                                     keep(fresh, how, cfg.federation.explore_attempts, cfg.buffer.prune,
                                          cfg.envs.options.get(job.envs[0])), round, how,
                                     client_seeds(cfg, job.name, job.envs, round), cfg.envs.options.get(job.envs[0]),
                                     cfg.buffer.keep, task_key(cfg), cfg.federation.own_cap)
        label = f"round {round}: {job.name} trains on {len(data)} trajectories"
        bar = self.progress.start(label, None)

        def advance(step: int, total: int, loss: float, bar: Any = bar, label: str = label) -> None:
            self.progress.update(bar, completed=step, total=total, label=f"{label} (loss {loss:.3f})")

        state, stats = local_train(self.agent, cfg, start, data, cfg.seed * 1_000 + round, advance)
        self.progress.finish(bar)
        sent = send_update(fed.exchange, cfg, fed.out, round, job.name, state, successes(data), dp=stats.privacy) \
            if fed.exchange is not None else None
        return ClientOutcome(state, update_stats(fresh, manifest, data, stats, state, sent), successes(data), sent)

    def server(self, fed: Federation, round: int, updates: list[tuple[str, AdapterState, int]],
               delivered: dict[str, Upload | None], global_state: AdapterState, momentum: AdapterState | None,
               missing: dict[str, str]) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None,
                                                 dict[str, Any]]:
        def save(state: AdapterState, folder: Path, meta: dict[str, Any]) -> str:
            set_adapter_state(self.agent, state, origin="global adapter")
            return save_adapter(self.agent, folder, meta)

        return server_round(fed.cfg, fed.method, round, fed.out, fed.exchange, updates, delivered, global_state,
                            momentum, missing, save)

    def evaluate(self, fed: Federation, round: int, states: dict[str, AdapterState]) -> dict[str, EnvScore]:
        scores = {}
        for env, state in states.items():
            bar = self.progress.start(f"round {round}: evaluating {env}",
                                      len(eval_task_ids(fed.cfg, env, round)) * fed.cfg.eval.passes)
            scores[env] = evaluate_adapter(self.agent, fed.cfg, state, env, fed.cfg.seed, round,
                                           advance=lambda n, bar=bar: self.progress.update(bar, advance=n))
            self.progress.finish(bar)
        return scores


RoundHook = Callable[[int, dict[str, Any], dict[str, Any] | None, dict[str, Upload]], None]


class Federation:
    """The round loop, written once: `cfg.federation.rounds` rounds of one method, metrics.json written after
    every round (its commit point), resumable from its folder (fedse.checkpoint). Who runs each client's work,
    the server step and the evaluation is the `runner`; `Federation(agent, cfg, out)` runs them in-process."""

    def __init__(self, agent: Agent | None, cfg: Config, out: Path, progress: Progress | None = None,
                 resume: bool = False, runner: Runner | None = None, on_round: RoundHook | None = None) -> None:
        """`resume`: continue the run in `out` instead of refusing a used folder. `on_round(round, record,
        adapter, egress)` is called after each round is committed (the flow tracks it in MLflow there)."""
        choose_kernels(cfg.model.kernels)  # the server's averaging computes on the CPU too
        if cfg.privacy.client.enabled:
            client_dp_plan(cfg)  # a target ε out of reach is refused before anything is written
        if cfg.privacy.record.enabled:
            record_dp_plan(cfg)
        if runner is None:
            if agent is None:
                raise ValueError("Federation needs an agent or a runner")
            runner = InProcess(agent, progress)
        self.runner, self.cfg, self.out, self.on_round = runner, cfg, Path(out), on_round
        config = cfg.model_dump(mode="json")
        used = self.out.exists() and any(self.out.iterdir())
        resume = resume and used  # killed before it wrote anything: nothing to resume, so it starts afresh
        if resume:
            defaults = type(cfg)().model_dump(mode="json")
            experiment = checkpoint.identity(self.out, config, defaults)["experiment"]
        elif used:
            raise ValueError(f"{self.out}: already holds a run (its buffers would be reused); choose another --out, "
                             "delete it, or continue it with --resume")
        self.method = method(cfg.federation.method)
        self.seed = cfg.seed
        self.initial = initial_state(cfg, runner.initial())
        self.momentum: AdapterState | None = None  # the server's FedAvgM buffer, carried across rounds
        self.clients = [Client(name, envs, Buffer(self.out / "buffers" / name))
                        for name, envs in client_groups(cfg, self.method)]
        self.rounds: list[dict[str, Any]] = checkpoint.completed(self.out) if resume else []
        self.missing: dict[str, str] = {}  # this round's clients that failed, and why
        self.exchange = open_exchange(cfg, self.out, experiment if resume else None)
        if not resume:
            checkpoint.begin(self.out, config, self.exchange.experiment if self.exchange else None)

    def run(self) -> dict[str, Any]:
        """All rounds (one evaluation of the base for `pretrained`), from the first one metrics.json does not
        list; returns the metrics document."""
        global_state = self.restore(len(self.rounds))
        total = self.total_rounds
        for round in range(len(self.rounds), total):
            started = time.perf_counter()
            record: dict[str, Any] = {"round": round}
            adapter, egress = None, {}
            if self.method.train:
                global_state, adapter, egress = self.round(round, global_state, record)
            self.evaluate(round, global_state, record)
            record["seconds"] = time.perf_counter() - started
            self.rounds.append(record)
            write_json(self.out / checkpoint.METRICS, self.document(complete=round == total - 1))
            if self.on_round is not None:
                self.on_round(round, record, adapter, egress)
        return self.document(complete=True)

    @property
    def keeps_own(self) -> bool:
        """Whether each client keeps a part of its adapter across rounds (`aggregation.personal: b`)."""
        return self.method.federated and self.cfg.aggregation.personal == "b"

    @property
    def total_rounds(self) -> int:
        """How many rounds the run has: `federation.rounds`, or one evaluation for a method that trains nothing."""
        return self.cfg.federation.rounds if self.method.train else 1

    def restore(self, start: int) -> AdapterState:
        """The global adapter, own adapters, momentum and buffers as they were after round `start` − 1."""
        for client in self.clients:
            if checkpoint.client_done(self.out, client.name, start) is None:
                checkpoint.rewind(client.buffer, last_round(self.cfg, client.name, start - 1))
        if start == 0:
            return self.initial
        last = start - 1
        if self.method.train and (not self.method.federated or self.keeps_own):  # each goes on from its own
            for client in self.clients:
                mine = last_round(self.cfg, client.name, last)  # its last round (partial participation)
                client.state = checkpoint.load_state(checkpoint.client_file(self.out, client.name, mine,
                                                                            ".safetensors")) if mine >= 0 else None
        if self.cfg.aggregation.momentum and self.method.federated:
            self.momentum = checkpoint.load_state(self.out / "server" / f"momentum_{last}.safetensors")
        if self.method.federated or self.method.pooled:
            return read_adapter(self.out / "adapters" / f"round_{last}")
        return self.initial

    def round(self, round: int, global_state: AdapterState, record: dict[str, Any],
              ) -> tuple[AdapterState, dict[str, Any] | None, dict[str, Upload]]:
        """Every client's work (the runner's), then the server step over those that delivered; returns the next
        global adapter, its record and what each client uploaded. A client that fails is missing from the
        round, with why (a method without a server cannot go on without it); a client that had finished this
        round before a crash is not run again."""
        how, outcomes, jobs = self.method, {}, []
        self.missing = {}
        taking_part = participants(self.cfg, round)
        if self.cfg.federation.clients_per_round is not None:
            record["participants"] = taking_part
        clients = [c for c in self.clients if c.name in taking_part]
        for client in clients:
            done = checkpoint.client_done(self.out, client.name, round)
            if done is not None:
                outcomes[client.name] = self._finished(client, round, done)
            else:
                start = None if self.exchange is not None and round > 0 else \
                    start_state(how, global_state, client.state, self.initial)
                jobs.append(ClientJob(client.name, client.envs, start, client.state if self.keeps_own else None))
        for name, got in self.runner.clients(self, round, jobs):
            if isinstance(got, Exception):
                if not how.federated:  # no server to go on without this client
                    raise got
                self.missing[name] = failure(got)
                continue
            outcomes[name] = got
            checkpoint.mark_client_done(self.out, name, round, got.stats,
                                        got.state if self.exchange is None or self.keeps_own else None)
        for client in clients:
            if client.name in outcomes:
                client.state = outcomes[client.name].state
        delivered = {c.name: outcomes[c.name].upload for c in clients if c.name in outcomes}
        updates = [(name, outcomes[name].state, outcomes[name].weight) for name in delivered] \
            if self.exchange is None else []
        new, adapter, self.momentum, info = self.runner.server(self, round, updates, delivered, global_state,
                                                               self.momentum, self.missing)
        record["clients"] = {c.name: outcomes[c.name].stats if c.name in outcomes else {"failed": self.missing[c.name]}
                             for c in clients}
        if info and "privacy" in info:  # (ε, δ) spent so far: a top-level part of the round's record
            record["privacy"] = info.pop("privacy")
        spent = record_spent([*self.rounds, record])  # every round so far, this one included
        if spent is not None:
            record.setdefault("privacy", {})["record"] = spent
        for name, why in (info or {}).get("missing", {}).items():
            if name in outcomes:  # delivered, but its upload was refused by the server
                record["clients"][name]["refused"] = why
        if info:
            record["aggregation"] = info
        if adapter is not None:
            record["global"] = {k: v for k, v in adapter.items() if k != "path"}
        versions = {name: o.buffer_version for name, o in outcomes.items() if o.buffer_version}
        if versions:
            record["buffers_dvc"] = versions
        if self.momentum is not None:
            checkpoint.save_state(self.out / "server" / f"momentum_{round}.safetensors", self.momentum)
        return new, adapter, {name: o.upload for name, o in outcomes.items() if o.upload is not None}

    def _finished(self, client: Client, round: int, stats: dict[str, Any]) -> ClientOutcome:
        """A client that finished this round before a crash: its marker's numbers, and (without a server) its
        own adapter; with one, the server reads its upload from the exchange."""
        if self.exchange is not None and not self.keeps_own:
            return ClientOutcome(client.state or self.initial, stats, stats.get("successes_trained_on", 1))
        state = checkpoint.load_state(checkpoint.client_file(self.out, client.name, round, ".safetensors"))
        return ClientOutcome(state, stats, stats["successes_trained_on"])

    def evaluate(self, round: int, global_state: AdapterState, record: dict[str, Any]) -> None:
        """The global adapter on every env; for `local`, each client's own adapter on its own env; with
        `aggregation.personal: b`, the global A with each env's client's own B."""
        own = {c.name: c.state for c in self.clients if c.state is not None}
        states = {env: eval_state(self.method, env, own, global_state, self.initial, self.cfg.aggregation.personal)
                  for env in self.cfg.client_envs()}
        record.update(summarise(self.runner.evaluate(self, round, states)), split=scored_split(self.cfg, round))

    def document(self, complete: bool) -> dict[str, Any]:
        return document(self.cfg, self.runner.model, self.rounds, complete, exchange_info(self.exchange))


def document(cfg: Config, model: str, rounds: list[dict[str, Any]], complete: bool,
             exchange: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json of a run (the same whichever driver ran it): settings, then one record per round."""
    fed = cfg.federation
    return {
        "method": fed.method, "profile": cfg.profile, "seed": cfg.seed, "complete": complete,
        "model": model, "lora_r": cfg.model.lora.r, "envs": cfg.client_envs(),
        "settings": {"rounds": fed.rounds, "explore_episodes": fed.explore_episodes,
                     "explore_attempts": fed.explore_attempts,
                     "seeds_per_client": fed.seeds_per_client, "eval_episodes": fed.eval_episodes,
                     "final_eval_episodes": fed.final_eval_episodes, "eval_split": fed.eval_split,
                     "curve_split": fed.curve_split,
                     "max_buffer": fed.max_buffer, "clients_per_round": fed.clients_per_round,
                     "explore_unsolved": fed.explore_unsolved, "own_cap": fed.own_cap,
                     "buffer": cfg.buffer.model_dump(),
                     **({"orgs_per_env": fed.orgs_per_env} if fed.orgs_per_env > 1 else {}),
                     "learner": cfg.learner.model_dump()},
        "aggregation": cfg.aggregation_info(),
        **({"exchange": exchange} if exchange else {}),
        "rounds": rounds,
    }


def _rate(trajectories: list[Trajectory]) -> float | None:
    return sum(t.success for t in trajectories) / len(trajectories) if trajectories else None
