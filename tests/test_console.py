"""What `make run` shows: the phase bars and round lines (flows/console.py), the log routing that keeps
third-party chatter off the terminal, and the driver's whole output on a smoke run through the real flow."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from rich.console import Console

from flows.console import Phases, Unwatched, for_terminal, phase, quiet, shown_on, watching


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_terminal_keeps_our_warnings_and_everyones_errors_only() -> None:
    assert for_terminal(record("prefect.flow_runs", logging.WARNING))
    assert for_terminal(record("fedse.envs", logging.WARNING))
    assert for_terminal(record("transformers.modeling_utils", logging.ERROR))
    assert not for_terminal(record("prefect.task_runs", logging.INFO))
    assert not for_terminal(record("py.warnings", logging.WARNING))
    assert not for_terminal(record("transformers.modeling_utils", logging.WARNING))


def test_quiet_moves_chatter_to_the_log_file_and_undoes(tmp_path: Path) -> None:
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    seen: list[str] = []
    handler.emit = lambda r: seen.append(r.name) if handler.filter(r) else None  # type: ignore[method-assign]
    try:
        undo = quiet(tmp_path / "logs" / "run.log")
        logging.getLogger("thirdparty").info("sampling rejected")
        logging.getLogger("prefect.flow_runs").warning("a client is late")
        import warnings

        warnings.warn("a deprecation nobody asked for", FutureWarning, stacklevel=1)
        undo()
        logging.getLogger("thirdparty").info("after undo")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = (tmp_path / "logs" / "run.log").read_text()
    assert "sampling rejected" in text and "a client is late" in text and "a deprecation nobody" in text
    assert "after undo" not in text
    assert seen == ["prefect.flow_runs", "thirdparty"]  # while quiet: only the warning; after undo: all again


def test_quiet_also_routes_a_library_that_logs_through_its_own_handler(tmp_path: Path) -> None:
    """MLflow hangs its own stderr handler on logger `mlflow` and does not propagate: its INFO lines (database
    set-up) must reach the file, not the terminal."""
    own = logging.getLogger("somelib")
    terminal = io.StringIO()
    own.addHandler(logging.StreamHandler(terminal))
    own.propagate, own.level = False, logging.INFO
    try:
        undo = quiet(tmp_path / "run.log")
        own.info("creating initial database tables")
        own.error("the database is locked")
        undo()
    finally:
        own.handlers.clear()
    assert terminal.getvalue() == "the database is locked\n"
    assert "creating initial database tables" in (tmp_path / "run.log").read_text()


def test_phases_draw_bars_from_many_threads_and_print_round_lines() -> None:
    out, err = io.StringIO(), io.StringIO()
    with Phases(Console(file=out, width=100), Console(file=err, force_terminal=True, width=100)) as shown:
        shown.open(phase(0, "explore"), 40)
        workers = [threading.Thread(target=lambda: [shown.advance(phase(0, "explore")) for _ in range(10)])
                   for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        (task,) = shown.bars.tasks
        assert task.completed == 40 and task.description == "round 0: explore"
        shown.advance("round 9: never opened")  # a late report for a closed phase is dropped, not an error
        shown.close(phase(0, "explore"))
        assert shown.bars.tasks == []
        shown.line("round 0 of 1  macro 0.100  3 s")
    assert out.getvalue() == "round 0 of 1  macro 0.100  3 s\n"


def test_nobody_watching_is_a_no_op_and_a_display_is_seen_only_inside_its_block() -> None:
    assert isinstance(watching(), Unwatched)
    shown = Phases(Console(file=io.StringIO()), Console(file=io.StringIO()))
    with shown_on(shown):
        assert watching() is shown
    assert isinstance(watching(), Unwatched)


def test_the_driver_prints_a_line_per_round_the_table_and_where_to_look(micro_params: Path, seeds: Path,
                                                                        tmp_path: Path) -> None:
    """`python -m flows.experiment` (what `make run` calls) on a 2-round smoke run in a process pool: a few
    dozen lines in all, none of them Prefect's task-run records (the workers' included), nor transformers'
    bars, which are in the log file it names instead; one temporary Prefect API serves the flow and its
    workers."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["federation.clients=[maze, wordle]", f"seed_data.dir={seeds}", "federation.seeds_per_client=4",
            "federation.explore_episodes=2", "federation.eval_episodes=2", f"federation.out={tmp_path / 'runs'}",
            "orchestration.task_runner=process", "orchestration.workers=2"]  # as make run: workers log too
    argv = [sys.executable, "-m", "flows.experiment", "--profile", "smoke", "--params", str(micro_params),
            "--out", str(tmp_path / "run"), "--tracking-uri", uri, *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert lines[0].startswith("run: fedse, profile smoke, seed 0, 2 rounds") and "full log:" in lines[0]
    assert [line.split("  ")[0] for line in lines if line.startswith("round ")] == ["round 0 of 2", "round 1 of 2"]
    assert all(" macro " in line and "buffers +" in line for line in lines if line.startswith("round "))
    assert not [line for line in lines if "Task run" in line or "Finished in state" in line or "Loading" in line]
    (log,) = (tmp_path / "runs" / "logs").glob("fedse-smoke-s0-*.log")
    logged = log.read_text()
    assert "Finished in state Completed" in logged and logged.count("Starting temporary server") == 1
    assert "train-wordle-round-1" in logged  # a worker process's task run, in the same file
    assert lines[-1] == f"full log:   {log}", "\n".join(lines)
    assert any(line.startswith("MLflow UI:") and "#/experiments/" in line for line in lines)
    assert any(line.startswith("registry:") and f"compare --tracking-uri {uri}" in line for line in lines)
