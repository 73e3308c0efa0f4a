"""The `bdrun` command end to end, from a folder that is not the repository."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_bdrun
from httpfixture import serving
from test_data import write_idx_set


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in cwd.glob("outputs/**/.hydra"))


def test_default_run_prints_the_table_and_writes_results(tmp_path):
    # its own cache: the model is a miss whichever test trained the default model before
    own_cache = {"BDRUN_CACHE": str(tmp_path / "cache")}
    proc = run_bdrun(cwd=tmp_path, env=own_cache)
    assert proc.returncode == 0, proc.stderr
    for text in (
        "CCA (clean acc.)",
        "ASR (attack success)",
        "RA (robust acc.)",
        "run folder:",
        "time: train",
    ):
        assert text in proc.stdout
    [folder] = run_folders(tmp_path)
    assert str(folder) in proc.stdout.replace("\n", "")
    results = json.loads((folder / "results.json").read_text())
    assert {
        "dataset",
        "model",
        "attack",
        "defense",
        "seed",
        "metrics",
        "timing",
        "cache",
        "config",
        "version",
    } <= set(results)
    assert (results["dataset"], results["model"], results["attack"], results["defense"]) == (
        "digits",
        "small_cnn",
        "badnets",
        "none",
    )
    for stage in ("before", "after"):
        figures = results["metrics"][stage]
        assert set(figures) == {"cca", "asr", "ra", "top_label_share", "degenerate"}
        assert all(0 <= figures[k] <= 1 for k in ("cca", "asr", "ra", "top_label_share"))
        assert figures["degenerate"] is False
    assert results["metrics"]["before"]["cca"] > 0.9 and results["metrics"]["before"]["asr"] > 0.9
    assert set(results["timing"]) == {"train_s", "defense_s", "total_s"}
    assert results["cache"] == {"model": "miss"}
    assert results["config"]["attack"]["poison_rate"] == 0.1
    assert results["version"].startswith("0.")

    # the same upstream config reuses the trained model; cache=false and refresh retrain
    hit = run_bdrun("logger=none", cwd=tmp_path, env=own_cache)
    assert hit.returncode == 0, hit.stderr
    statuses = {}
    for args in (("cache=false",), ("cache.refresh=true",)):
        proc = run_bdrun(*args, "logger=none", cwd=tmp_path, env=own_cache)
        assert proc.returncode == 0, proc.stderr
    for folder in run_folders(tmp_path):
        r = json.loads((folder / "results.json").read_text())
        statuses[folder] = r["cache"]["model"]
        assert r["metrics"]["before"] == results["metrics"]["before"]  # same seed, same numbers
    assert sorted(statuses.values()) == ["hit", "miss", "miss", "off"]


def test_help_lists_groups_and_options(tmp_path):
    proc = run_bdrun("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for text in (
        "dataset:",
        "attack:",
        "defense:",
        "trainer:",
        "logger:",
        "badnets",
        "fashion_mnist",
        "small_cnn",
        "cpu, ddp, gpu",
    ):
        assert text in proc.stdout, text


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_bdrun(
        "--cfg", "job", "attack=badnets_all2all", "dataset=fashion_mnist", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "label_mode: all2all" in proc.stdout
    assert "epochs: 6" in proc.stdout  # the per-dataset training preset was applied
    assert not (tmp_path / "outputs").exists()


def test_smoke_composition_runs_on_a_tiny_slice(tmp_path):
    proc = run_bdrun("debug=smoke", "dataset=fake", "attack=badnets_pixel", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [folder] = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["poison"]["train_size"] == 256 and results["config"]["train"]["epochs"] == 1


def write_h5(path, n=20, keys=("data", "label")):
    with h5py.File(path, "w") as f:
        f[keys[0]] = np.zeros((n, 8, 8, 3), np.float32)
        f[keys[1]] = np.arange(n) % 4


def bad_inputs(tmp_path: Path, server_url: str) -> dict[str, tuple[list[str], str]]:
    write_h5(tmp_path / "ok.h5")
    write_h5(tmp_path / "nokeys.h5", keys=("x", "y"))
    h5 = ["dataset=h5", "model=small_cnn"]
    return {
        "unknown option": (["attack=badnetz"], "unknown attack 'badnetz'; choose one of: "),
        "poison rate": (["attack.poison_rate=1.5"], "attack.poison_rate=1.5 must be in (0, 1]"),
        "target": (["attack.target=10"], "attack.target=10 is outside the 10 classes of digits"),
        "trojannn mask": (
            ["attack=trojannn", "attack.mask=circle"],
            "attack.mask='circle' must be one of square, watermark",
        ),
        "missing file": (
            [
                *h5,
                f"dataset.source.train_path={tmp_path}/nope.h5",
                f"dataset.source.test_path={tmp_path}/ok.h5",
            ],
            "h5 file not found",
        ),
        "h5 keys": (
            [
                *h5,
                f"dataset.source.train_path={tmp_path}/nokeys.h5",
                f"dataset.source.test_path={tmp_path}/ok.h5",
            ],
            "has no dataset 'data'",
        ),
        "h5 path unset": (["dataset=h5"], "dataset.source.train_path has no value"),
        "trigger too large": (["attack.size=9"], "does not fit 8x8 images"),
        "model too big": (["model=lenet"], "model lenet does not fit 1x8x8 inputs"),
        "checksum": (
            [
                "dataset=mnist",
                f"dataset.source.root={tmp_path}/data",
                f"dataset.source.mirrors=[{server_url}]",
            ],
            "checksum mismatch",
        ),
        "no gpu": (["trainer=gpu"], "no CUDA device"),
        "seed text": (["seed=abc"], "seed='abc' must be an integer, e.g. seed=0"),
        "seed float": (["seed=1.5"], "seed=1.5 must be an integer, e.g. seed=0"),
        "seed null": (["seed=null"], "seed=None must be an integer, e.g. seed=0"),
        "lr beyond float32": (["train.lr=1e39"], "train.lr=1e+39 is out of range"),
        "run folder": (
            ["hydra.run.dir=/proc/nope"],
            "hydra.run.dir=/proc/nope cannot be created or written",
        ),
        "run folder is a file": (
            [f"hydra.run.dir={tmp_path}/fixtures/train-images-idx3-ubyte.gz"],
            "is a file, not a folder",
        ),
        "sweep folder": (
            ["-m", "hydra.sweep.dir=/proc/nope", "seed=0,1"],
            "hydra.sweep.dir=/proc/nope cannot be created or written",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown option",
        "poison rate",
        "target",
        "trojannn mask",
        "missing file",
        "h5 keys",
        "h5 path unset",
        "trigger too large",
        "model too big",
        "checksum",
        "no gpu",
        "seed text",
        "seed float",
        "seed null",
        "lr beyond float32",
        "run folder",
        "run folder is a file",
        "sweep folder",
    ],
)
def test_user_errors_end_in_one_line_and_leave_nothing(tmp_path, case):
    fixtures = tmp_path / "fixtures"
    write_idx_set(fixtures)
    files = {p.name: p.read_bytes() for p in fixtures.iterdir()}
    with serving(files) as server:
        args, message = bad_inputs(tmp_path, server.url("corrupt"))[case]
        if case == "checksum":  # the real checksums of our fixture files; the server corrupts them
            sums = ",".join(f"{name}:{hashlib.md5(b).hexdigest()}" for name, b in files.items())
            args.append(f"dataset.source.checksums={{{sums}}}")
        proc = run_bdrun(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bdrun: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]  # no partial download


def test_run_seed_takes_integers_only():
    from bdrun.errors import BdrunError
    from bdrun.training import run_seed

    # negative seeds are fine: they reach torch and sklearn only through derive_seed
    assert [run_seed(v) for v in (0, -1, 2**40, "7", 3.0)] == [0, -1, 2**40, 7, 3]
    for value, shown in (
        (True, "True"),
        (1.5, "1.5"),
        ("", "''"),
        ("0x10", "'0x10'"),
        ([1], "[1]"),
    ):
        with pytest.raises(BdrunError, match=rf"^seed={re.escape(shown)} must be an integer"):
            run_seed(value)


def test_only_a_training_in_lightnings_loop_imports_lightning(tmp_path):
    import os
    import subprocess
    import sys

    # Lightning takes seconds to import: a CPU run trains in the plain loop and a run whose
    # model is cached trains nothing, so neither imports it; trainer.loop=lightning does
    code = (
        "import sys; from bdrun.cli import main; sys.argv = ['bdrun', 'logger=csv', "
        f"'hydra.run.dir={tmp_path}/' + sys.argv[1], *sys.argv[2:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('lightning imported:', 'pytorch_lightning' in sys.modules)"
    )
    runs = {"first": [], "second": [], "lightning": ["trainer.loop=lightning", "cache=false"]}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code, name, *overrides],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "BDRUN_CACHE": str(tmp_path / "cache")},  # first run: a miss
        ).stdout
        for name, overrides in runs.items()
    ]
    assert "lightning imported: False" in outputs[0]  # it trained
    assert "lightning imported: False" in outputs[1]
    assert "lightning imported: True" in outputs[2]
    # the same training curves, to the digit
    curves = [
        (tmp_path / name / "train" / "metrics.csv").read_text() for name in ("first", "lightning")
    ]
    assert curves[0] == curves[1] and curves[0].startswith("epoch,step,train/acc,train/loss\n")
    assert not (tmp_path / "second" / "train").exists()  # nothing trained
    assert json.loads((tmp_path / "second" / "results.json").read_text())["cache"] == {
        "model": "hit"
    }
