"""Ed25519 signing of exchanged manifests (fedse/signing.py) and the `fedse keys` commands."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedse.cli import app
from fedse.signing import Keyring, SigningError, canonical, sign_doc, verify_doc

runner = CliRunner()
PAYLOAD = b'{"adapter":"round-3","sha256":"ab12"}'


@pytest.fixture
def ring(tmp_path: Path) -> Keyring:
    return Keyring(tmp_path / "keys")


def pair(tmp_path: Path) -> tuple[Keyring, Keyring]:
    """A server keyring and a client keyring that trusts the server's public key."""
    server, client = Keyring(tmp_path / "server"), Keyring(tmp_path / "client")
    server.init("server")
    client.trust("server", server.public_hex("server"))
    return server, client


def one_line(exc: pytest.ExceptionInfo[SigningError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------ keys and raw signatures
def test_canonical_ignores_key_order() -> None:
    assert canonical({"b": 1, "a": "é"}) == canonical({"a": "é", "b": 1}) == b'{"a":"\\u00e9","b":1}'


def test_sign_verify_round_trip(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    sig = server.sign("server", PAYLOAD)
    server.verify("server", PAYLOAD, sig)  # with its own key
    client.verify("server", PAYLOAD, sig)  # with the trusted copy
    assert server.fingerprint("server") == client.fingerprint("server")
    assert len(server.fingerprint("server")) == 16


def test_tampered_payload_is_refused(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    sig = server.sign("server", PAYLOAD)
    with pytest.raises(SigningError, match="bad signature from 'server'") as exc:
        client.verify("server", PAYLOAD.replace(b"round-3", b"round-4"), sig)
    one_line(exc)


def test_signature_by_another_key_is_refused(ring: Keyring) -> None:
    ring.init("server")
    ring.init("client_maze")
    sig = ring.sign("client_maze", PAYLOAD)
    with pytest.raises(SigningError, match="bad signature from 'server'"):
        ring.verify("server", PAYLOAD, sig)


@pytest.mark.parametrize("signature", ["not base64!!", "", "AAAA"])
def test_malformed_signatures_are_refused(ring: Keyring, signature: str) -> None:
    ring.init("server")
    with pytest.raises(SigningError, match="'server'") as exc:
        ring.verify("server", PAYLOAD, signature)
    one_line(exc)


def test_unknown_signer_is_refused(ring: Keyring) -> None:
    ring.init("server")
    with pytest.raises(SigningError, match="unknown signer 'client_maze'") as exc:
        ring.verify("client_maze", PAYLOAD, ring.sign("server", PAYLOAD))
    one_line(exc)
    with pytest.raises(SigningError, match="no private key for signer 'client_maze'"):
        ring.sign("client_maze", PAYLOAD)


def test_private_key_is_0600_and_folder_0700(ring: Keyring) -> None:
    ring.init("client_maze")
    assert stat.S_IMODE(os.stat(ring.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ring.root / "client_maze.key").st_mode) == 0o600
    assert ring.has("client_maze") and not ring.has("server")
    pub = (ring.root / "client_maze.pub").read_text()
    assert pub == ring.public_hex("client_maze") + "\n" and len(pub.strip()) == 64
    assert b"PRIVATE KEY" in (ring.root / "client_maze.key").read_bytes()


def test_init_twice_keeps_the_key(ring: Keyring) -> None:
    first = ring.init("server")
    key = (ring.root / "server.key").read_bytes()
    sig = ring.sign("server", PAYLOAD)
    assert ring.init("server") == first
    assert (ring.root / "server.key").read_bytes() == key
    ring.verify("server", PAYLOAD, sig)


def test_rotate_retires_the_old_pair(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    old_sig = server.sign("server", PAYLOAD)
    old_fp, new_fp = server.rotate("server")
    assert old_fp != new_fp == server.fingerprint("server")
    assert (server.root / "retired" / f"server-{old_fp}.key").is_file()
    assert (server.root / "retired" / f"server-{old_fp}.pub").read_text().strip() != server.public_hex("server")
    assert stat.S_IMODE(os.stat(server.root / "retired" / f"server-{old_fp}.key").st_mode) == 0o600
    with pytest.raises(SigningError, match="bad signature"):
        server.verify("server", PAYLOAD, old_sig)
    client.verify("server", PAYLOAD, old_sig)  # the client still holds the old key until it re-trusts
    with pytest.raises(SigningError, match="bad signature"):
        client.verify("server", PAYLOAD, server.sign("server", PAYLOAD))
    with pytest.raises(SigningError, match="no private key"):
        server.rotate("client_maze")


@pytest.mark.parametrize("bad", ["zz" * 32, "ab" * 31, "ab" * 33, "", "0x" + "ab" * 32])
def test_trust_refuses_bad_hex(ring: Keyring, bad: str) -> None:
    with pytest.raises(SigningError, match="not an Ed25519 public key") as exc:
        ring.trust("server", bad)
    one_line(exc)
    assert not (ring.root / "trusted" / "server.pub").exists()


def test_trust_does_not_silently_replace_a_key(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    fp = client.fingerprint("server")
    assert client.trust("server", server.public_hex("server")) == fp  # the same key again: fine
    _, new_fp = server.rotate("server")
    with pytest.raises(SigningError, match=f"already trusts key {fp}.*not {new_fp}") as exc:
        client.trust("server", server.public_hex("server"))
    one_line(exc)
    assert client.fingerprint("server") == fp
    assert client.trust("server", server.public_hex("server"), replace=True) == new_fp
    client.verify("server", PAYLOAD, server.sign("server", PAYLOAD))
    assert client.names() == {"own": [], "trusted": ["server"]}


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "Server", "", "x" * 65, "a b", "a\nb"])
def test_path_traversal_and_bad_names_are_refused(ring: Keyring, name: str) -> None:
    for call in (lambda: ring.init(name), lambda: ring.trust(name, "ab" * 32), lambda: ring.sign(name, b""),
                 lambda: ring.verify(name, b"", "AAAA"), lambda: ring.fingerprint(name), lambda: ring.rotate(name),
                 lambda: verify_doc(ring, {}, name)):
        with pytest.raises(SigningError, match="bad signer name") as exc:
            call()
        one_line(exc)
    assert not ring.root.exists()


def test_corrupt_key_files_are_named(ring: Keyring) -> None:
    ring.init("server")
    (ring.root / "server.key").write_text("garbage")
    with pytest.raises(SigningError, match=r"corrupt private key file .*server\.key"):
        ring.sign("server", PAYLOAD)
    (ring.root / "trusted").mkdir()
    (ring.root / "trusted" / "client_maze.pub").write_text("nothex\n")
    with pytest.raises(SigningError, match=r"corrupt public key file .*client_maze\.pub"):
        ring.fingerprint("client_maze")


def test_names_lists_own_and_trusted(tmp_path: Path) -> None:
    _, client = pair(tmp_path)
    client.init("client_maze-2")
    client.init("client_maze")
    assert client.names() == {"own": ["client_maze", "client_maze-2"], "trusted": ["server"]}
    assert Keyring(tmp_path / "absent").names() == {"own": [], "trusted": []}


# ------------------------------------------------------------------ signed documents
def test_sign_doc_and_verify_doc(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    doc = {"round": 3, "adapter": "global/round-3", "sha256": "ab12"}
    signed = sign_doc(server, "server", doc)
    assert signed["signature"]["signer"] == "server"
    assert signed["signature"]["key"] == server.fingerprint("server")
    assert verify_doc(client, json.loads(json.dumps(signed)), "server") == doc
    assert verify_doc(client, sign_doc(server, "server", signed), "server") == doc  # re-signing replaces

    tampered = signed | {"round": 4}
    with pytest.raises(SigningError, match="bad signature from 'server'"):
        verify_doc(client, tampered, "server")
    with pytest.raises(SigningError, match="not signed"):
        verify_doc(client, doc, "server")
    with pytest.raises(SigningError, match="malformed signature"):
        verify_doc(client, doc | {"signature": "x"}, "server")


def test_verify_doc_refuses_the_wrong_signer(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    client.init("client_maze")
    server.trust("client_maze", client.public_hex("client_maze"))
    signed = sign_doc(client, "client_maze", {"round": 1})
    with pytest.raises(SigningError, match="signed by 'client_maze', expected 'server'") as exc:
        verify_doc(server, signed, "server")
    one_line(exc)
    forged = signed | {"signature": signed["signature"] | {"signer": "server"}}
    with pytest.raises(SigningError):  # claiming another signer does not help
        verify_doc(server, forged, "server")
    with pytest.raises(SigningError, match="unknown signer 'client_wordle'"):
        verify_doc(server, sign_doc(client, "client_maze", {}) | {"signature": {
            "signer": "client_wordle", "key": "0" * 16, "ed25519": "AAAA"}}, "client_wordle")


def test_verify_doc_names_both_fingerprints_after_rotation(tmp_path: Path) -> None:
    server, client = pair(tmp_path)
    old_fp, new_fp = server.rotate("server")
    signed = sign_doc(server, "server", {"round": 1})
    with pytest.raises(SigningError) as exc:
        verify_doc(client, signed, "server")
    text = one_line(exc)
    assert f"signed with key {new_fp}, trusted key is {old_fp}" in text and "fedse keys trust" in text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.text(max_size=12).filter(lambda k: k != "signature"),
                           st.one_of(st.integers(), st.text(max_size=20)), max_size=8))
def test_any_signed_dict_verifies_to_itself(ring: Keyring, doc: dict[str, int | str]) -> None:
    ring.init("server")
    signed = json.loads(json.dumps(sign_doc(ring, "server", doc)))
    assert verify_doc(ring, signed, "server") == doc


# ------------------------------------------------------------------ the CLI
def keys(*args: str):
    return runner.invoke(app, ["keys", *args])


def test_cli_init_show_trust_rotate(tmp_path: Path) -> None:
    server_dir, client_dir = str(tmp_path / "server"), str(tmp_path / "client")
    result = keys("init", "server", "--dir", server_dir)
    assert result.exit_code == 0, result.output
    ring = Keyring(Path(server_dir))
    public, fp = ring.public_hex("server"), ring.fingerprint("server")
    assert fp in result.stdout and public in result.stdout and "PRIVATE" not in result.stdout

    result = keys("trust", "server", str(Path(server_dir) / "server.pub"), "--dir", client_dir)  # from the file
    assert result.exit_code == 0, result.output
    assert fp in result.stdout
    assert keys("trust", "server", public, "--dir", client_dir).exit_code == 0  # from the hex, same key

    result = keys("show", "--dir", client_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"dir": client_dir, "own": [],
                                         "trusted": [{"name": "server", "fingerprint": fp, "public": public}]}
    result = keys("show", "--dir", server_dir)
    assert result.exit_code == 0 and "server" in result.stdout and fp in result.stdout

    result = keys("rotate", "server", "--dir", server_dir)
    assert result.exit_code == 0, result.output
    new_fp = ring.fingerprint("server")
    assert fp in result.stdout and new_fp in result.stdout and "fedse keys trust" in result.stdout

    result = keys("trust", "server", ring.public_hex("server"), "--dir", client_dir)
    assert result.exit_code == 2 and "--replace" in result.stderr
    result = keys("trust", "server", ring.public_hex("server"), "--dir", client_dir, "--replace")
    assert result.exit_code == 0 and new_fp in result.stdout


def test_cli_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSE_KEYS", str(tmp_path / "env-keys"))
    assert keys("init", "client_maze").exit_code == 0
    assert (tmp_path / "env-keys" / "client_maze.key").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (("rotate", "client_maze"), "no private key for signer 'client_maze'"),
    (("init", "../x"), "bad signer name '../x'"),
    (("trust", "server", "abcd"), "not an Ed25519 public key"),
    (("trust", "server", "nowhere/server.pub"), "no such public key file"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = keys(*args, "--dir", str(tmp_path / "keys"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
