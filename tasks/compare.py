"""Registered global adapters side by side, read from the MLflow model registry (`fedse compare`)."""

import urllib.error
import urllib.request
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.register import MODEL


def reachable(uri: str, timeout: float = 5) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer (MLflow itself would retry for
    minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"{uri}: MLflow server not reachable ({reason}); start it with `make serve`") from None


def versions(uri: str, model: str = MODEL) -> list[dict[str, Any]]:
    """Every version of `model`: its number, aliases, experiment, method, round, seed and success figures."""
    reachable(uri)
    client = MlflowClient(uri)
    try:
        registered = client.get_registered_model(model)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"{uri}: no registered model {model!r} (run the flow with tracking first)") from None
        raise
    aliases: dict[str, list[str]] = {}
    for alias, version in registered.aliases.items():  # search_model_versions returns no aliases
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name='{model}'"):
        tags = v.tags
        rows.append({
            "version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
            "experiment": tags.get("experiment"), "method": tags.get("method"),
            "round": _int(tags.get("round")), "seed": _int(tags.get("seed")), "task_set": tags.get("task_set"),
            "micro": _float(tags.get("micro")), "macro": _float(tags.get("macro")),
            "success": {k.removeprefix("success."): float(val) for k, val in tags.items() if k.startswith("success.")},
            "adapter_sha256": tags.get("adapter_sha256"), "adapter_bytes": _int(tags.get("adapter_bytes")),
            "buffers": {k.removeprefix("buffer."): val for k, val in tags.items() if k.startswith("buffer.")},
            "run_id": v.run_id,
        })
    return sorted(rows, key=lambda r: r["version"])


def _int(text: str | None) -> int | None:
    return int(text) if text is not None else None


def _float(text: str | None) -> float | None:
    return float(text) if text is not None else None
