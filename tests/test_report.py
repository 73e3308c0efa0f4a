"""Aggregation of a folder of runs: rows, mean ± std over seeds, heatmap grids, attack x defense
matrix, failed and missing jobs, and the `bdrun-report` command (hand-made run folders, so
every expected figure is computed by hand)."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bdrun.report.collect import collect
from bdrun.report.summary import summarize
from bdrun.report.table import seed_groups, swept_parameters

from conftest import REPO


def make_run(
    folder: Path,
    overrides: list[str],
    cca: float,
    asr: float,
    attack: str = "badnets",
    defense: str = "fine_pruning",
    seed: int = 0,
    detection: dict | None = None,
) -> Path:
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {
        "before": {"cca": 0.99, "asr": 1.0, "ra": 0.0},
        "after": {"cca": cca, "asr": asr, "ra": 1 - asr},
    }
    if detection:
        metrics["detection"] = detection
    results = {
        "dataset": "digits",
        "model": "small_cnn",
        "attack": attack,
        "defense": defense,
        "seed": seed,
        "metrics": metrics,
        "timing": {"train_s": 1.0, "defense_s": 2.0, "total_s": 3.5},
        "cache": {"model": "hit"},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def fine_pruning_sweep(root: Path) -> dict[tuple[str, str, int], tuple[float, float]]:
    """lr x prune_ratio x seed; CCA and ASR are simple functions of the three."""
    values = {}
    job = 0
    for lr in ("1e-2", "1e-3"):
        for ratio in ("0.1", "0.5", "0.9"):
            for seed in (0, 1, 2):
                cca = 0.9 - float(ratio) / 10 + seed / 100
                asr = 1.0 - float(ratio) + (0.05 if lr == "1e-2" else 0.0) * seed / 2
                make_run(
                    root / str(job),
                    [f"defense.lr={lr}", f"defense.prune_ratio={ratio}", f"seed={seed}"],
                    cca,
                    asr,
                    seed=seed,
                    detection={
                        "auroc": 0.5 + seed / 10,
                        "model_flagged": True,
                        "flagged_labels": [0],
                    },
                )
                values[(lr, ratio, seed)] = (cca, asr)
                job += 1
    return values


def test_rows_groups_and_figures_of_a_sweep(tmp_path):
    values = fine_pruning_sweep(tmp_path)
    summary = summarize(tmp_path)
    assert len(summary.records) == 18 and not summary.failed
    assert summary.swept == ["defense.lr", "defense.prune_ratio", "seed"]

    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    first = rows[0]
    assert (first["defense.lr"], first["defense.prune_ratio"], first["seed"]) == (
        "1e-2",
        "0.1",
        "0",
    )
    assert float(first["after_cca"]) == pytest.approx(values[("1e-2", "0.1", 0)][0])
    assert float(first["detection_auroc"]) == pytest.approx(0.5)
    assert first["detection_model_flagged"] == "1" and "detection_flagged_labels" not in first
    assert float(first["total_s"]) == 3.5

    with open(tmp_path / "summary_seeds.csv") as f:
        groups = {(g["defense.lr"], g["defense.prune_ratio"]): g for g in csv.DictReader(f)}
    assert len(groups) == 6
    g = groups[("1e-2", "0.5")]
    asrs = [values[("1e-2", "0.5", s)][1] for s in (0, 1, 2)]
    assert int(g["n"]) == 3
    assert float(g["after_asr_mean"]) == pytest.approx(statistics.fmean(asrs))
    assert float(g["after_asr_std"]) == pytest.approx(statistics.stdev(asrs))
    assert float(groups[("1e-3", "0.5")]["after_asr_std"]) == pytest.approx(0.0)

    md = (tmp_path / "summary.md").read_text()
    assert "## Mean ± std over seeds" in md
    mean, std = 100 * statistics.fmean(asrs), 100 * statistics.stdev(asrs)
    assert f"{mean:.2f} ± {std:.2f}" in md
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == [
        "heatmap_asr_defense.lr_x_defense.prune_ratio.png",
        "heatmap_cca_defense.lr_x_defense.prune_ratio.png",
    ]
    assert all(f"figures/{name}" in md for name in figures)
    # no attack x defense matrix: one attack, one defense
    assert "Attack x defense" not in md


def test_heatmap_cells_are_seed_means(tmp_path, monkeypatch):
    values = fine_pruning_sweep(tmp_path)
    grids = []

    def capture(grid, rows, cols, row_name, col_name, title, path, **kwargs):
        grids.append((title, rows, cols, grid))
        return Path(path)

    monkeypatch.setattr("bdrun.report.heatmaps.heatmap", capture)
    summarize(tmp_path)
    (title, rows, cols, grid) = next(g for g in grids if g[0] == "CCA after")
    assert (rows, cols) == (["1e-3", "1e-2"], ["0.1", "0.5", "0.9"])  # numeric order
    expected = statistics.fmean(values[("1e-2", "0.9", s)][0] for s in (0, 1, 2))
    assert grid[1][2] == pytest.approx(expected)


def test_attack_by_defense_matrix(tmp_path):
    cells = {}
    job = 0
    for attack in ("badnets", "blend"):
        for defense in ("none", "fine_pruning", "strip"):
            for seed in (0, 1):
                asr = {"none": 1.0, "fine_pruning": 0.2, "strip": 0.1}[defense] - seed / 10
                auroc = 0.9 + seed / 20 if defense == "strip" else None
                make_run(
                    tmp_path / str(job),
                    [f"attack={attack}", f"defense={defense}", f"seed={seed}"],
                    0.95,
                    asr,
                    attack=attack,
                    defense=defense,
                    seed=seed,
                    detection={"auroc": auroc, "frr": 0.01} if auroc else None,
                )
                cells.setdefault((attack, defense), []).append(asr)
                job += 1
    summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "## Attack x defense" in md
    section = md.split("## Attack x defense")[1].splitlines()
    assert section[2] == "| attack \\ defense | none | fine_pruning | strip |"
    line = next(ln for ln in section if ln.startswith("| blend |"))
    asrs = cells[("blend", "fine_pruning")]
    assert f"95.0 / {100 * statistics.fmean(asrs):.1f}" in line.split("|")[3]
    assert "AUROC" not in line.split("|")[3]
    assert f"; AUROC 0.925 ±{statistics.stdev([0.9, 0.95]):.3f}" in line.split("|")[4]
    with open(tmp_path / "figures" / "matrix.csv") as f:
        matrix = {(r["attack"], r["defense"]): r for r in csv.DictReader(f)}
    assert len(matrix) == 6
    assert float(matrix[("badnets", "strip")]["after_asr"]) == pytest.approx(
        statistics.fmean(cells[("badnets", "strip")])
    )
    assert float(matrix[("badnets", "strip")]["detection_auroc"]) == pytest.approx(0.925)
    assert matrix[("badnets", "none")]["detection_auroc"] == ""
    assert (tmp_path / "figures" / "matrix_asr.png").stat().st_size > 0


def test_failed_and_missing_jobs_are_listed(tmp_path):
    make_run(tmp_path / "0", ["train.lr=0.1"], 0.9, 1.0)
    failed = tmp_path / "1"
    failed.mkdir()
    (failed / "error.json").write_text(
        json.dumps({"job": 1, "overrides": ["train.lr=-1"], "error": "train.lr > 0"})
    )
    expected = [["train.lr=0.1"], ["train.lr=-1"], ["train.lr=0.01"]]
    summary = summarize(tmp_path, expected)
    status = {r.job_num: (r.status, r.error) for r in summary.records}
    assert status[0] == ("done", None)
    assert status[1] == ("failed", "train.lr > 0")
    assert status[2][0] == "missing" and "did not finish" in status[2][1]
    md = (tmp_path / "summary.md").read_text()
    assert "- job 1 `train.lr=-1`" in md and "- job 2 `train.lr=0.01`" in md


def test_swept_parameters_ignore_constants():
    from bdrun.report.collect import JobRecord

    records = [
        JobRecord("done", ["debug=smoke", "seed=0", "+defense@defense_stack.strip=strip"]),
        JobRecord("done", ["debug=smoke", "seed=1"]),
    ]
    assert swept_parameters(records) == ["seed", "defense@defense_stack.strip"]


def test_bdrun_report_rebuilds_from_any_folder(tmp_path):
    fine_pruning_sweep(tmp_path / "sweep")
    result = subprocess.run(
        [sys.executable, "-m", "bdrun.report.cli", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "18 of 18 jobs done" in result.stdout
    assert len(collect(tmp_path)) == 18
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["job"] for r in rows} == {str(i) for i in range(18)}
    assert len(seed_groups(rows, ["defense.lr", "defense.prune_ratio", "seed"])) == 6

    empty = subprocess.run(
        [sys.executable, "-m", "bdrun.report.cli", str(tmp_path / "sweep" / "0" / ".hydra")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 2 and "no run folders" in empty.stderr


def test_bdrun_report_is_a_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bdrun-report"] == "bdrun.report.cli:main"


def test_a_degenerate_model_is_marked_in_the_run_and_sweep_summaries(tmp_path):
    from rich.console import Console

    from bdrun.report.console import print_summary

    degenerate = {"cca": 0.102, "asr": 1.0, "ra": 0.0, "top_label_share": 1.0, "degenerate": True}
    results = {
        "dataset": "digits",
        "model": "small_cnn",
        "attack": "badnets",
        "defense": "finetune",
        "seed": 0,
        "metrics": {"before": {"cca": 0.98, "asr": 1.0, "ra": 0.0}, "after": degenerate},
        "timing": {"train_s": 1.0, "defense_s": 1.0, "total_s": 2.0},
        "cache": {"model": "hit"},
    }
    console = Console(record=True, width=200)
    print_summary(results, tmp_path, console)
    text = console.export_text()
    assert "100.00% (degenerate)" in text and "100.00% │" in text  # only the after ASR
    assert "warning: the model after the defense gives one label to 100.0 %" in text

    folder = make_run(tmp_path / "sweep" / "0", ["defense.lr=1000"], 0.102, 1.0)
    written = json.loads((folder / "results.json").read_text())
    written["metrics"]["after"].update(degenerate)
    (folder / "results.json").write_text(json.dumps(written))
    make_run(tmp_path / "sweep" / "1", ["defense.lr=0.01"], 0.97, 0.05)
    summary = summarize(tmp_path / "sweep", figures=False)
    markdown = (summary.root / "summary.md").read_text()
    assert markdown.count("100.00 (degenerate)") == 1  # the after ASR of job 0 only
    assert "Jobs 0: a degenerate model" in markdown
