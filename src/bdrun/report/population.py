"""Scoring a population folder: every inspector's detection figures, overall and per family.

`score_population(root)` reads the runs below a population folder (`load_runs`), one per
(member, inspector), and writes there, atomically:

- `population.csv` / `population.md` / `population.json`: per inspector, over all models and
  per attack family (that family's backdoored models against every clean one): the counts,
  AUROC with its bootstrap 95 % interval, TrojAI's cross-entropy on the evaluation half after
  a logistic calibration fitted on the calibration half, TPR at 5 % FPR, the target-label
  accuracy on the backdoored models flagged, the share of clean models flagged, and the mean
  inspection seconds per model (bdrun.report.detection_scores);
- `population_models.csv`: one row per (model id, inspector): ground truth, score, flags, cost;
- `ground_truth.csv`: model id, backdoored, family, target (kept apart from models/);
- `population_roc.png`: one ROC curve per inspector over all models;
- with a wandb logger, the table and the ROC plot in a "population" run of the sweep's group.

The calibration half is half of the clean and half of the backdoored models (rounded up),
drawn from the population seed (bdrun.rng stream `population-calibration`); its model ids are
in population.json under `calibration_models`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdrun.errors import BdrunError
from bdrun.fs import atomic_file
from bdrun.report import detection_scores as ds
from bdrun.report.collect import WANDB_POPULATION_DIR
from bdrun.report.frame import load_runs
from bdrun.results import write_json_atomic
from bdrun.rng import derive_seed

log = logging.getLogger(__name__)

TABLE_CSV = "population.csv"
TABLE_MD = "population.md"
SCORES_JSON = "population.json"
MODELS_CSV = "population_models.csv"
GROUND_TRUTH_CSV = "ground_truth.csv"
ROC_PNG = "population_roc.png"
WANDB_DIR = WANDB_POPULATION_DIR
ALL = "all"
COLUMNS = {
    "model_id": "config.population.assigned.model_id",
    "member": "config.population.member",
    "backdoored": "config.population.assigned.backdoored",
    "family": "config.population.assigned.family",
    "target": "config.population.assigned.target",
    "inspector": "defense",
    "score": "metrics.detection.score",
    "flagged_labels": "metrics.detection.flagged_labels",
    "defense_s": "timing.defense_s",
    "train_s": "timing.train_s",
    "cache": "cache.model",
}


@dataclass
class PopulationScores:
    """What score_population computed and wrote."""

    root: Path
    rows: list[dict[str, Any]]
    jobs: int
    failed: int
    files: list[Path] = field(default_factory=list)


def job_table(frame: Any) -> Any:
    """The population's finished jobs as a DataFrame with the COLUMNS' short names."""
    import pandas as pd

    if frame.empty or COLUMNS["model_id"] not in frame:
        return pd.DataFrame(columns=list(COLUMNS))
    done = frame[(frame["status"] == "done") & frame[COLUMNS["model_id"]].notna()]
    table = pd.DataFrame({short: done.get(long) for short, long in COLUMNS.items()})
    table["backdoored"] = table["backdoored"].astype(bool)
    table["score"] = pd.to_numeric(table["score"], errors="coerce")
    return table.sort_values(["inspector", "model_id"]).reset_index(drop=True)


def _flags(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else []


def group_figures(
    group: Any, calibration: tuple[float, float] | None, evaluation_ids: set[str],
    resamples: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The figures of one inspector on one group of models (module docstring)."""
    scored = group[group["score"].notna()]
    scores, labels = scored["score"].tolist(), scored["backdoored"].astype(int).tolist()
    low, high = ds.bootstrap_auroc(scores, labels, resamples, seed)
    evaluation = scored[scored["model_id"].isin(evaluation_ids)]
    ce = math.nan
    if calibration is not None and len(evaluation):
        probabilities = ds.calibrated(evaluation["score"].tolist(), calibration)
        ce = ds.cross_entropy(probabilities, evaluation["backdoored"].astype(int).tolist())
    accuracy, flagged = ds.target_accuracy(
        [_flags(v) for v in scored["flagged_labels"]],
        [None if t is None or t != t else int(t) for t in scored["target"]],
        labels,
    )
    clean = scored[~scored["backdoored"]]
    return {
        "clean": int((~scored["backdoored"]).sum()),
        "backdoored": int(scored["backdoored"].sum()),
        "unscored": int(len(group) - len(scored)),
        "auroc": ds.roc_auc(scores, labels),
        "auroc_low": low,
        "auroc_high": high,
        "cross_entropy": ce,
        "tpr_at_fpr_5": ds.tpr_at_5(scores, labels),
        "target_accuracy": accuracy,
        "flagged_backdoored": flagged,
        "flagged_clean_share": (
            float(sum(bool(_flags(v)) for v in clean["flagged_labels"]) / len(clean))
            if len(clean)
            else math.nan
        ),
        "seconds_per_model": float(group["defense_s"].astype(float).mean()),
    }


def score_table(table: Any, seed: int, resamples: int) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows: one per inspector and group, the calibration half's model ids)."""
    models = table.drop_duplicates("model_id").sort_values("model_id")
    mask = ds.calibration_split(
        models["backdoored"].astype(int).tolist(),
        derive_seed(seed, "population-calibration") % 2**32,
    )
    calibration_ids = set(models["model_id"][mask])
    evaluation_ids = set(models["model_id"][~mask])
    families = sorted(set(table.loc[table["backdoored"], "family"]))
    rows = []
    for inspector in sorted(set(table["inspector"])):
        own = table[table["inspector"] == inspector]
        fit_on = own[own["model_id"].isin(calibration_ids) & own["score"].notna()]
        calibration = ds.fit_calibration(
            fit_on["score"].tolist(), fit_on["backdoored"].astype(int).tolist()
        )
        for name in [ALL, *families]:
            group = own if name == ALL else own[(~own["backdoored"]) | (own["family"] == name)]
            figures = group_figures(group, calibration, evaluation_ids, resamples, seed)
            rows.append({"inspector": inspector, "family": name, **figures})
    return rows, sorted(calibration_ids)


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], name: str, jobs: int, failed: int) -> str:
    lines = [
        f"# Population {name}: detection over models",
        "",
        f"{jobs} inspections scored, {failed} failed. AUROC [bootstrap 95 % interval]; CE: "
        "TrojAI's cross-entropy on the evaluation half, calibrated on the calibration half; "
        "TPR at 5 % FPR; target acc.: flagged backdoored models whose first flagged label is "
        "the target (how many flagged); clean flagged: share of clean models flagged; "
        "s/model: inspection seconds per model.",
        "",
        "| inspector | family | clean | backdoored | AUROC [95 % CI] | CE | TPR@5%FPR | "
        "target acc. (flagged) | clean flagged | s/model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['inspector']} | {r['family']} | {r['clean']} | {r['backdoored']} | "
            f"{_number(r['auroc'])} [{_number(r['auroc_low'])}, {_number(r['auroc_high'])}] | "
            f"{_number(r['cross_entropy'])} | {_number(r['tpr_at_fpr_5'])} | "
            f"{_number(r['target_accuracy'])} ({r['flagged_backdoored']}) | "
            f"{_number(r['flagged_clean_share'])} | {_number(r['seconds_per_model'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


def roc_plot(table: Any, path: Path) -> Path:
    """One ROC curve per inspector over all models."""
    from sklearn.metrics import roc_curve

    from bdrun.report.plots import figure, save

    fig, ax = figure(figsize=(5, 5))
    for inspector in sorted(set(table["inspector"])):
        own = table[(table["inspector"] == inspector) & table["score"].notna()]
        if own["backdoored"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(own["backdoored"].astype(int), own["score"])
        auc = ds.roc_auc(own["score"].tolist(), own["backdoored"].astype(int).tolist())
        ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{inspector} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (clean models flagged)")
    ax.set_ylabel("true positive rate (backdoored models flagged)")
    ax.set_title("model inspectors over the population")
    ax.legend(loc="lower right", fontsize="small")
    return save(fig, path)


def score_population(root: str | Path, logger: dict[str, Any] | None = None) -> PopulationScores:
    """Score the population folder `root` and write the files of the module docstring there;
    a folder without population runs is a one-line BdrunError."""
    root = Path(root)
    frame = load_runs(root)
    table = job_table(frame)
    if table.empty:
        raise BdrunError(
            f"no finished population runs under {root}; run one first (bdrun-population NAME)"
        )
    failed = int((frame["status"] != "done").sum())
    seed = int(frame["config.population.seed"].dropna().iloc[0])
    resamples = int(frame.get("config.population.bootstrap", [1000]).dropna().iloc[0])
    name = str(frame["config.population.name"].dropna().iloc[0])
    rows, calibration_ids = score_table(table, seed, resamples)
    models = table.drop_duplicates("model_id").sort_values("model_id")
    truth = [
        {
            "model_id": m.model_id,
            "backdoored": bool(m.backdoored),
            "family": m.family,
            "target": None if m.target is None or m.target != m.target else int(m.target),
        }
        for m in models.itertuples()
    ]
    result = PopulationScores(root, rows, len(table), failed)
    result.files.append(write_rows_csv(root / TABLE_CSV, rows))
    jobs = table.assign(flagged_labels=table["flagged_labels"].map(_flags))
    result.files.append(write_rows_csv(root / MODELS_CSV, jobs.to_dict("records")))
    result.files.append(write_rows_csv(root / GROUND_TRUTH_CSV, truth))
    with atomic_file(root / TABLE_MD) as tmp:
        tmp.write_text(markdown(rows, name, len(table), failed))
    result.files.append(root / TABLE_MD)
    write_json_atomic(
        root / SCORES_JSON,
        {
            "population": name,
            "seed": seed,
            "bootstrap": resamples,
            "jobs": len(table),
            "failed": failed,
            "calibration_models": calibration_ids,
            "scores": rows,
        },
    )
    result.files.append(root / SCORES_JSON)
    result.files.append(roc_plot(table, root / ROC_PNG))
    log_to_wandb(result, logger)
    return result


def log_to_wandb(result: PopulationScores, logger: dict[str, Any] | None) -> None:
    """With a wandb logger: the score table and the ROC plot in a "population" run."""
    node = dict(logger or {})
    if node.pop("kind", None) != "wandb":
        return
    try:
        from bdrun.loggers import WandbRunLogger, sweep_group

        node["group"] = node.get("group") or sweep_group(result.root)
        node["name"] = "population"
        folder = result.root / WANDB_DIR
        folder.mkdir(exist_ok=True)
        run = WandbRunLogger(folder, {"population_dir": str(result.root)}, **node)
        try:
            rows = json.loads(json.dumps(result.rows, default=str))
            columns = list(rows[0])
            run.log_table("population", columns, [[r.get(c) for c in columns] for r in rows])
            run.log_image("population/roc", result.root / ROC_PNG)
        finally:
            run.finish()
    except Exception as err:  # wandb must never fail a population
        log.warning("wandb population scores not logged: %s", err)
