"""What a person watching `make run` sees: a bar per phase of the round, one line per finished round, and
nothing else on the terminal but warnings from Prefect and fedse and errors from anyone. Every other log
record (Prefect's task-run chatter, the temporary API's start-up, transformers, Python warnings) goes to a
log file whose path the run prints first, so nothing is lost, only moved.

The driver that calls the flow in its own process (flows/experiment.py) sets its display in a context
variable (`shown_on`); the flow's runner reports each phase there as its tasks finish (`watching`), whatever
task runner they ran on. A served deployment has no display, and reporting is a no-op: what the UI shows
comes from Prefect's own records, which still reach the API at INFO, the per-round lines among them.
"""

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

from prefect.logging.formatters import PrefectFormatter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

TERMINAL_LOGGERS = ("prefect", "fedse", "flows", "tasks")  # their warnings stay on the terminal


class Display(Protocol):
    """Where the flow's runner reports the round's phases (explore, train, aggregate, evaluate) and each
    finished round's line."""

    def open(self, phase: str, total: int | None) -> None: ...
    def advance(self, phase: str, n: int = 1) -> None: ...
    def close(self, phase: str) -> None: ...
    def line(self, text: str) -> None: ...


class Unwatched:
    """Nobody is watching (a served deployment, a test): every report is dropped."""

    def open(self, phase: str, total: int | None) -> None:
        return None

    def advance(self, phase: str, n: int = 1) -> None:
        return None

    def close(self, phase: str) -> None:
        return None

    def line(self, text: str) -> None:
        return None


_display: ContextVar[Display | None] = ContextVar("fedse_display", default=None)


def watching() -> Display:
    """The display the flow reports to (a no-op one when nobody watches)."""
    return _display.get() or Unwatched()


@contextmanager
def shown_on(display: Display) -> Iterator[Display]:
    """Report to `display` for the `with` block (the flow, called in this process, runs inside it)."""
    token = _display.set(display)
    try:
        yield display
    finally:
        _display.reset(token)


def phase(round: int, name: str) -> str:
    """The key and label of one phase of one round."""
    return f"round {round}: {name}"


class Phases:
    """The round's phases as rich progress bars on stderr (only on a terminal) and finished rounds as lines on
    stdout (always)."""

    def __init__(self, out: Console | None = None, err: Console | None = None) -> None:
        self.out = out or Console(highlight=False, soft_wrap=True)
        err = err or Console(stderr=True)
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
        self.ids: dict[str, object] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> "Phases":
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def open(self, phase: str, total: int | None) -> None:
        with self.lock:
            if phase not in self.ids:
                self.ids[phase] = self.bars.add_task(phase, total=total)

    def advance(self, phase: str, n: int = 1) -> None:
        with self.lock:
            if phase in self.ids:
                self.bars.advance(self.ids[phase], n)

    def close(self, phase: str) -> None:
        with self.lock:
            found = self.ids.pop(phase, None)
            if found is not None:
                self.bars.remove_task(found)

    def line(self, text: str) -> None:
        self.out.print(text)


def for_terminal(record: logging.LogRecord) -> bool:
    """Warnings from Prefect and fedse, errors from anyone: what a person must see while the run goes on."""
    return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING
                                               and record.name.split(".")[0] in TERMINAL_LOGGERS)


def quiet(log_file: Path) -> Callable[[], None]:
    """Route every log record at INFO and above to `log_file` and keep only `for_terminal`'s on the terminal,
    Python warnings included, and the libraries that log through handlers of their own (MLflow, transformers,
    uvicorn) too; transformers' download bars are hidden. Returns the undo. The driver never undoes it: Prefect
    stops its temporary API at interpreter exit, and that line goes to the file too."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(PrefectFormatter(  # a flow's or task's record names its run, as Prefect's console does
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S",
        flow_run_fmt="%(asctime)s %(levelname)-7s flow run %(flow_run_name)r: %(message)s",
        task_run_fmt="%(asctime)s %(levelname)-7s task run %(task_run_name)r: %(message)s",
        defaults={"flow_run_name": "?", "task_run_name": "?"}))
    undo_transformers = _route_transformers()
    root = logging.getLogger()
    terminal = _terminal_handlers()
    for _, handler in terminal:
        handler.addFilter(for_terminal)
    own = {lg for lg, _ in terminal if lg is not root and not lg.propagate}  # their records never reach root
    for logger in (root, *own):
        logger.addHandler(to_file)
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        for logger in (root, *own):
            logger.removeHandler(to_file)
        to_file.close()
        for _, handler in terminal:
            handler.removeFilter(for_terminal)
        undo_transformers()

    return undo


def quiet_worker(log_file: str) -> None:
    """`quiet` in a process-pool worker (its initializer): such a process sets up its own logging, and would
    print every task run's records and transformers' bars to the terminal it shares with the driver. Prefect's
    logging is configured first, so that importing it later does not replace the filtered handlers."""
    import prefect.main  # noqa: F401  (configures Prefect's logging in this process)

    quiet(Path(log_file))


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Every handler that writes to a stream other than a file (the terminal), with the logger it hangs on."""
    loggers = [logging.getLogger(), *(found for found in logging.root.manager.loggerDict.values()
                                      if isinstance(found, logging.Logger))]
    return [(logger, handler) for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def _route_transformers() -> Callable[[], None]:
    """transformers logs through its own stderr handler and draws tqdm bars while loading weights: send its
    records to the root logger (hence the log file) and hide the bars; returns the undo."""
    from transformers.utils import logging as hf

    hf.disable_default_handler()
    hf.enable_propagation()
    hf.disable_progress_bar()

    def undo() -> None:
        hf.enable_default_handler()
        hf.disable_propagation()
        hf.enable_progress_bar()

    return undo
