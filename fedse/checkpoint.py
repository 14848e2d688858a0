"""Resuming a killed run: what a run folder holds after every step, and how a run picks up from it.

A federation runs for hours and its machines crash (`kill -9`, power loss). Everything a later round needs is
therefore on disk, each file written atomically, and metrics.json is written last in a round, so it is the
commit point: a round listed there is complete, and every file it needs exists.

    run.json                       the run's identity: the exchange's experiment name and the full config
    metrics.json                   the completed rounds (the commit point of each)
    adapters/round_<t>/            the global adapter after round t (federated and pooled methods)
    clients/<name>/round_<t>.json  client <name> finished round t: its stats (written after its upload)
    clients/<name>/round_<t>.safetensors   ... and its own adapter, for methods without a server
    server/momentum_<t>.safetensors        FedAvgM's buffer after round t
    buffers/<name>/                buffer.jsonl + manifest_<t>.json per round (fedse.buffer)

Resuming at round R (= the rounds in metrics.json) restores the global adapter of round R − 1, each client's
own adapter and the server's momentum, rewinds each buffer to its round R − 1 manifest (dropping what a
half-done round R added), and skips in round R every client whose round-R marker exists: its upload is
already in the exchange (verified again when the server downloads it), so it is not retrained. Rollouts and
training are keyed by (seed, round, client), so what is redone comes out bit for bit the same, and the final
global adapter of a resumed run has the same sha256 as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedse.atomic import write_bytes, write_json
from fedse.buffer import Buffer

RUN = "run.json"
METRICS = "metrics.json"


class ResumeError(ValueError):
    """A run folder that cannot be resumed; the message is one line naming the folder and what is wrong."""


_ABSENT = object()


def differences(old: Any, new: Any, prefix: str = "", defaults: Any = _ABSENT) -> list[str]:
    """Dotted keys whose values differ between two config dumps, with both values.

    A key the recorded run lacks is a setting added to fedse after the run started; the run behaved as its
    default, so it is no difference when `new` holds that default (given by `defaults`, a dump of the default
    config), and a run started before an upgrade can still be resumed after it.
    """
    if old is _ABSENT and defaults is not _ABSENT and new == defaults:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        sub = defaults if isinstance(defaults, dict) else {}
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.",
                               sub.get(key, _ABSENT))
        return out
    if old == new:
        return []
    shown = [None if value is _ABSENT else value for value in (old, new)]
    return [f"{prefix.rstrip('.')}: {shown[0]!r} in the run, {shown[1]!r} now"]


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config as resumption compares it: where the run folder is may change, nothing else may."""
    out = json.loads(json.dumps(config))
    out.get("federation", {}).pop("out", None)
    return out


def begin(out: Path, config: dict[str, Any], experiment: str | None) -> None:
    """Record a new run's identity before any work, so even a run killed in round 0 can be resumed."""
    write_json(out / RUN, {"experiment": experiment, "config": config})


def identity(out: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's recorded identity, after checking that it is the same run as `config` describes.

    `defaults` (the default config's dump) lets a setting added since the run started pass at its default.
    """
    path = out / RUN
    if not path.exists():
        raise ResumeError(f"--resume {out}: no {RUN} there (not a fedse run folder, or one from before resume "
                          "existed)")
    try:
        run = json.loads(path.read_text())
        recorded = run["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ResumeError(f"--resume {out}: {RUN} is unreadable ({type(exc).__name__})") from None
    changed = differences(comparable(recorded), comparable(config), "", _ABSENT if defaults is None else defaults)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ResumeError(f"--resume {out}: the parameters differ from the run's: {changed[0]}{more}")
    return run


def completed(out: Path) -> list[dict[str, Any]]:
    """The round records metrics.json commits (none if the run died before its first round ended)."""
    path = out / METRICS
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["rounds"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ResumeError(f"{path}: unreadable ({type(exc).__name__}); it is written atomically, so this file "
                          "was changed outside fedse") from None


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """An adapter-shaped tensor dict as one safetensors file, replaced atomically."""
    from safetensors.torch import save

    write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise ResumeError(f"{path}: missing, though metrics.json lists its round as complete")
    return load_file(path)


def client_file(out: Path, client: str, round: int, suffix: str) -> Path:
    return out / "clients" / client / f"round_{round}{suffix}"


def client_done(out: Path, client: str, round: int) -> dict[str, Any] | None:
    """The stats a client recorded when it finished `round`, or None if it did not."""
    path = client_file(out, client, round, ".json")
    return json.loads(path.read_text()) if path.exists() else None


def mark_client_done(out: Path, client: str, round: int, stats: dict[str, Any],
                     own: dict[str, torch.Tensor] | None = None) -> None:
    """Record a finished client round: its own adapter first (when it has no server), then the marker."""
    if own is not None:
        save_state(client_file(out, client, round, ".safetensors"), own)
    write_json(client_file(out, client, round, ".json"), stats)


def rewind(buffer: Buffer, round: int) -> None:
    """Put a buffer back to its state after `round` (−1: empty), dropping what later, unfinished rounds added.

    Records are appended oldest first and each manifest counts them (`rows`; `count` in manifests written
    before buffers could supersede records, when the two were equal), so the state after round t is the first
    `rows` records of buffer.jsonl minus what manifests 0 … t superseded."""
    keep = 0
    if round >= 0:
        manifest = buffer.root / f"manifest_{round}.json"
        if not manifest.exists():
            raise ResumeError(f"{manifest}: missing, though metrics.json lists round {round} as complete")
        doc = json.loads(manifest.read_text())
        keep = doc.get("rows", doc["count"])
    if keep > buffer.rows:
        raise ResumeError(f"{buffer.path}: holds {buffer.rows} records, fewer than the {keep} its round {round} "
                          "manifest counts")
    buffer.truncate(keep, round)
    for later in buffer.root.glob("manifest_*.json"):
        if int(later.stem.split("_", 1)[1]) > round:
            later.unlink()
