"""How every benchmark prints its result: one JSON object with --json, else one aligned line per figure."""

from __future__ import annotations

import json
from typing import Any


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result) + 2
    for key, value in result.items():
        print(f"{key:<{width}} {value:,.4g}" if isinstance(value, float) else f"{key:<{width}} {value}")
