"""Atomic writes: a reader sees the old file (or folder) or the new one, never a half-written one.

Everything fedse persists (trajectory files, buffers, manifests, metrics, reports, adapters, exchanged adapter
objects, the tiny model) goes through here: write under a temporary name in the same folder, flush, then rename
over the target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """A text (or binary) handle whose content replaces `path` only if the block finishes without raising."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=1))


def write_bytes(path: Path, data: bytes) -> None:
    """Binary content (an exchanged adapter object), replaced atomically like the text files."""
    with atomic_file(path, binary=True) as fh:
        fh.write(data)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A fresh temporary folder that replaces the folder `path` only if the block finishes without raising.

    An existing `path` is moved aside first and deleted only after the new folder is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        backup = path.with_name(f".{path.name}.old")
        if path.exists():
            path.rename(backup)
        tmp.rename(path)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
