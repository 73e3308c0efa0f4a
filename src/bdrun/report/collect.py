"""Finding and reading the run folders of a sweep (or of any folder holding run folders).

Every run folder holds results.json (done) or error.json (failed, written by the CLI in a
sweep); Hydra's `.hydra/overrides.yaml` says which parameters the run was given.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdrun.results import RESULTS_FILE

log = logging.getLogger(__name__)

ERROR_FILE = "error.json"
FIGURES_DIR = "figures"
WANDB_SUMMARY_DIR = "wandb_summary"  # the sweep's own wandb run (tables, heatmaps)
WANDB_POPULATION_DIR = "wandb_population"  # a population's wandb run (bdrun.report.population)
SKIPPED_FOLDERS = {
    "wandb",
    "train",
    FIGURES_DIR,
    WANDB_SUMMARY_DIR,
    WANDB_POPULATION_DIR,
    "__pycache__",
}


@dataclass
class JobRecord:
    """One job of a sweep: done (results), failed (error) or missing (never finished)."""

    status: str  # "done" | "failed" | "missing"
    overrides: list[str]
    folder: Path | None = None
    results: dict[str, Any] | None = None
    error: str | None = None
    job_num: int | None = None

    @property
    def params(self) -> dict[str, str]:
        """Override key -> value (a leading + or ~ dropped from the key)."""
        return dict(split_override(o) for o in self.overrides)

    @property
    def seed(self) -> Any:
        if self.results is not None:
            return self.results.get("seed")
        return self.params.get("seed")


@dataclass
class Summary:
    """What `bdrun.report.summary.summarize` found and wrote."""

    root: Path
    records: list[JobRecord]
    swept: list[str]
    files: list[Path] = field(default_factory=list)

    @property
    def done(self) -> list[JobRecord]:
        return [r for r in self.records if r.status == "done"]

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status != "done"]


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("skipping unreadable %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(folder: Path) -> list[str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(v) for v in values] if isinstance(values, list) else []


def _job_num(folder: Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def _natural(name: str) -> list[Any]:
    """Sort key putting job folders 2 before 10."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)
    ]


def collect(root: str | Path) -> list[JobRecord]:
    """Every run folder under `root` (results.json or error.json), in path order."""
    root = Path(root)
    records = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(
            (d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS),
            key=_natural,
        )
        folder = Path(current)
        if RESULTS_FILE in files:
            results = _read_json(folder / RESULTS_FILE)
            if results is not None and "metrics" in results:
                records.append(
                    JobRecord(
                        "done", _read_overrides(folder), folder, results, None, _job_num(folder)
                    )
                )
        elif ERROR_FILE in files:
            error = _read_json(folder / ERROR_FILE) or {}
            overrides = error.get("overrides") or _read_overrides(folder)
            records.append(
                JobRecord(
                    "failed",
                    [str(o) for o in overrides],
                    folder,
                    None,
                    str(error.get("error", "unknown error")),
                    error.get("job", _job_num(folder)),
                )
            )
    return records


def match_expected(records: list[JobRecord], expected: Sequence[Sequence[str]]) -> list[JobRecord]:
    """Number the records by the sweep's job list and add a "missing" record for every job
    that left neither results nor an error (killed, cancelled, timed out)."""
    by_overrides: dict[frozenset[str], list[JobRecord]] = {}
    for record in records:
        by_overrides.setdefault(frozenset(record.overrides), []).append(record)
    ordered, used = [], set()
    for num, overrides in enumerate(expected):
        candidates = [r for r in by_overrides.get(frozenset(overrides), []) if id(r) not in used]
        # a rerun of the same sweep folder may hold the same job twice: prefer its own number
        candidates.sort(key=lambda r: (r.job_num != num, r.status != "done"))
        if candidates:
            record = candidates[0]
            used.add(id(record))
            record.job_num = num
        else:
            record = JobRecord("missing", list(overrides), job_num=num,
                               error="did not finish (killed, cancelled or timed out)")  # fmt: skip
        ordered.append(record)
    return ordered + [r for r in records if id(r) not in used]
