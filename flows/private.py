"""Private files of the served stack: one private folder (`.serve/`, mode 0700) whose every secret file is created
with mode 0600, so no other user of the machine can read one, not even for an instant.

A file is written to a fresh temporary name opened with O_CREAT | O_EXCL and mode 0600 (the umask can only take
bits away), then renamed over the target: readers see the old file or the new one, never a half-written or
wider-permissioned one. Secrets are minted once and reused by every `make serve` (so they can be handed to a
remote organisation); `python -m flows.stack rotate` mints them again.
"""

import json
import os
import secrets
from pathlib import Path
from typing import Any

FOLDER_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """The folder (and its missing parents) readable by the owner only; an existing one is narrowed to 0700."""
    path = Path(path)
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    os.chmod(path, FOLDER_MODE)
    return path


def write_private(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path`, mode 0600 from the moment the file exists (temporary name, then an atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, FILE_MODE)  # an inherited ACL or an odd filesystem cannot widen it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_private_json(path: Path, payload: Any) -> Path:
    return write_private(path, json.dumps(payload, indent=1))


def token(nbytes: int = 32) -> str:
    """A random secret, URL- and shell-safe."""
    return secrets.token_urlsafe(nbytes)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
