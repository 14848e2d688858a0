"""Placement: which accelerator each client's work runs on.

A process that loads a model onto CUDA without being told otherwise takes the first GPU it sees, so a process
pool of five clients puts five copies of the base on one card (five 7B copies do not fit one) and leaves the
others idle. Placement gives every process that holds a model one device, by starting it with
`CUDA_VISIBLE_DEVICES` naming that device alone: the process sees it as `cuda:0` and nothing else, so the
model code (`fedse.model.pick_device`) needs no change.

The rules, deterministic and the same in every runner (flows/placement.py applies them):

- the devices are `orchestration.gpus` when set (entries as `CUDA_VISIBLE_DEVICES` writes them: ordinals or
  GPU-/MIG- UUIDs; `[]`: none), else the ones this process sees (`visible_devices`);
- client k (in the federation's client order) gets device k mod n: one client per device while there are
  enough, beyond that clients share cards in turn (`assign`). The runners keep one model-holding process per
  device, so clients sharing a card run one at a time on one copy of the model;
- without a device every client gets None: nothing is pinned and the runners are as they were (the CPU path).

Nothing here initialises CUDA or imports Prefect or Dask; `visible_devices` asks torch for the device count
only when no setting names the devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedse.config import OrchestrationConfig

VISIBLE = "CUDA_VISIBLE_DEVICES"
TAG = "gpu-"  # a task's device tag: gpu-<device>; the Prefect concurrency limit of that device has its name


def parse_visible(value: str | None) -> list[str] | None:
    """The entries of a `CUDA_VISIBLE_DEVICES` value, None when it is unset. CUDA stops at the first entry that
    names no device (an empty one, or a negative ordinal: `-1` hides them all), and so does this."""
    if value is None:
        return None
    entries = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def cuda_count() -> int:
    """How many CUDA devices this process sees (0 without a driver). torch answers from the driver without
    creating a context, so the process holds no GPU memory afterwards."""
    import torch

    return torch.cuda.device_count()


def visible_devices(setting: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                    count: int | None = None) -> list[str]:
    """The devices clients may be placed on: `setting` (orchestration.gpus) when given, taken as it is (so a
    machine without a GPU can rehearse a placement); else the first `count` (default: what torch sees)
    entries of this process's `CUDA_VISIBLE_DEVICES`, or ordinals 0..count-1 when that is unset."""
    if setting is not None:
        return checked(setting)
    found = cuda_count() if count is None else count
    listed = parse_visible((os.environ if environ is None else environ).get(VISIBLE))
    return [str(i) for i in range(found)] if listed is None else listed[:found]


def checked(devices: Iterable[str | int]) -> list[str]:
    """Device entries as strings, refused in one line when one is empty, holds a comma or is listed twice."""
    out: list[str] = []
    for device in devices:
        entry = str(device).strip()
        if not entry or "," in entry or entry.startswith("-"):
            raise ValueError(f"{device!r} is not a device (an ordinal such as 0, or a GPU-/MIG- UUID, one per entry)")
        if entry in out:
            raise ValueError(f"device {entry} is listed twice")
        out.append(entry)
    return out


def assign(names: Sequence[str], devices: Sequence[str]) -> dict[str, str | None]:
    """Each name's device: the k-th name gets device k mod n (one each while there are enough, then shared in
    turn); None for every name without devices."""
    if not devices:
        return {name: None for name in names}
    return {name: devices[k % len(devices)] for k, name in enumerate(names)}


def placed_devices(orchestration: OrchestrationConfig) -> list[str]:
    """The devices the server's flow places its clients on. None for a thread pool (one process, one model,
    shared under a lock: it sits on the first device the driver sees) and in workers mode (each organisation's
    process brings its own device, flows/orgs.py). An existing Dask cluster's devices only when `gpus` names
    them: what this machine sees says nothing of that cluster's workers."""
    mode = orchestration.mode
    if mode == "workers" or (mode == "inprocess" and orchestration.task_runner == "thread"):
        return []
    if mode == "dask" and orchestration.dask_address:
        return checked(orchestration.gpus or [])
    return visible_devices(orchestration.gpus)


def tag(device: str) -> str:
    """The tag of the tasks placed on `device` (routing, and its Prefect concurrency limit of 1)."""
    return f"{TAG}{device}"


def tagged(tags: Iterable[str]) -> str | None:
    """The device a task's tags place it on, None when they name none."""
    return next((t.removeprefix(TAG) for t in sorted(tags) if t.startswith(TAG)), None)


def pinned(device: str | None) -> dict[str, str]:
    """The environment that pins a process to `device` (nothing for None: the CPU path is left alone)."""
    return {} if device is None else {VISIBLE: device}


def pin(device: str | None) -> None:
    """Pin this process to `device` (a worker's first act, before torch can initialise CUDA)."""
    os.environ.update(pinned(device))


def started(device: str, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()) -> None:
    """A device's worker process starts here (a process pool's initializer): pinned first, then the caller's
    own initializer."""
    pin(device)
    if initializer is not None:
        initializer(*initargs)
