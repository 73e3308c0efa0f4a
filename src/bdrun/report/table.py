"""The summary tables of a sweep: one flat row per job, and the rows grouped over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from bdrun.report.collect import JobRecord

STAGES = ("before", "after")
MAIN_METRICS = ("cca", "asr", "ra")
NAME_COLUMNS = ("dataset", "model", "attack", "defense")


def swept_parameters(records: Iterable[JobRecord]) -> list[str]:
    """Override keys whose value differs between records, in first-seen order."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    records = list(records)
    for record in records:
        for key, value in record.params.items():
            if key not in values:
                values[key], order = set(), [*order, key]
            values[key].add(value)
    for record in records:  # a key some records lack also varies
        for key in order:
            if key not in record.params:
                values[key].add("")
    return [key for key in order if len(values[key]) > 1]


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool) or value is None


def job_row(record: JobRecord, swept: Sequence[str]) -> dict[str, Any]:
    """The flat summary row of one job (fractions, seconds)."""
    params = record.params
    row: dict[str, Any] = {
        "job": record.job_num if record.job_num is not None else "",
        "status": record.status,
        "overrides": " ".join(record.overrides),
    }
    row.update({key: params.get(key, "") for key in swept})
    results = record.results or {}
    for name in NAME_COLUMNS:
        row[name] = results.get(name, params.get(name, ""))
    row["seed"] = results.get("seed", params.get("seed", ""))
    metrics = results.get("metrics", {})
    for stage in STAGES:
        for key in MAIN_METRICS:
            row[f"{stage}_{key}"] = metrics.get(stage, {}).get(key)
        row[f"{stage}_degenerate"] = int(bool(metrics.get(stage, {}).get("degenerate")))
    for stage in STAGES:  # the attack's own figures (per-trigger ASR, ...)
        for key, value in metrics.get(stage, {}).items():
            if key not in MAIN_METRICS and _scalar(value) and not isinstance(value, str):
                row[f"{stage}_{key}"] = value
    for key, value in (metrics.get("detection") or {}).items():
        if isinstance(value, bool):
            row[f"detection_{key}"] = int(value)
        elif _scalar(value) and not isinstance(value, str):
            row[f"detection_{key}"] = value
    timing = results.get("timing", {})
    for key in ("train_s", "defense_s", "total_s"):
        row[key] = timing.get(key)
    row["cache"] = results.get("cache", {}).get("model", "")
    row["error"] = record.error or ""
    row["folder"] = str(record.folder) if record.folder else ""
    return row


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order."""
    found: list[str] = []
    for row in rows:
        found += [c for c in row if c not in found]
    return found


def sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then strings."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std (n - 1)
    return statistics.fmean(values), std


def seed_groups(rows: list[dict[str, Any]], swept: Sequence[str]) -> list[dict[str, Any]]:
    """Done rows grouped by everything but the seed: mean and sample std of every figure."""
    keys = [k for k in swept if k != "seed"]
    group_by = [*keys, *NAME_COLUMNS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(tuple(str(row.get(k, "")) for k in group_by), []).append(row)
    figures = [
        c
        for c in columns(rows)
        if c.startswith(("before_", "after_", "detection_")) or c.endswith("_s")
    ]
    out = []
    for group_values, members in sorted(
        groups.items(), key=lambda kv: [sort_key(v) for v in kv[0]]
    ):
        entry: dict[str, Any] = dict(zip(group_by, group_values, strict=True))
        entry["n"] = len(members)
        entry["seeds"] = " ".join(str(m["seed"]) for m in members)
        for column in figures:
            values = [m.get(column) for m in members]
            numbers = [float(v) for v in values if isinstance(v, int | float)]
            mean, std = _mean_std(numbers)
            entry[f"{column}_mean"], entry[f"{column}_std"] = mean, std
        out.append(entry)
    return out
