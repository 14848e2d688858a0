"""The adapter exchange (fedse/transport.py): the local folder backend, and the S3 backend against a real
SeaweedFS server (fixture `object_store`) with per-role credentials; signed manifests, requests and statuses,
size caps, replay and path checks."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedse.signing import Keyring
from fedse.transport import (
    S3Spec,
    Transport,
    TransportError,
    TransportSpec,
    client_folder,
    client_role,
    decode,
    global_folder,
    safe_key,
    sha256,
)
from fedse.transport import digest as transport_digest
from flows.seaweed import free_ports


def adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj.lora_{ab}.weight": torch.randn(8 if ab == "A" else 32, 32 if ab == "A" else 8,
                                                                 generator=g) for i in range(2) for ab in "AB"}


def local(tmp_path: Path, **spec: object) -> Transport:
    return Transport(TransportSpec(**spec), "exp-1", tmp_path / "run")


def s3(store, experiment: str, **spec: object) -> Transport:
    s3spec = S3Spec(endpoint=store.endpoint, bucket="fedse", credentials=store.credentials)
    run = Path(tempfile.gettempdir()) / f"fedse-test-{os.getpid()}" / experiment  # its simulated keys
    return Transport(TransportSpec(backend="s3", s3=s3spec, **spec), experiment, run)


# ------------------------------------------------------------------ local folder
def folder(tmp_path: Path, round: int, sender: str) -> Path:
    top = "server" if sender == "global" else sender
    rest = f"exp-1/round_{round}/global" if sender == "global" else f"exp-1/round_{round}"
    return tmp_path / "run" / "exchange" / top / rest


def test_local_round_trip_is_exact_signed_and_laid_out_by_writer(tmp_path: Path) -> None:
    t = local(tmp_path)
    state = adapter()
    upload = t.upload(0, "maze", state, {"successes": 3})
    root = folder(tmp_path, 0, "client_maze")
    assert sorted(p.name for p in root.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert upload.sha256 == sha256((root / "adapter.safetensors").read_bytes()) and upload.bytes > 0
    manifest = json.loads((root / "adapter.json").read_text())
    assert manifest.pop("signature")["signer"] == "client_maze" and manifest == upload.to_json()
    got, seen = t.fetch_client(0, "maze")
    assert seen == upload and seen.metadata == {"successes": 3}
    assert all(torch.equal(got[k], state[k]) for k in state) and set(got) == set(state)
    published, sent = t.publish_global(0, got, {"method": "fedse"})
    assert sent.key == "server/exp-1/round_0/global/adapter.safetensors"
    assert all(torch.equal(t.fetch_global(0, "wordle")[k], published[k]) for k in state)
    assert sorted(p.name for p in (tmp_path / "run" / "keys").glob("*.key")) == ["client_maze.key", "server.key"]


def test_the_server_lists_what_lies_outside_a_rounds_layout(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(1, "maze", adapter(), {})
    assert t.unexpected(1, ["maze", "wordle"]) == []  # a client that has not uploaded is no anomaly
    (folder(tmp_path, 1, "client_maze") / "notes.txt").write_text("x")
    (folder(tmp_path, 1, "client_wordle") / "deep").mkdir(parents=True)
    (folder(tmp_path, 1, "client_wordle") / "deep" / "adapter.json").write_text("{}")
    assert t.unexpected(1, ["maze", "wordle"]) == ["client_maze/exp-1/round_1/notes.txt",
                                                   "client_wordle/exp-1/round_1/deep/adapter.json"]
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
    (folder(tmp_path, 0, "client_maze") / "adapter.json").unlink()  # died between the tensors and the manifest
    with pytest.raises(TransportError, match="no complete upload"):
        t.fetch_client(0, "maze")


def test_tensors_that_do_not_match_the_manifest_are_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(0), {})
    where = folder(tmp_path, 0, "client_maze")
    manifest = (where / "adapter.json").read_bytes()
    t.upload(0, "maze", adapter(1), {})  # a second upload cut off after its tensors, before its manifest
    (where / "adapter.json").write_bytes(manifest)
    with pytest.raises(TransportError, match="does not match its manifest"):
        t.fetch_client(0, "maze")
    blob = bytearray((where / "adapter.safetensors").read_bytes())
    blob[-1] ^= 1
    (where / "adapter.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TransportError, match="incomplete or altered"):
        t.fetch_client(0, "maze")


def test_a_manifest_signed_by_another_role_is_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(), {})
    (folder(tmp_path, 0, "client_wordle")).mkdir(parents=True)
    copied = folder(tmp_path, 0, "client_maze") / "adapter.json"
    (folder(tmp_path, 0, "client_wordle") / "adapter.json").write_bytes(copied.read_bytes())
    with pytest.raises(TransportError, match="client_maze") as refused:
        t.fetch_client(0, "wordle")
    assert "\n" not in str(refused.value)
    # maze signing a manifest of its own but placed as wordle's (a store that let it write there)
    t._send("client_maze", 0, client_folder("exp-1", 0, "wordle"), adapter(5), {}, None)
    with pytest.raises(TransportError, match="client_maze"):
        t.fetch_client(0, "wordle")
    # and as the global adapter: clients verify the broadcast as the server's
    t._send("client_maze", 0, global_folder("exp-1", 0), adapter(5), {}, None)
    with pytest.raises(TransportError, match="client_maze"):
        t.fetch_global(0, "wordle")


def test_a_forged_or_unsigned_manifest_is_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(), {"successes": 1})
    path = folder(tmp_path, 0, "client_maze") / "adapter.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc | {"metadata": {"successes": 10_000}}))  # a bigger weight, same signature
    with pytest.raises(TransportError, match="signature"):
        t.fetch_client(0, "maze")
    doc.pop("signature")
    path.write_text(json.dumps(doc))
    with pytest.raises(TransportError, match="signature"):
        t.fetch_client(0, "maze")


def test_an_old_round_replayed_into_a_new_one_is_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.upload(0, "maze", adapter(0), {})
    old, new = folder(tmp_path, 0, "client_maze"), folder(tmp_path, 1, "client_maze")
    new.mkdir(parents=True)
    for name in ("adapter.json", "adapter.safetensors"):
        (new / name).write_bytes((old / name).read_bytes())
    with pytest.raises(TransportError, match="replayed or misplaced"):
        t.fetch_client(1, "maze")


def test_oversize_objects_are_refused_unread_on_both_sides(tmp_path: Path) -> None:
    big = {"w.lora_A.weight": torch.zeros(64, 64)}  # 16 KiB of tensors
    with pytest.raises(TransportError, match=r"over transport\.max_adapter_bytes 4096"):
        local(tmp_path, max_adapter_bytes=4096).upload(0, "maze", big, {})
    local(tmp_path).upload(0, "maze", big, {})
    with pytest.raises(TransportError, match="over the 4096 allowed; refused unread"):
        local(tmp_path, max_adapter_bytes=4096).fetch_client(0, "maze")
    manifest = folder(tmp_path, 0, "client_maze") / "adapter.json"
    manifest.write_bytes(b" " * (2 << 20))
    with pytest.raises(TransportError, match="refused unread"):
        local(tmp_path).fetch_client(0, "maze")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "", "a\\..\\b"])
def test_path_traversing_keys_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="only plain names"):
        safe_key(key)
    with pytest.raises(TransportError):
        local(tmp_path).upload(0, "../../escape", adapter(), {})
    assert not (tmp_path / "escape").exists()


def test_a_keyring_that_does_not_trust_a_sender_refuses_its_upload(tmp_path: Path) -> None:
    local(tmp_path).upload(0, "maze", adapter(), {})  # signed with the run folder's simulated keys
    server_only = Keyring(tmp_path / "server-keys")
    server_only.init("server")
    t = local(tmp_path, keyring=tmp_path / "server-keys")
    with pytest.raises(TransportError, match="client_maze"):
        t.fetch_client(0, "maze")
    with pytest.raises(TransportError, match="cannot sign as client_maze"):
        t.upload(0, "maze", adapter(), {})  # the server holds no client's key: it cannot act as one


def test_requests_and_statuses_are_signed_and_verified(tmp_path: Path) -> None:
    t = local(tmp_path)
    digest = t.put_request(2, "maze", {"experiment": "exp-1", "round": 2, "client": "maze"})
    inbox = t.read_inbox("maze")
    assert inbox is not None and inbox["round"] == 2 and digest == transport_digest(inbox)  # verified, unsigned
    assert t.read_inbox("wordle") is None
    t.put_status(2, "maze", {"state": "done", "request": digest})
    assert t.get_status(2, "maze")["request"] == digest and t.get_status(2, "wordle") is None
    path = tmp_path / "run" / "exchange" / "server" / "inbox" / "client_maze" / "request.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc | {"round": 3}))
    with pytest.raises(TransportError, match="signature"):
        t.read_inbox("maze")


def test_a_used_experiment_name_and_a_bad_one_are_refused(tmp_path: Path) -> None:
    t = local(tmp_path)
    t.check_fresh(["maze"])
    t.upload(0, "maze", adapter(), {})
    with pytest.raises(TransportError, match="already holds 2 objects"):
        local(tmp_path).check_fresh(["maze", "wordle"])
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
    t.check_fresh(["maze", "wordle"])
    state = adapter()
    upload = t.upload(0, "maze", state, {"successes": 2})
    t.upload(0, "wordle", adapter(1), {})
    got, seen = t.fetch_client(0, "maze")
    assert seen == upload and all(torch.equal(got[k], state[k].to(torch.bfloat16).float()) for k in state)
    published, _ = t.publish_global(0, got, {"method": "fedse"})
    fetched = t.fetch_global(0, "wordle")
    assert all(torch.equal(fetched[k], published[k]) for k in state)
    listed = object_store.client().list_objects_v2(Bucket="fedse")["Contents"]
    keys = sorted(o["Key"] for o in listed if "/s3-roundtrip/" in o["Key"])
    assert keys == sorted(f"{folder}/adapter.{x}" for folder in (client_folder("s3-roundtrip", 0, "maze"),
                                                                 client_folder("s3-roundtrip", 0, "wordle"),
                                                                 global_folder("s3-roundtrip", 0))
                          for x in ("json", "safetensors"))
    assert t.uri() == "s3://fedse/"
    with pytest.raises(TransportError, match="already holds 6 objects"):
        s3(object_store, "s3-roundtrip").check_fresh(["maze", "wordle"])


def test_each_role_writes_its_own_folder_only_and_a_client_reads_only_the_servers(object_store) -> None:
    t = s3(object_store, "isolation")
    wordle = t.upload(0, "wordle", adapter(1), {})
    global_state, published = t.publish_global(0, adapter(2), {})
    # client maze, with its own credentials, tries to put its tensors where the server will read others'
    for where in (client_folder("isolation", 0, "wordle"), global_folder("isolation", 0)):
        with pytest.raises(TransportError) as refused:
            t._send(client_role("maze"), 0, where, adapter(9), {}, None)
        message = str(refused.value)
        assert "access denied" in message and object_store.endpoint in message and "bucket fedse" in message
        assert "\n" not in message
    raw = object_store.client(client_role("maze"))
    # stray keys: SeaweedFS's * also matches '/', which the writer-first layout makes harmless: every
    # pattern a client holds starts with its own folder
    for key in (f"{client_folder('isolation', 0, 'wordle')}/adapter.safetensors",
                f"{global_folder('isolation', 0)}/adapter.json", "server/inbox/client_wordle/request.json",
                "client_maze-2/isolation/round_0/adapter.json", "isolation/round_0/global/adapter.json",
                "client_wordle/client_maze/x", "stray.txt"):
        with pytest.raises(Exception, match="AccessDenied"):
            raw.put_object(Bucket="fedse", Key=key, Body=b"x")
        with pytest.raises(Exception, match="AccessDenied"):
            raw.delete_object(Bucket="fedse", Key=key)
    raw.put_object(Bucket="fedse", Key="client_maze/anything/deeper/x", Body=b"x")  # its own folder: allowed
    # a client reads the server's folder only: not another client's upload, not its own
    for key in (f"{client_folder('isolation', 0, 'wordle')}/adapter.safetensors",
                f"{client_folder('isolation', 0, 'maze')}/adapter.json"):
        with pytest.raises(Exception, match="AccessDenied"):
            raw.get_object(Bucket="fedse", Key=key)
    # the server cannot write a client's folder either
    with pytest.raises(TransportError, match="access denied"):
        t._send("server", 0, client_folder("isolation", 0, "wordle"), adapter(9), {}, None)
    # and what the server reads is still exactly what wordle and the server sent
    assert t.fetch_client(0, "wordle")[1] == wordle
    assert all(torch.equal(t.fetch_global(0, "maze")[k], global_state[k]) for k in global_state)
    assert published.sha256 == t._receive("server", 0, global_folder("isolation", 0), "global", "server")[1].sha256


def test_objects_outside_the_round_layout_are_reported(object_store) -> None:
    t = s3(object_store, "gap")
    t.upload(0, "maze", adapter(1), {})
    t.upload(0, "wordle", adapter(2), {})
    t.publish_global(0, adapter(3), {})
    assert t.unexpected(0, ["maze", "wordle"]) == []
    planted = f"{client_folder('gap', 0, 'maze')}/x/adapter.json"  # maze's own folder, outside the layout
    object_store.client(client_role("maze")).put_object(Bucket="fedse", Key=planted, Body=b"{}")
    assert t.unexpected(0, ["maze", "wordle"]) == [planted]
    assert t.fetch_client(0, "wordle")[1].sender == "client_wordle"  # what the server reads is unaffected


def test_s3_partial_upload_is_not_complete(object_store) -> None:
    t = s3(object_store, "partial")
    raw = object_store.client(client_role("maze"))
    raw.put_object(Bucket="fedse", Key="client_maze/partial/round_0/adapter.safetensors", Body=b"half")
    with pytest.raises(TransportError, match="no complete upload at client_maze/partial/round_0/"):
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
                       "client_maze/wrong-creds/round_0/adapter.safetensors as client_maze: credentials refused "
                       "(SignatureDoesNotMatch)")
    with pytest.raises(TransportError, match="no credentials for role client_nobody"):
        Transport(spec, "wrong-creds", tmp_path).upload(0, "nobody", adapter(), {})


def test_server_down_is_one_quick_line_naming_endpoint_and_bucket(object_store, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    spec = TransportSpec(backend="s3", s3=S3Spec(endpoint=f"http://127.0.0.1:{port}", bucket="exchange",
                                                 credentials=object_store.credentials))
    started = time.monotonic()
    with pytest.raises(TransportError) as down:
        Transport(spec, "down", tmp_path).check_fresh(["maze"])
    message = str(down.value)
    assert message.startswith(f"object store http://127.0.0.1:{port}, bucket exchange: cannot list server/down/ as "
                              "server:")
    assert "does not answer" in message and "\n" not in message
    assert time.monotonic() - started < 30


def test_s3_settings_come_from_the_environment_when_params_leave_them_null(object_store, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSE_S3_ENDPOINT", object_store.endpoint)
    monkeypatch.setenv("FEDSE_S3_BUCKET", "fedse")
    monkeypatch.setenv("FEDSE_S3_PREFIX", "team-a")
    monkeypatch.setenv("FEDSE_S3_CREDENTIALS", str(object_store.credentials))
    assert Transport(TransportSpec(backend="s3"), "from-env", tmp_path).uri() == "s3://fedse/team-a/"
    # the store's identities are scoped to its own prefix (none here): its rules refuse another team's prefix
    with pytest.raises(TransportError, match="access denied"):
        Transport(TransportSpec(backend="s3"), "from-env", tmp_path).upload(0, "maze", adapter(), {})
    monkeypatch.delenv("FEDSE_S3_PREFIX")
    t = Transport(TransportSpec(backend="s3"), "from-env", tmp_path)
    upload = t.upload(0, "maze", adapter(), {})
    head = object_store.client().head_object(Bucket="fedse", Key=upload.key)
    assert head["ContentLength"] == upload.bytes
    assert t.fetch_client(0, "maze")[1] == upload
