"""Fault injection (bench/faults.py) into real runs of the micro model: each fault is survived, no buffer
record is lost, and a resumed run ends bit for bit where the undisturbed one does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from faults import (  # noqa: E402
    CLIENTS,
    Bench,
    bad_params,
    client_raises,
    corrupt_buffer,
    kill,
    store_down,
    upload_fault,
)

from fedse.cli import app  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, micro_spec) -> Bench:
    root = tmp_path_factory.mktemp("faults")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = json.loads(micro_spec.model_dump_json())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    seeds = root / "seeds"
    envs = [arg for env in CLIENTS for arg in ("--env", env)]
    result = CliRunner().invoke(app, ["seed", "--out", str(seeds), *envs, "--count", "6"])
    assert result.exit_code == 0, result.output
    sets = [f"seed_data.dir={seeds}", "federation.seeds_per_client=6", "federation.explore_episodes=2",
            "federation.eval_episodes=2"]
    made = Bench(str(root / "params.yaml"), sets, root, seed=0)
    made.run_clean()
    assert made.clean["complete"] and made.clean["sha"]
    return made


def clean_row(row: dict, identical: bool | None = None) -> None:
    assert row["survived"], row
    assert row["records_lost"] == 0, row
    assert row["identical_to_clean"] is identical, row


@pytest.mark.parametrize("fraction", [0.1, 0.45, 0.8])
def test_kill_9_of_the_driver_then_resume_ends_as_the_undisturbed_run(bench: Bench, fraction: float) -> None:
    clean_row(kill(bench, fraction, int(fraction * 100)), identical=True)


def test_kill_9_of_the_flow_then_its_resume_parameter_ends_as_the_undisturbed_flow_run(bench: Bench) -> None:
    """The Prefect flow's whole process group (its temporary API, its task workers) killed mid-run."""
    clean_row(kill(bench, 0.6, 60, flow=True), identical=True)


def test_the_object_store_going_down_mid_round_is_one_line_and_resume_finishes_identically(bench: Bench) -> None:
    row = store_down(bench)
    clean_row(row, identical=True)
    did = row["what_the_run_did"]  # the line names the endpoint, the bucket and the key it could not write
    assert "object store https://127.0.0.1:" in did and "bucket fedse" in did and "store-down/round_1/" in did


@pytest.mark.parametrize("kind", ["nan", "shape", "scale", "flip"])
def test_a_bad_upload_is_screened_out_and_the_round_goes_on(bench: Bench, kind: str) -> None:
    row = upload_fault(bench, kind)
    clean_row(row)
    assert row["what_the_run_did"].startswith("textcraft rejected in 2 of 2 rounds")


def test_without_screening_a_scaled_upload_is_averaged_in(bench: Bench) -> None:
    row = upload_fault(bench, "scale", screening=False)
    assert row["survived"] and row["what_the_run_did"] == "accepted every upload"


def test_a_client_that_raises_is_missing_and_the_quorum_carries_the_round(bench: Bench) -> None:
    clean_row(client_raises(bench))


def test_a_corrupt_buffer_is_refused_in_one_line_and_left_as_it_was(bench: Bench) -> None:
    row = corrupt_buffer(bench)
    assert row["survived"] and "buffer.jsonl" in row["what_the_run_did"] and "left as is" in row["what_the_run_did"]


def test_a_bad_params_value_writes_nothing(bench: Bench) -> None:
    clean_row(bad_params(bench))
