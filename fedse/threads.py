"""torch's intra-op CPU threads, set per block of work.

On a small CPU the right count depends on what else runs: one process alone trains a little faster on every
core, but two client processes side by side (the quick profile's process pool) each want one thread, or their
threads wait on each other at every small op. Acting and training therefore each name their own count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `count` for the block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)
