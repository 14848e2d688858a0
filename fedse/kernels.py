"""Which CPU kernels torch computes with: portable ones, so that an adapter's bytes do not depend on the CPU.

Measured here: the same LoRA training (same data, seed and thread count) gives a different adapter under
each of torch's CPU kernel paths (ATen's AVX512, AVX2 and default vector code) and each of MKL's code paths
(MKL picks one per CPU model), while each path alone is deterministic. Two machines of one "type" with
different CPU generations therefore produce different adapter bytes from the same run, with the same success
rates. `model.kernels: portable` pins both to AVX2, which every x86-64 server of the last decade has (MKL's
conditional numerical reproducibility, `MKL_CBWR`), so the bytes are the same wherever the run is repeated with
the same thread counts; `native` lets each library pick the fastest path for the CPU at hand. GPUs are not
affected by this setting, and neither are CPUs other than x86-64 (ARM has neither path to pin): there portable
is native, and bytes are reproducible on the same CPU model only.
"""

from __future__ import annotations

import os
import platform
from typing import Literal

import torch

Kernels = Literal["portable", "native"]
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


class KernelError(ValueError):
    """The process computed with other kernels before the setting could take effect."""


def choose(kind: Kernels) -> str:
    """Pin the CPU kernels for this process (before its first torch computation); returns ATen's path.

    Both libraries read their setting once, at their first computation, so a process that already computed
    natively cannot switch: that is refused in one line rather than silently giving unportable bytes."""
    if kind == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return torch.backends.cpu.get_cpu_capability()
    os.environ.update(PORTABLE)
    active = torch.backends.cpu.get_cpu_capability()
    if active != PORTABLE["ATEN_CPU_CAPABILITY"].upper():
        raise KernelError(f"model.kernels portable: torch already computes with {active} kernels in this process; "
                          "choose the kernels before any torch work, or start it with ATEN_CPU_CAPABILITY=avx2 "
                          "MKL_CBWR=AVX2")
    return active
