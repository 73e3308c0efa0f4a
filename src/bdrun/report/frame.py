"""A folder of runs as one table, for notebooks: `load_runs(folder)` -> pandas.DataFrame."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bdrun.errors import BdrunError
from bdrun.report.collect import collect


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); lists and
    other values stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_runs(folder: str | Path) -> Any:
    """Every run below `folder` (a sweep, a population, any folder of run folders) as a pandas
    DataFrame, one row per run folder holding results.json or error.json (bdrun.report.collect).

    Columns: `folder`, `status` ("done" | "failed"), `error`, `overrides` (the run's Hydra
    overrides as one string), then every key of results.json flattened with dots
    (`metrics.before.asr`, `metrics.detection.score`, `timing.defense_s`,
    `config.attack.target`, ...); lists stay lists. A run lacks the keys it did not write (NaN).
    A folder that is not there is a one-line BdrunError; a folder without runs gives an empty
    frame with the first four columns.
    """
    import pandas as pd

    folder = Path(folder)
    if not folder.is_dir():
        raise BdrunError(f"{folder} is not a folder of runs; give a sweep or population folder")
    rows = [
        {
            "folder": str(record.folder),
            "status": record.status,
            "error": record.error,
            "overrides": " ".join(record.overrides),
            **flatten(record.results or {}),
        }
        for record in collect(folder)
    ]
    return pd.DataFrame(rows, columns=None if rows else ["folder", "status", "error", "overrides"])
