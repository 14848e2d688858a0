"""Placement in the flow's task runners: one model-holding process per device (the rules: fedse/placement.py).

- Process pool (`PlacedProcessPool`): one pool of a single process per device. Its process starts pinned
  (`CUDA_VISIBLE_DEVICES=<device>`), and so does every task it runs: Prefect's pool lays the driver's
  environment over a worker's for each task, so the pin is laid over that in turn, before torch can
  initialise CUDA there. A task goes to the process of the device its tag `gpu-<device>` names (a client's
  chain, an environment's evaluation), an untagged one (the initial adapter, the server step) to the first
  device's. One process per device: clients that share a card run one at a time on its one model.
- Dask (`PlacedDask`): a local cluster of one worker per device (one thread, its process pinned, resource
  `gpu-<device>: 1`), each tagged task asking for its device's resource, so it runs there and alone. The
  workers of an existing cluster are started that way by hand (docs/scale-out.md).
- Prefect (`device_limits`): a tag concurrency limit of 1 per device, created by the served deployment and by
  `make run`, so two tasks tagged for one card never run at once, whatever runs them.
- The probe (tasks/probe.py): what a device's process sees; the flow records it per client (placement.json)
  and stops when a client's process sees another device than its own.

A device's process imports only what its tasks need: its initializer (`fedse.placement.started`) and the probe
live outside this module, which imports Dask.

Without devices none of this is used: the runners are Prefect's own, as before.
"""

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner
from prefect_dask import DaskTaskRunner

from fedse.placement import pinned, started, tag, tagged

Initializer = tuple[Callable[..., None], tuple[Any, ...]] | None


class PinnedPool(ProcessPoolTaskRunner):
    """Prefect's process pool reduced to one process that, with every task it runs, sees `device` only."""

    def __init__(self, device: str, initializer: Initializer = None) -> None:
        start, args = initializer or (None, ())
        super().__init__(max_workers=1, initializer=started, initargs=(device, start, args))
        self.device, self.initializer = device, initializer

    def duplicate(self) -> "PinnedPool":
        return type(self)(self.device, self.initializer)

    def _resolve_futures_and_submit(self, *args: Any, env: dict[str, str], **kwargs: Any) -> Any:
        """Prefect hands each task the driver's environment; the device's pin is laid over it."""
        return super()._resolve_futures_and_submit(*args, env=env | pinned(self.device), **kwargs)


class PlacedProcessPool(TaskRunner):
    """The process pool on `devices`: a `PinnedPool` per device, each task routed by its device tag."""

    def __init__(self, devices: list[str], initializer: Initializer = None) -> None:
        if not devices:
            raise ValueError("PlacedProcessPool needs at least one device (without one, use the plain pool)")
        super().__init__()
        self.devices, self.initializer = list(devices), initializer
        self.pools = {device: PinnedPool(device, initializer) for device in self.devices}
        self._stack = ExitStack()

    def duplicate(self) -> "PlacedProcessPool":
        return type(self)(self.devices, self.initializer)

    def pool(self, tags: Iterable[str]) -> PinnedPool:
        """The pool of the device the tags name; the first device's for a task without one."""
        return self.pools.get(tagged(tags) or "", self.pools[self.devices[0]])

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        if not self._started:
            raise RuntimeError("Task runner is not started")
        return self.pool(task.tags).submit(task, parameters, wait_for, dependencies)

    def __enter__(self) -> "PlacedProcessPool":
        super().__enter__()
        self._stack = ExitStack()
        for pool in self.pools.values():
            self._stack.enter_context(pool)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)
        super().__exit__(*exc)


def placed_cluster(devices: list[str], **kwargs: Any) -> Any:
    """A local Dask cluster of one worker per device: one thread, its process pinned to the device, and the
    resource `gpu-<device>: 1` that tasks placed there ask for."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    workers = {tag(device): {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": pinned(device),
                                                       "resources": {tag(device): 1}}}
               for device in devices}
    return SpecCluster(workers=workers, scheduler=scheduler, **kwargs)


class PlacedDask(DaskTaskRunner):
    """Prefect's Dask runner, each task tagged for a device asking for that device's worker resource."""

    def __init__(self, devices: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.devices = list(devices or [])

    def duplicate(self) -> "PlacedDask":
        copy = super().duplicate()
        copy.devices = list(self.devices)
        return copy

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        import dask

        device = tagged(task.tags)
        if device not in self.devices:
            return super().submit(task, parameters, wait_for, dependencies)
        with dask.annotate(resources={tag(device): 1}):
            return super().submit(task, parameters, wait_for, dependencies)


def placed_runner(kind: str, devices: list[str], workers: int, address: str | None = None,
                  initializer: Initializer = None) -> TaskRunner | None:
    """The placing runner of `kind` on `devices`; None where nothing is placed (no devices, or the thread
    pool), so the caller builds Prefect's own."""
    if not devices or kind == "thread":
        return None
    if kind == "dask":
        if address:
            return PlacedDask(devices, address=address)
        return PlacedDask(devices, cluster_class=placed_cluster, cluster_kwargs={"devices": devices})
    return PlacedProcessPool(devices, initializer)


def device_limits(devices: list[str], slots: int) -> None:
    """The Prefect concurrency limits placement relies on: `gpu` (train tasks at once over all devices: at
    least one per device) and one of 1 per device tag, on the API in this process's settings."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=max(slots, len(devices)))
        for device in devices:
            client.create_concurrency_limit(tag=tag(device), concurrency_limit=1)
