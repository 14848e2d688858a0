"""Ed25519 signatures on what organisations and the server exchange through the store.

The store is shared: anyone with write access to a prefix could swap an adapter or a round request. Each
party therefore signs the manifest it uploads with its own key and checks the other side's against a public
key it was handed out of band, so a tampered or substituted manifest is refused before anything is loaded.

Keys live in one folder per organisation (the keyring):

    root/<name>.key                       own private key, PEM PKCS8 unencrypted, mode 0600
    root/<name>.pub                       own public key, raw 32 bytes as hex, one line
    root/trusted/<name>.pub               other parties' public keys, same format
    root/retired/<name>-<fingerprint>.*   a pair after `rotate`, kept for the record, never used to verify

Every failure is a `SigningError` with one line that names the signer or the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # "server", "client_maze", "client_maze-2"
SIGNATURE_FIELD = "signature"
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")


class SigningError(ValueError):
    """A key or signature problem, in one line naming the signer or file; a ValueError so the CLI's
    `clear_errors` turns it into one line and exit status 2."""


def canonical(doc: dict[str, Any]) -> bytes:
    """The exact bytes a signature covers: key order and whitespace cannot change what was signed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_name(name: str) -> str:
    """A signer name is also a file name: refuse anything that could leave the keyring ("../x", "a/b")."""
    if not isinstance(name, str) or not NAME.match(name):
        raise SigningError(f"bad signer name {str(name)[:80]!r}: use 1-64 of a-z 0-9 _ . -, starting with a "
                           "letter or digit")
    return name


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_hex(text: str, where: str = "public key") -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key from its hex form (as `fedse keys init` prints it)."""
    hex_text = text.strip().lower()
    if not _HEX_KEY.match(hex_text):
        raise SigningError(f"{where}: not an Ed25519 public key (expected 64 hex digits, got "
                           f"{len(hex_text)} characters)")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_text))
    except ValueError as exc:
        raise SigningError(f"{where}: not an Ed25519 public key ({exc})") from None


def _write_public(path: Path, raw: bytes) -> None:
    """Public files are replaced atomically, so a reader never sees half a key."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(raw.hex() + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dir(path: Path) -> None:
    """Keyring folders are private to their owner (0700) from the moment they exist."""
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


@dataclass
class Keyring:
    """One organisation's key folder: its own key pairs and the public keys of the parties it trusts."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # ---------------------------------------------------------------- paths
    def _key(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.key"

    def _pub(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.pub"

    def _trusted(self, name: str) -> Path:
        return self.root / "trusted" / f"{check_name(name)}.pub"

    # ---------------------------------------------------------------- loading
    def _private(self, name: str) -> Ed25519PrivateKey:
        path = self._key(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SigningError(f"no private key for signer {name!r} in {self.root} "
                               f"(run: fedse keys init {name} --dir {self.root})") from None
        except OSError as exc:
            raise SigningError(f"cannot read {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SigningError(f"corrupt private key file {path} (not an unencrypted PEM PKCS8 key)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return key

    def _read_public(self, path: Path) -> Ed25519PublicKey:
        try:
            text = path.read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise SigningError(f"corrupt public key file {path} (not hex text)") from None
        except OSError as exc:
            raise SigningError(f"cannot read {path}: {exc.strerror}") from None
        return parse_public_hex(text, where=f"corrupt public key file {path}")

    def _public(self, name: str) -> Ed25519PublicKey:
        """Own key first (derived from the private key, which is authoritative), then trusted, then a lone .pub."""
        if self._key(name).exists():
            return self._private(name).public_key()
        for path in (self._trusted(name), self._pub(name)):
            if path.exists():
                return self._read_public(path)
        raise SigningError(f"unknown signer {name!r}: no key in {self.root} or {self.root / 'trusted'} "
                           f"(run: fedse keys trust {name} PUBLIC_KEY --dir {self.root})")

    # ---------------------------------------------------------------- the API
    def init(self, name: str) -> str:
        """Create the pair if absent; an existing key is kept (re-running setup must not orphan signatures)."""
        key_path = self._key(name)
        if not key_path.exists():
            _make_dir(self.root)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                # O_EXCL: never overwrite a key; mode 0600 at creation: never readable by others, not even briefly
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it meanwhile: keep theirs
                pass
            else:
                try:
                    os.fchmod(fd, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(pem)
                        fh.flush()
                        os.fsync(fh.fileno())
                except BaseException:
                    key_path.unlink(missing_ok=True)
                    raise
        raw = _raw(self._private(name).public_key())
        pub_path = self._pub(name)
        if not pub_path.exists() or pub_path.read_text(encoding="ascii", errors="replace").strip() != raw.hex():
            _write_public(pub_path, raw)
        return _fingerprint(raw)

    def has(self, name: str) -> bool:
        """Whether this keyring can sign as `name`."""
        return self._key(name).exists()

    def fingerprint(self, name: str) -> str:
        """Short id of a public key (own or trusted), carried in signatures so a rotated key is named as such."""
        return _fingerprint(_raw(self._public(name)))

    def public_hex(self, name: str) -> str:
        """The public key to hand to the other party (own) or as trusted."""
        return _raw(self._public(name)).hex()

    def sign(self, name: str, payload: bytes) -> str:
        """Base64 Ed25519 signature of `payload` with the own private key `name`."""
        return base64.b64encode(self._private(name).sign(payload)).decode("ascii")

    def verify(self, signer: str, payload: bytes, signature: str) -> None:
        """Raise unless `signature` is `signer`'s over `payload` (own key, else trusted/<signer>.pub)."""
        public = self._public(signer)
        try:
            raw_sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise SigningError(f"signature from {signer!r} is not valid base64") from None
        if len(raw_sig) != 64:
            raise SigningError(f"signature from {signer!r} has {len(raw_sig)} bytes, an Ed25519 one has 64")
        try:
            public.verify(raw_sig, payload)
        except InvalidSignature:
            raise SigningError(f"bad signature from {signer!r} (key {self.fingerprint(signer)}): the content "
                               "was changed or signed with another key") from None

    def trust(self, name: str, public_hex: str, *, replace: bool = False) -> str:
        """Record another party's public key; a different key for a known name needs `replace=True`, so a
        swapped key is a deliberate act, not an accident."""
        raw = _raw(parse_public_hex(public_hex, where=f"public key for {check_name(name)!r}"))
        if self.has(name):
            if _raw(self._public(name)) == raw:
                return _fingerprint(raw)
            raise SigningError(f"{name!r} is an own key in {self.root}; a trusted key of that name would never "
                               "be used (own keys are checked first)")
        path = self._trusted(name)
        if path.exists():
            current = _raw(self._read_public(path))
            if current == raw:
                return _fingerprint(raw)
            if not replace:
                raise SigningError(f"{path} already trusts key {_fingerprint(current)} for {name!r}, not "
                                   f"{_fingerprint(raw)}; pass --replace (replace=True) if {name} rotated its key")
        _make_dir(self.root)
        _make_dir(path.parent)
        _write_public(path, raw)
        return _fingerprint(raw)

    def rotate(self, name: str) -> tuple[str, str]:
        """Retire the current pair and create a new one; returns (old fingerprint, new fingerprint)."""
        key_path = self._key(name)
        old_raw = _raw(self._private(name).public_key())  # SigningError when there is no key to rotate
        old_fp = _fingerprint(old_raw)
        retired = self.root / "retired"
        _make_dir(retired)
        stem = retired / f"{name}-{old_fp}"
        dest_key = stem.with_name(stem.name + ".key")
        if dest_key.exists():
            raise SigningError(f"{dest_key} already exists; refusing to overwrite a retired key")
        os.replace(key_path, dest_key)
        _write_public(stem.with_name(stem.name + ".pub"), old_raw)
        self._pub(name).unlink(missing_ok=True)
        return old_fp, self.init(name)

    def names(self) -> dict[str, list[str]]:
        """The own and the trusted signer names, sorted."""
        def stems(folder: Path, suffix: str) -> list[str]:
            if not folder.is_dir():
                return []
            return sorted(p.stem for p in folder.glob(f"*{suffix}") if p.is_file() and NAME.match(p.stem))

        return {"own": stems(self.root, ".key"), "trusted": stems(self.root / "trusted", ".pub")}


def _shown(text: str) -> str:
    """Untrusted text in a one-line message: a fingerprint as is, anything else quoted and cut short."""
    return text if re.fullmatch(r"[0-9a-f]{1,64}", text) else repr(text[:80])


def _body(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}


def _payload(body: dict[str, Any]) -> bytes:
    try:
        return canonical(body)
    except (TypeError, ValueError) as exc:
        raise SigningError(f"document cannot be signed: not plain JSON ({exc})") from None


def sign_doc(keyring: Keyring, signer: str, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with a "signature" block over its canonical form (any previous signature block is replaced)."""
    body = _body(doc)
    block = {"signer": check_name(signer), "key": keyring.fingerprint(signer),
             "ed25519": keyring.sign(signer, _payload(body))}
    return body | {SIGNATURE_FIELD: block}


def verify_doc(keyring: Keyring, doc: dict[str, Any], signer: str) -> dict[str, Any]:
    """`doc` without its signature block, once it is proven to be `signer`'s, unchanged, with the trusted key."""
    check_name(signer)
    if not isinstance(doc, dict):
        raise SigningError(f"expected a JSON object signed by {signer!r}, got {type(doc).__name__}")
    block = doc.get(SIGNATURE_FIELD)
    if block is None:
        raise SigningError(f"document is not signed (expected a signature by {signer!r})")
    if not isinstance(block, dict) or not all(isinstance(block.get(k), str) for k in ("signer", "key", "ed25519")):
        raise SigningError(f"malformed signature block (expected signer, key and ed25519 strings from {signer!r})")
    if block["signer"] != signer:
        raise SigningError(f"document signed by {block['signer'][:80]!r}, expected {signer!r}")
    trusted_fp = keyring.fingerprint(signer)
    if block["key"] != trusted_fp:
        raise SigningError(f"{signer!r} signed with key {_shown(block['key'])}, trusted key is {trusted_fp} "
                           f"(rotated? run fedse keys trust {signer} NEW_PUBLIC_KEY --replace)")
    body = _body(doc)
    keyring.verify(signer, _payload(body), block["ed25519"])
    return body
