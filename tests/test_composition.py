"""Stacked defenses (`defense=[a,b]`): every stage of every defense runs, in order, and an input
the detector rejects counts as defended against the repaired or retrained model."""

from __future__ import annotations

import json

from bdrun.runner import run

from conftest import compose_config, run_bdrun

SMALL = ("logger=none", "train.epochs=6")


def stacked(*names: str) -> tuple[str, ...]:
    """The overrides bdrun.cli writes for defense=[names...]."""
    first, *rest = names
    return (f"defense={first}", *(f"+defense@defense_stack.{n}={n}" for n in rest))


def test_cli_stack_of_none_and_strip(tmp_path):
    proc = run_bdrun(
        "defense=[none,strip]", "debug=smoke", "logger=none", "hydra.run.dir=run", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["defense"] == "none+strip"
    assert {"auroc", "far", "frr", "threshold"} <= set(results["metrics"]["detection"])
    assert (tmp_path / "run" / "strip_entropy.png").is_file()


def test_fine_pruned_model_behind_strip(tmp_path):
    """The mission's composition: the repaired model behind the STRIP filter. A rejected input
    counts as defended on the backdoor set and as wrong on the clean set, so against the repaired
    model alone the stack can only lower both ASR and CCA."""
    results = run(compose_config(*stacked("fine_pruning", "strip"), *SMALL), tmp_path / "stack")
    assert results["defense"] == "fine_pruning+strip"
    after, detection = results["metrics"]["after"], results["metrics"]["detection"]
    assert {"pruned_channels", "auroc", "far", "frr"} <= set(detection)
    assert after["asr"] <= detection["far"] + 1e-9
    alone = run(compose_config("defense=fine_pruning", *SMALL), tmp_path / "alone")
    assert after["asr"] <= alone["metrics"]["after"]["asr"]
    assert after["cca"] <= alone["metrics"]["after"]["cca"]
    assert alone["metrics"]["detection"]["pruned_channels"] == detection["pruned_channels"]


def test_retrained_model_behind_strip(tmp_path):
    results = run(compose_config(*stacked("spectral", "strip"), *SMALL), tmp_path)
    assert results["defense"] == "spectral+strip"
    detection = results["metrics"]["detection"]
    # both defenses report: the inspector's removal and the detector's quality
    assert {"precision", "recall", "removed", "auroc", "far", "frr"} <= set(detection)
    after = results["metrics"]["after"]
    # ASR counts only trojaned inputs STRIP let through (to the retrained model)
    assert after["asr"] <= detection["far"] + 1e-9
    alone = run(compose_config("defense=spectral", *SMALL), tmp_path / "alone")
    assert after["asr"] <= alone["metrics"]["after"]["asr"]
    assert alone["metrics"]["detection"]["removed"] == detection["removed"]


def test_abl_model_behind_strip(tmp_path):
    cfg = compose_config(*stacked("abl", "strip"), *SMALL, "defense.isolation_epochs=3")
    results = run(cfg, tmp_path)
    assert results["defense"] == "abl+strip"
    after, detection = results["metrics"]["after"], results["metrics"]["detection"]
    assert after["asr"] <= detection["far"] + 1e-9
    assert {"precision", "auroc"} <= set(detection)
