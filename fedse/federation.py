"""The Fed-SE round loop, written once; every baseline and ablation is a `Method` switch of it.

One round t (DESIGN §1):
  broadcast φ_t → each client: explore its train tasks at temperature 1.0 → success filter → cumulative
  buffer → SFT from φ_t → upload φ_k → server: φ_{t+1} = mean_k φ_k → evaluate φ_{t+1} on every test set.

Upload and broadcast go through `fedse.transport` (a folder by default, S3 when served): the server averages
exactly the adapters it downloaded and verified, and a client starts round t+1 from the global adapter it
downloaded; what each client sent is logged by `fedse.audit`.

The pieces are small functions (`explore`, `client_data`, `local_train`, `evaluate_adapter`) so that the
Prefect flow composes the very same calls as task boundaries; `Federation.run` composes them with plain
calls. All clients share one frozen base model in memory and swap adapter tensors in and out of it: the
base is the same everywhere, only φ differs, exactly as on separate machines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedse import audit, checkpoint
from fedse.aggregate import Aggregate, aggregate, orthonormal_init, state_bytes
from fedse.atomic import write_json
from fedse.buffer import Buffer, shortest_per_task, success_filter
from fedse.config import Config
from fedse.envs.registry import env_class
from fedse.evaluate import EnvScore, score, summarise
from fedse.learner import TrainStats, train
from fedse.methods import Method, method
from fedse.model import Agent, adapter_state, read_adapter, save_adapter, set_adapter_state, state_hash
from fedse.quality import experience
from fedse.rollout import Episodes, Pace, rollout
from fedse.screen import screen, with_quorum
from fedse.trajectory import Trajectory, read_jsonl
from fedse.transport import Transport, Upload, experiment_name

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
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ the steps (what the flow's tasks call)
def seed_records(cfg: Config, env: str) -> list[Trajectory]:
    """A client's expert seeds: the first `seeds_per_client` records of `<seed_data.dir>/<env>.jsonl`."""
    path = cfg.seed_data.dir / f"{env}.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: seed trajectories not found (run `fedse seed` or `dvc repro seed`)")
    limit = cfg.federation.seeds_per_client
    records = []
    for traj in read_jsonl(path):
        if limit is not None and len(records) >= limit:
            break
        records.append(traj)
    if limit is not None and len(records) < limit:
        raise ValueError(f"{path}: holds {len(records)} trajectories, the profile asks for {limit} per client")
    return records


def explore_task_ids(env: str, round: int, count: int, seed: int) -> list[int]:
    """The train tasks a client plays in a round: a fresh seeded sample of its explore range each round."""
    ids = env_class(env).explore_ids()
    rng = random.Random(f"explore-{env}-{seed}-{round}")
    return [ids[i] for i in rng.sample(range(len(ids)), count)]


def explore(agent: Agent, cfg: Config, env: str, state: AdapterState, round: int, seed: int,
            advance: Callable[[int], None] | None = None) -> Episodes:
    """Play this round's train tasks with the broadcast adapter at the exploration temperature (episodes keyed
    by run seed, env, round and task: fresh draws every round); the records carry the rollout's pace."""
    set_adapter_state(agent, state, origin="global adapter")
    fed = cfg.federation
    ids = explore_task_ids(env, round, fed.explore_episodes // fed.explore_attempts, seed)
    return rollout(agent, env, ids, cfg.policy, evaluation=False, seed=seed, adapter_hash=state_hash(state),
                   round=round, env_options=cfg.envs.options.get(env), advance=advance,
                   passes=fed.explore_attempts)


def keep(fresh: list[Trajectory], how: Method, attempts: int = 1) -> list[Trajectory]:
    """The success filter, or (w/o filter) every episode; with several attempts per task, only the shortest
    success of each task (`federation.explore_attempts`)."""
    if how.keep_failures:
        return list(fresh)
    kept = success_filter(fresh)
    return shortest_per_task(kept) if attempts > 1 else kept


def client_data(buffer: Buffer, kept: list[Trajectory], round: int, how: Method,
                seeds: list[Trajectory], options: dict[str, Any] | None = None,
                ) -> tuple[list[Trajectory], dict[str, Any]]:
    """Put this round's kept episodes in the buffer; return what the client trains on and the manifest.

    With history (Fed-SE) that is the whole cumulative buffer; without, only this round's new records (the
    seeds count as round 0's data). The manifest also says how much of the buffer is the agent's own and how
    direct its new successes are against the expert's (`fedse.quality`).
    """
    added = buffer.add((seeds if round == 0 else []) + kept)
    manifest = buffer.commit(round, added, experience(buffer.records, added, options))
    data = buffer.records if how.history else added
    return data, manifest


def local_train(agent: Agent, cfg: Config, start: AdapterState, data: list[Trajectory], seed: int,
                advance: Callable[[int, int, float], None] | None = None) -> tuple[AdapterState, TrainStats]:
    """SFT from the broadcast adapter on the client's data; returns the new adapter (what it uploads)."""
    set_adapter_state(agent, start, origin="start adapter")
    limit = cfg.federation.max_buffer
    mu = cfg.aggregation.fedprox_mu if method(cfg.federation.method).federated else 0.0
    stats = train(agent, data[-limit:] if limit else data, cfg.learner, seed=seed, advance=advance, prox_mu=mu)
    return adapter_state(agent), stats


def eval_task_ids(cfg: Config, env: str, round: int) -> list[int]:
    """The first N test tasks (the same ones every round); more of them after the first and last round, so
    the start and end of a run are measured more tightly than the curve between them."""
    fed = cfg.federation
    edge = round in (0, fed.rounds - 1) and fed.final_eval_episodes is not None
    cls = env_class(env)
    ids = cls.test_ids if fed.eval_split == "test" else cls.validation_ids()
    return list(ids)[:fed.final_eval_episodes if edge else fed.eval_episodes]


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
    names = cfg.client_envs()
    if how.pooled and how.explore:
        raise ValueError(f"method {how.name}: a pooled client cannot explore several environments")
    return [(POOLED, list(names))] if how.pooled else [(n, [n]) for n in names]


def start_state(how: Method, global_state: AdapterState, own: AdapterState | None,
                initial: AdapterState) -> AdapterState:
    """Where a client's round starts: the broadcast global adapter, or (no server) its own previous one."""
    return global_state if how.federated else (own if own is not None else initial)


def client_seeds(cfg: Config, envs: list[str], round: int) -> list[Trajectory]:
    """The expert seeds enter the buffer in round 0 only."""
    return [t for env in envs for t in seed_records(cfg, env)] if round == 0 else []


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
    if not method(cfg.federation.method).federated:
        return None
    transport = Transport(cfg.transport, experiment or experiment_name(cfg.transport, folder), folder)
    if experiment is None:
        transport.check_fresh()
    return transport


def exchange_info(transport: Transport | None) -> dict[str, Any] | None:
    """What metrics.json says about the exchange: where the adapters went and in which dtype."""
    if transport is None:
        return None
    spec = transport.spec
    return {"backend": spec.backend, "dtype": spec.dtype, "experiment": transport.experiment, "uri": transport.uri()}


def send_update(transport: Transport, cfg: Config, folder: Path, round: int, client: str, state: AdapterState,
                weight: int) -> Upload:
    """Client side: upload the adapter, with the success count only when the server weighs by it (nothing
    leaves a client that the server does not use), and log the upload in the client's egress log."""
    metadata = {"successes": weight} if method(cfg.federation.method).aggregation == "weighted" else {}
    upload = transport.upload(round, client, state, metadata)
    audit.record(audit.egress_dir(cfg.transport.audit_dir, folder), upload, transport.uri())
    return upload


def receive_update(transport: Transport, round: int, client: str) -> tuple[str, AdapterState, int]:
    """Server side: a client's upload as downloaded and verified, with the weight it sent (1 if none)."""
    state, upload = transport.fetch_client(round, client)
    return client, state, int(upload.metadata.get("successes", 1))


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
        step = aggregate(kept, global_state, cfg.aggregation, lora_scale(cfg), momentum, rule=cfg.rule())
        step.info |= {"rejected": [{"client": r.client, "reason": r.reason} for r in rejected]} if rejected else {}
        step.info |= {"missing": dict(missing)} if missing else {}
        return step
    last = global_state
    for _, state, _ in updates:
        last = state
    return Aggregate(dict(last if how.pooled else global_state))


def eval_state(how: Method, env: str, own: dict[str, AdapterState], global_state: AdapterState,
               initial: AdapterState) -> AdapterState:
    """The adapter scored on `env`: the global one, or for `local` that env's own client's adapter."""
    if how.train and not how.federated and not how.pooled:
        return own.get(env, initial)
    return global_state


# ------------------------------------------------------------------ the plain driver
class Federation:
    """Runs `cfg.federation.rounds` rounds of one method and writes `out/metrics.json` after every round."""

    def __init__(self, agent: Agent, cfg: Config, out: Path, progress: Progress | None = None,
                 resume: bool = False) -> None:
        """`resume`: continue the run in `out` (fedse.checkpoint) instead of refusing a used folder."""
        self.agent, self.cfg, self.out = agent, cfg, Path(out)
        config = cfg.model_dump(mode="json")
        used = self.out.exists() and any(self.out.iterdir())
        resume = resume and used  # killed before it wrote anything: nothing to resume, so it starts afresh
        if resume:
            experiment = checkpoint.identity(self.out, config)["experiment"]
        elif used:
            raise ValueError(f"{self.out}: already holds a run (its buffers would be reused); choose another --out, "
                             "delete it, or continue it with --resume")
        self.method = method(cfg.federation.method)
        self.progress = progress or Silent()
        self.seed = cfg.seed
        self.initial = initial_state(cfg, adapter_state(agent))
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
        total = 1 if not self.method.train else self.cfg.federation.rounds
        for round in range(len(self.rounds), total):
            started = time.perf_counter()
            record: dict[str, Any] = {"round": round}
            if self.method.train:
                global_state = self.round(round, global_state, record)
            self.evaluate(round, global_state, record)
            record["seconds"] = time.perf_counter() - started
            self.rounds.append(record)
            write_json(self.out / checkpoint.METRICS, self.document(complete=round == total - 1))
        return self.document(complete=True)

    def restore(self, start: int) -> AdapterState:
        """The global adapter, own adapters, momentum and buffers as they were after round `start` − 1."""
        for client in self.clients:
            if checkpoint.client_done(self.out, client.name, start) is None:
                checkpoint.rewind(client.buffer, start - 1)
        if start == 0:
            return self.initial
        last = start - 1
        if self.method.train and not self.method.federated:  # no server: each client goes on from its own
            for client in self.clients:
                client.state = checkpoint.load_state(checkpoint.client_file(self.out, client.name, last,
                                                                            ".safetensors"))
        if self.cfg.aggregation.momentum and self.method.federated:
            self.momentum = checkpoint.load_state(self.out / "server" / f"momentum_{last}.safetensors")
        if self.method.federated or self.method.pooled:
            return read_adapter(self.out / "adapters" / f"round_{last}")
        return self.initial

    def round(self, round: int, global_state: AdapterState, record: dict[str, Any]) -> AdapterState:
        """Every client's update, then the server step over those that arrived; returns the next global
        adapter."""
        how = self.method
        updates = list(self._client_updates(round, global_state))
        step = next_global(self.cfg, how, updates, global_state, self.momentum, round, self.missing)
        new, self.momentum = step.state, step.momentum
        if self.exchange is not None:
            step.info |= foreign_objects(self.exchange, self.cfg, round)
        record["clients"] = {c.name: dict(c.stats) for c in self.clients}
        if step.info:
            record["aggregation"] = step.info
        sent = None
        if self.exchange is not None:
            new, sent = publish(self.exchange, how, round, new)
        if how.federated or how.pooled:
            digest = save_adapter(self._with(new), self.out / "adapters" / f"round_{round}",
                                  {"method": how.name, "round": round, "seed": self.seed})
            record["global"] = global_record(digest, new, sent)
        if self.momentum is not None:
            checkpoint.save_state(self.out / "server" / f"momentum_{round}.safetensors", self.momentum)
        return new

    def _client_updates(self, round: int, global_state: AdapterState) -> Iterator[tuple[str, AdapterState, int]]:
        """Each client's round, one at a time, so the aggregator holds one upload at a time. With a server, a
        client that fails is missing from the round (`self.missing`, with why) and the others go on; the
        server then decides whether a quorum remains."""
        self.missing = {}
        for client in self.clients:
            try:
                yield self._client_round(round, client, global_state)
            except Exception as exc:
                if not self.method.federated:
                    raise
                reason = failure(exc)
                self.missing[client.name] = reason
                client.stats = {"failed": reason}

    def _client_round(self, round: int, client: Client, global_state: AdapterState,
                      ) -> tuple[str, AdapterState, int]:
        """One client's round: explore, filter, buffer, train, upload; or, when a crash interrupted the run
        after the client had finished this round, what it left (its upload, or its own adapter)."""
        how = self.method
        done = checkpoint.client_done(self.out, client.name, round)
        if done is not None:
            client.stats = done
            if self.exchange is not None:
                return receive_update(self.exchange, round, client.name)
            client.state = checkpoint.load_state(checkpoint.client_file(self.out, client.name, round,
                                                                        ".safetensors"))
            return client.name, client.state, done["successes_trained_on"]
        start = round_start(self.exchange, how, round, client.name, global_state, client.state, self.initial)
        fresh: list[Trajectory] = []
        if how.explore:
            job = self.progress.start(f"round {round}: {client.name} explores", self.cfg.federation.explore_episodes)
            fresh = explore(self.agent, self.cfg, client.envs[0], start, round, self.seed,
                            advance=lambda n, job=job: self.progress.update(job, advance=n))
            self.progress.finish(job)
        data, manifest = client_data(client.buffer, keep(fresh, how, self.cfg.federation.explore_attempts), round,
                                     how, client_seeds(self.cfg, client.envs, round),
                                     self.cfg.envs.options.get(client.envs[0]))
        label = f"round {round}: {client.name} trains on {len(data)} trajectories"
        job = self.progress.start(label, None)

        def advance(step: int, total: int, loss: float, job: Any = job, label: str = label) -> None:
            self.progress.update(job, completed=step, total=total, label=f"{label} (loss {loss:.3f})")

        state, stats = local_train(self.agent, self.cfg, start, data, self.seed * 1_000 + round, advance)
        self.progress.finish(job)
        client.state = state
        if self.exchange is None:
            client.stats = update_stats(fresh, manifest, data, stats, state)
            checkpoint.mark_client_done(self.out, client.name, round, client.stats, state)
            return client.name, state, successes(data)
        upload = send_update(self.exchange, self.cfg, self.out, round, client.name, state, successes(data))
        client.stats = update_stats(fresh, manifest, data, stats, state, upload)
        checkpoint.mark_client_done(self.out, client.name, round, client.stats)
        return receive_update(self.exchange, round, client.name)

    def evaluate(self, round: int, global_state: AdapterState, record: dict[str, Any]) -> None:
        """The global adapter on every env; for `local`, each client's own adapter on its own env."""
        own = {c.name: c.state for c in self.clients if c.state is not None}
        per_env: dict[str, EnvScore] = {}
        for env in self.cfg.client_envs():
            state = eval_state(self.method, env, own, global_state, self.initial)
            job = self.progress.start(f"round {round}: evaluating {env}",
                                      len(eval_task_ids(self.cfg, env, round)) * self.cfg.eval.passes)
            per_env[env] = evaluate_adapter(self.agent, self.cfg, state, env, self.seed, round,
                                            advance=lambda n, job=job: self.progress.update(job, advance=n))
            self.progress.finish(job)
        record.update(summarise(per_env))

    def _with(self, state: AdapterState) -> Agent:
        set_adapter_state(self.agent, state, origin="global adapter")
        return self.agent

    def document(self, complete: bool) -> dict[str, Any]:
        return document(self.cfg, self.agent.name, self.rounds, complete, exchange_info(self.exchange))


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
                     "max_buffer": fed.max_buffer, "learner": cfg.learner.model_dump()},
        "aggregation": cfg.aggregation_info(),
        **({"exchange": exchange} if exchange else {}),
        "rounds": rounds,
    }


def _rate(trajectories: list[Trajectory]) -> float | None:
    return sum(t.success for t in trajectories) / len(trajectories) if trajectories else None
