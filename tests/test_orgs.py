"""Unit tests of the organisation side of workers mode, no servers: what an organisation's directory and
process hold (flows/orgs.py), how a round request becomes the organisation's config and nothing more
(fedse/request.py, fedse/organisation.py), what its worker refuses and records (flows/client.py), and the
refusals of flows/workers.py. The round itself through real processes is tests/test_workers.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from fedse import audit
from fedse.config import ConfigError, load_config
from fedse.federation import ClientOutcome
from fedse.organisation import load
from fedse.request import RequestError, RoundRequest, agreement, apply, terms_of
from fedse.signing import Keyring
from fedse.transport import Transport, TransportSpec, Upload
from flows import orgs
from flows.client import Worker, manifest, outcome_of
from flows.workers import check


def seed_files(tmp_path: Path) -> Path:
    seeds = tmp_path / "seeds"
    for run_seed, env in (("s0", "maze"), ("s0", "wordle"), ("s1", "maze")):
        (seeds / run_seed).mkdir(parents=True, exist_ok=True)
        (seeds / run_seed / f"{env}.jsonl").write_text(f"{env} {run_seed}\n")
    return seeds


def test_an_organisation_gets_its_own_seeds_keys_and_settings(tmp_path: Path) -> None:
    seeds = seed_files(tmp_path)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"endpoint": "https://127.0.0.1:1", "roles": {
        "server": {"access_key": "s", "secret_key": "S"}, "client_maze": {"access_key": "m", "secret_key": "M"},
        "client_wordle": {"access_key": "w", "secret_key": "W"}}}))
    server = tmp_path / "server-keys"
    home = orgs.prepare(tmp_path / "orgs", "maze", seeds, keys, server_keys=server, ca_bundle=tmp_path / "ca.pem")
    copied = sorted(str(p.relative_to(home / "data" / "seed")) for p in (home / "data" / "seed").rglob("*.jsonl"))
    assert copied == ["s0/maze.jsonl", "s1/maze.jsonl"], "every run seed's draw of its own env, nothing else"
    own = json.loads((home / "s3-credentials.json").read_text())
    assert own["roles"] == {"client_maze": {"access_key": "m", "secret_key": "M"}}
    assert (home / "s3-credentials.json").stat().st_mode & 0o077 == 0 and (home / ".dvc").is_dir()
    # keys: each side holds its own private key and the other's public key, nothing else
    mine, theirs = Keyring(home / "keys").names(), Keyring(server).names()
    assert mine == {"own": ["client_maze"], "trusted": ["server"]}
    assert theirs == {"own": ["server"], "trusted": ["client_maze"]}
    settings = load(home)
    assert settings.client == "maze" and settings.store is not None
    assert settings.store.endpoint == "https://127.0.0.1:1" and settings.path(settings.keys) == home / "keys"
    with pytest.raises(FileNotFoundError, match="no expert seeds for organisation babyai"):
        orgs.prepare(tmp_path / "orgs", "babyai", seeds, keys)


def test_an_organisations_process_inherits_nothing_of_the_servers() -> None:
    base = {"PATH": "/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "server", "MLFLOW_TRACKING_URI": "http://m",
            "FEDSE_S3_CREDENTIALS": "/srv/all-keys.json", "PREFECT_HOME": "/srv/.prefect",
            "PREFECT_API_URL": "http://127.0.0.1:4200/api", "PREFECT_API_AUTH_STRING": "admin:secret"}
    env = orgs.environment(Path("/o"), "maze", base=base)
    assert env["PREFECT_HOME"] == "/o/maze/.prefect" and env["PATH"] == "/bin"
    assert not [k for k in env if k.startswith(("AWS_", "MLFLOW_", "FEDSE_"))]
    assert "PREFECT_API_URL" not in env and "PREFECT_API_AUTH_STRING" not in env  # its own ephemeral Prefect


def org(tmp_path: Path, accept: list[str] | None = None) -> tuple[Path, Path]:
    """An organisation with a local exchange folder shared with the server; returns (its folder, the server's
    keyring)."""
    server = tmp_path / "server-keys"
    home = orgs.prepare(tmp_path / "orgs", "maze", seed_files(tmp_path), None, server_keys=server,
                        exchange_dir=tmp_path / "exchange")
    if accept is not None:
        text = (home / "org.yaml").read_text() + f"accept: {json.dumps(accept)}\n"
        (home / "org.yaml").write_text(text)
    return home, server


def request(round: int = 0, client: str = "maze", **terms: object) -> RoundRequest:
    server = load_config("params.yaml", profile="smoke")
    return RoundRequest(experiment="exp-1", round=round, client=client, profile="smoke",
                        terms=terms_of(server) | terms, issued=time.time())


def test_a_request_sets_hyperparameters_and_never_where_data_goes(tmp_path: Path) -> None:
    home, _ = org(tmp_path)
    settings = load(home)
    asked = request(**{"learner.lr": 0.01, "seed": 3})
    cfg = settings.config(asked)
    assert cfg.learner.lr == 0.01 and cfg.seed == 3
    assert cfg.seed_data.dir == home / "data" / "seed" and cfg.model.cache_dir == home / ".cache" / "fedse"
    assert cfg.transport.keyring == home / "keys" and cfg.transport.dir == tmp_path / "exchange"
    assert cfg.federation.out == home / "runs"
    assert agreement(cfg) == agreement(load_config("params.yaml", profile="smoke", overrides=[
        "learner.lr=0.01", "seed=3"]))
    # what decides where data goes or what code runs is not a field, and not a term
    for term in ("transport.s3.endpoint", "transport.keyring", "model.preset", "model.cache_dir", "seed_data.dir",
                 "federation.out", "orchestration.mode", "model.models_dir"):
        with pytest.raises(ValueError, match="not a hyperparameter a round request may set"):
            request(**{term: "x"})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RoundRequest.model_validate(request().model_dump() | {"settings": {"transport": {}}})
    with pytest.raises(ValueError, match="at most 64"):
        request(**{"buffer.keep": "x" * 65})
    with pytest.raises(ConfigError, match=r"buffer\.keep"):
        settings.config(request(**{"buffer.keep": "everything"}))  # the config's own bounds apply


def test_an_organisation_can_narrow_the_terms_it_accepts(tmp_path: Path) -> None:
    home, _ = org(tmp_path, accept=["learner.*", "seed"])
    asked = RoundRequest(experiment="e", round=0, client="maze", terms={"learner.lr": 0.1, "seed": 1}, issued=0)
    assert apply(asked, load(home).accept) == ["learner.lr=0.1", "seed=1"]
    with pytest.raises(RequestError, match=r"policy\.temperature is not accepted"):
        apply(asked.model_copy(update={"terms": {"policy.temperature": 2.0}}), load(home).accept)


def post(tmp_path: Path, server: Path, doc: dict) -> Transport:
    spec = TransportSpec(dir=tmp_path / "exchange", keyring=server)
    exchange = Transport(spec, "exp-1", tmp_path / "server-run")
    exchange.put_request(doc["round"], "maze", doc)
    return exchange


def refusals(home: Path, experiment: str) -> list[dict]:
    path = home / "runs" / experiment / "egress" / experiment / "client_maze.jsonl"
    assert audit.verify(path) == []
    return [e for e in (json.loads(line) for line in path.read_text().splitlines()) if e["kind"] == "refused"]


@pytest.mark.parametrize("case", ["other client", "unknown term", "bad profile", "replay"])
def test_the_worker_refuses_in_one_line_records_it_and_answers(case: str, tmp_path: Path) -> None:
    home, server = org(tmp_path)
    worker = Worker(load(home))
    doc = request().model_dump()
    if case == "other client":
        doc["client"] = "wordle"
    elif case == "unknown term":
        doc["terms"] = {"transport.s3.endpoint": "https://attacker.example"}
    elif case == "bad profile":
        doc["profile"] = "nope"
    else:
        worker._remember(RoundRequest.model_validate(doc))
    exchange = post(tmp_path, server, doc)
    done = worker.step(worker.inbox())
    assert done is not None and done.startswith("refused")
    assert "\n" not in done
    why = {"other client": "request for client wordle", "unknown term": "not a hyperparameter",
           "bad profile": "profile 'nope' is not defined", "replay": "replay: round 0"}[case]
    assert why in done
    assert [e["reason"] for e in refusals(home, "exp-1" if case != "unknown term" else "inbox")] == [done[9:]]
    status = exchange.get_status(0, "maze")
    if case in ("other client", "replay", "unknown term"):
        assert status is None  # not this client's round, an old one, or unreadable: nothing to answer
    else:
        assert status["state"] == "refused" and why in status["reason"]
    assert worker.step(worker.inbox()) is None  # the same request is not acted on twice


def test_the_worker_never_acts_on_a_request_the_server_did_not_sign(tmp_path: Path) -> None:
    home, _ = org(tmp_path)
    impostor = tmp_path / "impostor-keys"
    Keyring(impostor).init("server")  # a key named server, but not the one the organisation trusts
    post(tmp_path, impostor, request().model_dump())
    worker = Worker(load(home))
    done = worker.step(worker.inbox())
    assert done is not None and "request not verified" in done and "server" in done
    assert not (home / "runs" / ".worker.json").exists()  # nothing was run


def test_the_status_round_trip_carries_the_upload_and_never_a_trajectory() -> None:
    upload = Upload(experiment="e", round=1, sender="client_maze", key="client_maze/e/round_1/adapter.safetensors",
                    sha256="ab" * 32, bytes=10, dtype="fp32", tensors={"a": [2, 3]}, request="cd" * 32)
    doc = manifest(ClientOutcome({"a": torch.zeros(1)}, {"buffer": 7, "loss_last": 0.5}, 3, upload,
                                 "d41d8cd98f00b204e9800998ecf8427e.dir"))
    assert set(doc) == {"weight", "buffer_version", "stats", "upload"}
    got = outcome_of(json.loads(json.dumps(doc)), "maze")
    assert got.upload == upload and got.weight == 3 and got.buffer_version == doc["buffer_version"]
    assert got.stats == {"buffer": 7, "loss_last": 0.5}


def test_workers_mode_refuses_what_it_cannot_run_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSE_KEYS", raising=False)
    with pytest.raises(ValueError, match="method local has no server"):
        check(load_config("params.yaml", profile="smoke", overrides=["federation.method=local",
                                                                      "transport.backend=s3"]))
    with pytest.raises(ValueError, match=r"use transport\.backend s3"):
        check(load_config("params.yaml", profile="smoke", overrides=["transport.backend=local"]))
    with pytest.raises(ValueError, match=r"set transport\.keyring"):
        check(load_config("params.yaml", profile="smoke", overrides=["transport.backend=s3"]))
    check(load_config("params.yaml", profile="smoke", overrides=["transport.backend=s3", "transport.keyring=/k"]))
    monkeypatch.setenv("FEDSE_KEYS", "/srv/keys")
    check(load_config("params.yaml", profile="smoke", overrides=["transport.dir=/shared/exchange"]))
