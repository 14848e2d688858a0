"""Unit tests of the organisation side of workers mode, no servers: what an organisation's directory and
process hold (flows/orgs.py), how the server's settings become its own (flows/client.py), the manifest's round
trip, and the refusals of flows/workers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedse.config import load_config
from fedse.federation import ClientOutcome
from fedse.transport import Upload
from flows import orgs
from flows.client import ORG, artifact_key, as_table, from_table, manifest, outcome_of, own_config
from flows.workers import check


def test_an_organisation_gets_its_own_seeds_and_only_its_own_keys(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    for run_seed, env in (("s0", "maze"), ("s0", "wordle"), ("s1", "maze")):
        (seeds / run_seed).mkdir(parents=True, exist_ok=True)
        (seeds / run_seed / f"{env}.jsonl").write_text(f"{env} {run_seed}\n")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"endpoint": "http://127.0.0.1:1", "roles": {
        "server": {"access_key": "s", "secret_key": "S"}, "client_maze": {"access_key": "m", "secret_key": "M"},
        "client_wordle": {"access_key": "w", "secret_key": "W"}}}))
    home = orgs.prepare(tmp_path / "orgs", "maze", seeds, keys)
    copied = sorted(str(p.relative_to(home / "data" / "seed")) for p in (home / "data" / "seed").rglob("*.jsonl"))
    assert copied == ["s0/maze.jsonl", "s1/maze.jsonl"], "every run seed's draw of its own env, nothing else"
    assert (home / "data" / "seed" / "s1" / "maze.jsonl").read_text() == "maze s1\n"
    own = json.loads((home / "s3-credentials.json").read_text())
    assert own["roles"] == {"client_maze": {"access_key": "m", "secret_key": "M"}}
    assert (home / "s3-credentials.json").stat().st_mode & 0o077 == 0 and (home / ".dvc").is_dir()
    with pytest.raises(FileNotFoundError, match="no expert seeds for organisation babyai"):
        orgs.prepare(tmp_path / "orgs", "babyai", seeds, keys)


def test_an_organisations_process_inherits_nothing_of_the_servers() -> None:
    base = {"PATH": "/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "server", "MLFLOW_TRACKING_URI": "http://m",
            "FEDSE_S3_CREDENTIALS": "/srv/all-keys.json", "PREFECT_HOME": "/srv/.prefect"}
    env = orgs.environment(Path("/o"), "maze", "http://127.0.0.1:4200/api", "http://127.0.0.1:8333", "fedse", base)
    assert env[ORG] == "maze" and env["FEDSE_S3_CREDENTIALS"] == "/o/maze/s3-credentials.json"
    assert env["PREFECT_HOME"] == "/o/maze/.prefect" and env["PATH"] == "/bin"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "MLFLOW_TRACKING_URI" not in env


def test_the_servers_settings_become_the_organisations_own(tmp_path: Path) -> None:
    server = load_config("params.yaml", profile="smoke", overrides=[
        "seed_data.dir=/srv/seeds", "transport.s3.credentials=/srv/all-keys.json", "transport.audit_dir=/srv/egress"])
    mine = own_config(json.loads(server.model_dump_json()), tmp_path)
    assert mine.seed_data.dir == tmp_path / "data" / "seed"
    assert mine.transport.s3.credentials is None and mine.transport.audit_dir is None
    assert mine.model.models_dir.is_absolute() and (mine.model.models_dir / "..").resolve() == Path.cwd()
    assert mine.learner == server.learner and mine.federation == server.federation and mine.seed == server.seed


def test_the_manifest_survives_the_artifact_table() -> None:
    upload = Upload(experiment="e", round=1, sender="client_maze", key="e/round_1/client_maze/adapter.safetensors",
                    sha256="ab" * 32, bytes=10, dtype="fp32", tensors={"a": [2, 3]})
    doc = manifest("maze", 1, "e", ClientOutcome({"a": torch.zeros(1)}, {"buffer": 7, "loss_last": 0.5}, 3, upload,
                                                  "d41d8cd98f00b204e9800998ecf8427e.dir"))
    back = from_table(as_table(doc))
    assert back == doc  # the adapter's tensors are not in it: only the upload's manifest names them
    assert set(doc) == {"client", "round", "experiment", "weight", "buffer_version", "stats", "upload"}
    got = outcome_of(back)
    assert got.upload == upload and got.weight == 3 and got.buffer_version == doc["buffer_version"]
    assert got.stats == {"buffer": 7, "loss_last": 0.5}
    assert artifact_key("Fed_SE.run-1", "maze", 2) == "fedse-manifest-fed-se-run-1-maze-round-2"


def test_workers_mode_refuses_what_it_cannot_run_in_one_line() -> None:
    with pytest.raises(ValueError, match="method local has no server"):
        check(load_config("params.yaml", profile="smoke", overrides=["federation.method=local",
                                                                      "transport.backend=s3"]))
    with pytest.raises(ValueError, match=r"use transport\.backend s3"):
        check(load_config("params.yaml", profile="smoke", overrides=["transport.backend=local"]))
    check(load_config("params.yaml", profile="smoke", overrides=["transport.backend=s3"]))
    check(load_config("params.yaml", profile="smoke", overrides=["transport.dir=/shared/exchange"]))
