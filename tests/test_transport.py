"""The adapter exchange (fedse/transport.py): the local folder backend, and the S3 backend against a real
SeaweedFS server (fixture `object_store`) with per-role credentials."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from fedse.transport import S3Spec, Transport, TransportError, TransportSpec, client_role, decode, sha256
from flows.seaweed import free_ports


def adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj.lora_{ab}.weight": torch.randn(8 if ab == "A" else 32, 32 if ab == "A" else 8,
                                                                 generator=g) for i in range(2) for ab in "AB"}


def local(tmp_path: Path, **spec: object) -> Transport:
    return Transport(TransportSpec(**spec), "exp-1", tmp_path / "run")


def s3(store, experiment: str, **spec: object) -> Transport:
    s3spec = S3Spec(endpoint=store.endpoint, bucket="fedse", credentials=store.credentials)
    return Transport(TransportSpec(backend="s3", s3=s3spec, **spec), experiment, Path("unused"))


# ------------------------------------------------------------------ local folder
def test_local_round_trip_is_exact_and_laid_out_per_round_and_sender(tmp_path: Path) -> None:
    t = local(tmp_path)
    state = adapter()
    upload = t.upload(0, "maze", state, {"successes": 3})
    root = tmp_path / "run" / "exchange" / "exp-1" / "round_0" / "client_maze"
    assert sorted(p.name for p in root.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert upload.sha256 == sha256((root / "adapter.safetensors").read_bytes()) and upload.bytes > 0
    assert json.loads((root / "adapter.json").read_text()) == upload.to_json()
    got, seen = t.fetch_client(0, "maze")
    assert seen == upload and seen.metadata == {"successes": 3}
    assert all(torch.equal(got[k], state[k]) for k in state) and set(got) == set(state)
    published, _ = t.publish_global(0, got, {"method": "fedse"})
    assert all(torch.equal(t.fetch_global(0, "wordle")[k], published[k]) for k in state)


def test_the_server_lists_what_lies_outside_a_rounds_layout(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(1, "maze", adapter(), {})
    base = tmp_path / "run" / "exchange" / "exp-1" / "round_1"
    assert t.unexpected(1, ["maze", "wordle"]) == []  # a client that has not uploaded is no anomaly
    (base / "client_maze" / "notes.txt").write_text("x")
    (base / "client_wordle" / "deep" / "round_1").mkdir(parents=True)
    (base / "client_wordle" / "deep" / "round_1" / "adapter.json").write_text("{}")
    assert t.unexpected(1, ["maze", "wordle"]) == ["exp-1/round_1/client_maze/notes.txt",
                                                   "exp-1/round_1/client_wordle/deep/round_1/adapter.json"]
    assert t.unexpected(0, ["maze", "wordle"]) == []


def test_bf16_halves_the_tensor_bytes_and_comes_back_as_fp32(tmp_path: Path) -> None:
    state = adapter()
    full = local(tmp_path / "a").upload(0, "maze", state, {})
    t = local(tmp_path / "b", dtype="bf16")
    half = t.upload(0, "maze", state, {})
    payload = sum(v.numel() for v in state.values()) * 4
    assert half.dtype == "bf16" and full.bytes - half.bytes == payload // 2
    got, _ = t.fetch_client(0, "maze")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all(torch.equal(got[k], state[k].to(torch.bfloat16).float()) for k in state)
    published, _ = t.publish_global(0, got, {})
    assert all(torch.equal(published[k], got[k]) for k in got)  # already representable: unchanged


def test_an_upload_without_its_manifest_is_never_read_as_complete(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(), {})
    folder = tmp_path / "run" / "exchange" / "exp-1" / "round_0" / "client_maze"
    (folder / "adapter.json").unlink()  # the sender died between the tensors and the manifest
    with pytest.raises(TransportError, match="no complete upload"):
        t.fetch_client(0, "maze")


def test_tensors_that_do_not_match_the_manifest_are_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(0), {})
    folder = tmp_path / "run" / "exchange" / "exp-1" / "round_0" / "client_maze"
    manifest = (folder / "adapter.json").read_bytes()
    t.upload(0, "maze", adapter(1), {})  # a second upload cut off after its tensors, before its manifest
    (folder / "adapter.json").write_bytes(manifest)
    with pytest.raises(TransportError, match="does not match its manifest"):
        t.fetch_client(0, "maze")
    blob = bytearray((folder / "adapter.safetensors").read_bytes())
    blob[-1] ^= 1
    (folder / "adapter.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TransportError, match="incomplete or altered"):
        t.fetch_client(0, "maze")


def test_a_manifest_for_another_sender_is_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(), {})
    base = tmp_path / "run" / "exchange" / "exp-1" / "round_0"
    (base / "client_wordle").mkdir()
    (base / "client_wordle" / "adapter.json").write_bytes((base / "client_maze" / "adapter.json").read_bytes())
    with pytest.raises(TransportError, match="describes exp-1 round 0 client_maze"):
        t.fetch_client(0, "wordle")


def test_a_used_experiment_name_and_a_bad_one_are_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.check_fresh()
    t.upload(0, "maze", adapter(), {})
    with pytest.raises(TransportError, match="already holds 2 objects"):
        local(tmp_path).check_fresh()
    with pytest.raises(TransportError, match="experiment name"):
        Transport(TransportSpec(), "a/b", tmp_path)


def test_decode_checks_dtype_against_the_manifest(tmp_path: Path) -> None:
    t = local(tmp_path, dtype="fp16")
    upload = t.upload(0, "maze", adapter(), {})
    data = (tmp_path / "run" / "exchange" / upload.key).read_bytes()
    with pytest.raises(TransportError, match="manifest says bf16"):
        decode(data, upload.__class__(**(upload.to_json() | {"dtype": "bf16"})), upload.key)


# ------------------------------------------------------------------ S3 (SeaweedFS)
def test_s3_round_trip_with_each_role_acting_on_its_own_keys(object_store) -> None:
    t = s3(object_store, "s3-roundtrip", dtype="bf16")
    t.check_fresh()
    state = adapter()
    upload = t.upload(0, "maze", state, {"successes": 2})
    t.upload(0, "wordle", adapter(1), {})
    got, seen = t.fetch_client(0, "maze")
    assert seen == upload and all(torch.equal(got[k], state[k].to(torch.bfloat16).float()) for k in state)
    published, _ = t.publish_global(0, got, {"method": "fedse"})
    fetched = t.fetch_global(0, "wordle")
    assert all(torch.equal(fetched[k], published[k]) for k in state)
    keys = sorted(o["Key"] for o in object_store.client().list_objects_v2(Bucket="fedse",
                                                                            Prefix="s3-roundtrip/")["Contents"])
    assert keys == [f"s3-roundtrip/round_0/{s}/adapter.{x}" for s in ("client_maze", "client_wordle", "global")
                    for x in ("json", "safetensors")]
    assert t.uri() == "s3://fedse/s3-roundtrip"
    with pytest.raises(TransportError, match="already holds 6 objects"):
        s3(object_store, "s3-roundtrip").check_fresh()


def test_a_client_cannot_overwrite_another_clients_adapter_or_the_global_one(object_store) -> None:
    t = s3(object_store, "isolation")
    wordle = t.upload(0, "wordle", adapter(1), {})
    global_state, published = t.publish_global(0, adapter(2), {})
    # client maze, with its own credentials, tries to put its tensors where the server will read others'
    for sender in (client_role("wordle"), "global"):
        with pytest.raises(TransportError) as refused:
            t._send(client_role("maze"), 0, sender, adapter(9), {})
        message = str(refused.value)
        assert "access denied" in message and object_store.endpoint in message and "bucket fedse" in message
        assert "\n" not in message
    raw = object_store.client(client_role("maze"))
    for key in ("isolation/round_0/client_wordle/adapter.safetensors", "isolation/round_0/global/adapter.json"):
        with pytest.raises(Exception, match="AccessDenied"):
            raw.put_object(Bucket="fedse", Key=key, Body=b"x")
        with pytest.raises(Exception, match="AccessDenied"):
            raw.delete_object(Bucket="fedse", Key=key)
    # a client reads the global prefix only: not another client's upload, not its own
    for key in ("isolation/round_0/client_wordle/adapter.safetensors", "isolation/round_0/client_maze/adapter.json"):
        with pytest.raises(Exception, match="AccessDenied"):
            raw.get_object(Bucket="fedse", Key=key)
    # the server cannot write a client's prefix either
    with pytest.raises(TransportError, match="access denied"):
        t._send("server", 0, client_role("wordle"), adapter(9), {})
    # and what the server reads is still exactly what wordle and the server sent
    assert t.fetch_client(0, "wordle")[1] == wordle
    assert all(torch.equal(t.fetch_global(0, "maze")[k], global_state[k]) for k in global_state)
    assert published.sha256 == t._receive("server", 0, "global")[1].sha256


def test_objects_outside_the_round_layout_are_reported_whoever_could_write_them(object_store) -> None:
    t = s3(object_store, "gap")
    t.upload(0, "maze", adapter(1), {})
    t.upload(0, "wordle", adapter(2), {})
    t.publish_global(0, adapter(3), {})
    assert t.unexpected(0, ["maze", "wordle"]) == []
    # client maze's write pattern round_*/client_maze/* : SeaweedFS's * also matches '/', so it may reach
    # into wordle's folder at a deeper path; either the store refuses, or the server sees and reports it
    planted = "gap/round_0/client_wordle/x/round_0/client_maze/adapter.json"
    try:
        object_store.client(client_role("maze")).put_object(Bucket="fedse", Key=planted, Body=b"{}")
        landed = True
    except Exception as exc:
        assert "AccessDenied" in str(exc)
        landed = False
    assert t.unexpected(0, ["maze", "wordle"]) == ([planted] if landed else [])
    assert t.fetch_client(0, "wordle")[1].sender == "client_wordle"  # what the server reads is unaffected


def test_s3_partial_upload_is_not_complete(object_store) -> None:
    t = s3(object_store, "partial")
    raw = object_store.client(client_role("maze"))
    raw.put_object(Bucket="fedse", Key="partial/round_0/client_maze/adapter.safetensors", Body=b"half")
    with pytest.raises(TransportError, match="no complete upload at partial/round_0/client_maze/"):
        t.fetch_client(0, "maze")


def test_wrong_credentials_are_one_line_naming_endpoint_and_bucket(object_store, tmp_path: Path) -> None:
    creds = json.loads(object_store.credentials.read_text())
    creds["roles"]["client_maze"]["secret_key"] = "not-the-secret"
    bad = tmp_path / "creds.json"
    bad.write_text(json.dumps(creds))
    spec = TransportSpec(backend="s3", s3=S3Spec(endpoint=object_store.endpoint, bucket="fedse", credentials=bad))
    with pytest.raises(TransportError) as refused:
        Transport(spec, "wrong-creds", tmp_path).upload(0, "maze", adapter(), {})
    message = str(refused.value)
    assert message == (f"object store {object_store.endpoint}, bucket fedse: cannot upload "
                       "wrong-creds/round_0/client_maze/adapter.safetensors as client_maze: credentials refused "
                       "(SignatureDoesNotMatch)")
    with pytest.raises(TransportError, match="no credentials for role client_nobody"):
        Transport(spec, "wrong-creds", tmp_path).upload(0, "nobody", adapter(), {})


def test_server_down_is_one_quick_line_naming_endpoint_and_bucket(object_store, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    spec = TransportSpec(backend="s3", s3=S3Spec(endpoint=f"http://127.0.0.1:{port}", bucket="exchange",
                                                 credentials=object_store.credentials))
    started = time.monotonic()
    with pytest.raises(TransportError) as down:
        Transport(spec, "down", tmp_path).check_fresh()
    message = str(down.value)
    assert message.startswith(f"object store http://127.0.0.1:{port}, bucket exchange: cannot list down/ as server:")
    assert "does not answer" in message and "\n" not in message
    assert time.monotonic() - started < 30


def test_s3_settings_come_from_the_environment_when_params_leave_them_null(object_store, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSE_S3_ENDPOINT", object_store.endpoint)
    monkeypatch.setenv("FEDSE_S3_BUCKET", "fedse")
    monkeypatch.setenv("FEDSE_S3_PREFIX", "team-a")
    monkeypatch.setenv("FEDSE_S3_CREDENTIALS", str(object_store.credentials))
    t = Transport(TransportSpec(backend="s3"), "from-env", tmp_path)
    assert t.uri() == "s3://fedse/team-a/from-env"
    upload = t.upload(0, "maze", adapter(), {})
    head = object_store.client().head_object(Bucket="fedse", Key=f"team-a/{upload.key}")
    assert head["ContentLength"] == upload.bytes
    assert t.fetch_client(0, "maze")[1] == upload
