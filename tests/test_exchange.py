"""Runs that exchange adapters through a real S3 store (SeaweedFS, fixture `object_store`): the egress audit
(fedse/audit.py, `fedse audit`), the canary (a string planted in a client's buffer reaches neither the object
store nor MLflow), and a store that is down or refuses a client's credentials (one line, no round recorded)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse.cli import app
from fedse.seed import write_seed_file
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl
from flows.seaweed import free_ports


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    for env in ("maze", "wordle"):
        write_seed_file(env, 6, folder, seed=0)
    return folder


def s3_sets(store, seeds: Path, audit_dir: Path, credentials: Path | None = None) -> list[str]:
    return ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=6",
            "federation.explore_episodes=2", "federation.eval_episodes=2", "transport.backend=s3",
            f"transport.s3.endpoint={store.endpoint}", "transport.s3.bucket=fedse",
            f"transport.s3.credentials={credentials or store.credentials}", f"transport.audit_dir={audit_dir}"]


def run_cli(params: Path, out: Path, sets: list[str], method: str = "weighted"):
    args = ["--params", str(params), "run", "--profile", "smoke", "--method", method, "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def stored(store, bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = store.client()
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            objects[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return objects


def test_every_upload_is_logged_per_client_and_fedse_audit_prints_it(object_store, seeds: Path, micro_params: Path,
                                                                     tmp_path: Path) -> None:
    audit_dir = tmp_path / "egress"
    result = run_cli(micro_params, tmp_path / "run", s3_sets(object_store, seeds, audit_dir))
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    experiment = doc["exchange"]["experiment"]
    assert doc["exchange"] == {"backend": "s3", "dtype": "fp32", "experiment": experiment, "uri": "s3://fedse/"}
    assert sorted(p.name for p in (audit_dir / experiment).iterdir()) == ["client_maze.jsonl", "client_wordle.jsonl"]

    listing = CliRunner().invoke(app, ["--params", str(micro_params), "audit", "--dir", str(audit_dir)])
    assert listing.exit_code == 0 and experiment in listing.output
    shown = CliRunner().invoke(app, ["--params", str(micro_params), "audit", "--dir", str(audit_dir), "-e",
                                     experiment, "--json"])
    assert shown.exit_code == 0, shown.output
    entries = json.loads(shown.stdout)
    assert [(e["round"], e["sender"]) for e in entries] == [(0, "client_maze"), (0, "client_wordle"),
                                                             (1, "client_maze"), (1, "client_wordle")]
    objects = {k: v for k, v in stored(object_store, "fedse").items() if k.split("/")[1] == experiment}
    for e in entries:
        client = e["sender"].removeprefix("client_")
        stats = doc["rounds"][e["round"]]["clients"][client]
        # the log says what the store holds, and what the server weighed by is what the client sent
        manifest = json.loads(objects[e["key"].replace(".safetensors", ".json")])
        assert manifest.pop("signature")["signer"] == e["sender"]
        assert manifest == {k: v for k, v in e.items() if k not in ("destination", "time", "kind", "prev")}
        assert e["bytes"] == len(objects[e["key"]]) == stats["bytes_sent"] and e["sha256"] == stats["upload_sha256"]
        assert e["metadata"] == {"successes": stats["successes_trained_on"]} and e["dtype"] == "fp32"
        assert e["destination"] == f"{object_store.endpoint} s3://fedse/"  # the endpoint: a redirect would show
        assert all(len(s) == 2 for s in e["tensors"].values())
    table = CliRunner().invoke(app, ["--params", str(micro_params), "audit", "--dir", str(audit_dir), "-e",
                                     experiment, "--tensors"])
    assert table.exit_code == 0 and "client_wordle" in table.output and "lora_A" in table.output
    # the bucket holds adapters and their manifests only
    assert {k.rsplit("/", 1)[1] for k in objects} == {"adapter.safetensors", "adapter.json"}
    assert {k.split("/")[0] for k in objects} == {"client_maze", "client_wordle", "server"}
    # the log's hash chain: intact, and a deleted line shows
    verified = CliRunner().invoke(app, ["--params", str(micro_params), "audit", "--dir", str(audit_dir), "-e",
                                        experiment, "--verify"])
    assert verified.exit_code == 0 and "chain intact" in verified.output
    log = audit_dir / experiment / "client_maze.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[1:]) + "\n")
    broken = CliRunner().invoke(app, ["--params", str(micro_params), "audit", "--dir", str(audit_dir), "-e",
                                      experiment, "--verify"])
    assert broken.exit_code == 1 and "does not follow line 0" in broken.output


def test_a_plain_mean_sends_no_metadata(object_store, seeds: Path, micro_params: Path, tmp_path: Path) -> None:
    result = run_cli(micro_params, tmp_path / "run", [*s3_sets(object_store, seeds, tmp_path / "egress"),
                                                      "federation.rounds=1", "transport.dtype=bf16"], method="fedit")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    entries = [json.loads(line) for p in (tmp_path / "egress").glob("*/*.jsonl") for line in p.read_text().splitlines()]
    assert len(entries) == 2 and all(e["metadata"] == {} and e["dtype"] == "bf16" for e in entries)
    assert all(c["transfer_dtype"] == "bf16" for c in doc["rounds"][0]["clients"].values())


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_canary_in_a_client_buffer_reaches_neither_the_store_nor_mlflow(object_store, prefect_api, seeds: Path,
                                                                          micro_params: Path, tmp_path: Path) -> None:
    from flows.round_loop import round_loop

    canary = f"CANARY-{uuid.uuid4().hex}"
    planted = tmp_path / "seeds"
    records = list(read_jsonl(seeds / "s0" / "maze.jsonl"))  # the run below is run seed 3's: plant there
    first = records[0].model_dump()
    first["turns"][0]["observation"] += f" {canary}"
    first["instruction"] += f" {canary}"
    (planted / "s3").mkdir(parents=True)
    write_jsonl(planted / "s3" / "maze.jsonl", [Trajectory.model_validate(first | {"content_hash": ""}), *records[1:]])
    write_jsonl(planted / "s3" / "wordle.jsonl", read_jsonl(seeds / "s0" / "wordle.jsonl"))
    before = {b["Name"]: set(stored(object_store, b["Name"])) for b in object_store.client().list_buckets()["Buckets"]}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = round_loop(method="weighted", profile="smoke", seed=3, params=str(micro_params), out=str(tmp_path / "run"),
                       sets=s3_sets(object_store, planted, tmp_path / "egress"), tracking_uri=uri,
                       experiment="canary", return_state=True)
    assert state.is_completed(), state
    buffer = b"".join(p.read_bytes() for p in (tmp_path / "run" / "buffers" / "maze").rglob("*.jsonl"))
    assert canary.encode() in buffer  # planted: the client trained on it

    leaks = []
    for bucket in before:
        for key, data in stored(object_store, bucket).items():
            if canary.encode() in data or canary in key:
                leaks.append(f"s3://{bucket}/{key}")
    mlflow_files = [tmp_path / "mlflow.db", *(tmp_path / "artifacts").rglob("*")]
    leaks += [str(p) for p in mlflow_files if p.is_file() and canary.encode() in p.read_bytes()]
    leaks += [str(p) for p in (tmp_path / "egress").rglob("*") if p.is_file() and canary.encode() in p.read_bytes()]
    assert leaks == []
    new = {k for k in stored(object_store, "fedse")} - before["fedse"]
    assert len(new) == 2 * 3 * 2  # 2 rounds × (2 clients + global) × (tensors + manifest)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    rounds = [r for r in client.search_runs([client.get_experiment_by_name("canary").experiment_id])
              if "round" in r.data.tags]
    assert {r.data.tags["round"] for r in rounds} == {"0", "1"}
    for run in rounds:
        tags = run.data.tags
        assert json.loads(tags["egress.client_maze.metadata"]).keys() == {"successes"}
        listing = "".join(tags[k] for k in sorted(t for t in tags if t.startswith("egress.client_maze.tensors.")))
        assert len(json.loads(listing)) == int(tags["egress.client_maze.tensor_count"])
        assert f"{tags['egress.client_wordle.object']}" in {k for k in new}


def test_wrong_client_credentials_fail_the_run_in_one_line_and_record_no_round(object_store, seeds: Path,
                                                                              micro_params: Path,
                                                                              tmp_path: Path) -> None:
    creds = json.loads(object_store.credentials.read_text())
    creds["roles"]["client_wordle"]["secret_key"] = "not-the-secret"
    bad = tmp_path / "creds.json"
    bad.write_text(json.dumps(creds))
    result = run_cli(micro_params, tmp_path / "run", s3_sets(object_store, seeds, tmp_path / "egress", bad))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert f"object store {object_store.endpoint}, bucket fedse: cannot upload" in line
    assert "as client_wordle: credentials refused (SignatureDoesNotMatch)" in line
    assert not (tmp_path / "run" / "metrics.json").exists()  # maze's upload went through; the round did not


def test_a_store_that_is_down_fails_the_run_in_one_line(seeds: Path, micro_params: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "server")  # no credentials file: boto3's default chain
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    sets = ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=6",
            "transport.backend=s3", f"transport.s3.endpoint={endpoint}", "transport.s3.bucket=exchange"]
    result = run_cli(micro_params, tmp_path / "run", sets)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith(f"error: object store {endpoint}, bucket exchange: cannot list")
    assert "does not answer" in line and not (tmp_path / "run" / "metrics.json").exists()
