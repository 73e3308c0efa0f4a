"""NeuronInspect's anomaly index on Fashion-MNIST BadNets and clean models over seeds, with the
paper's saliency heatmaps and with SmoothGrad's (Smilkov et al. 2017).

The study behind the strict xfail in tests/test_defense_neuron_inspect.py: does either
explanation flag the BadNets target (index > 2) while flagging nothing on a clean model? Each
model is trained once (or read from $BDRUN_CACHE); the defense runs as `bdrun
defense=neuron_inspect defense.explanation=...` would run it.

    BDRUN_CACHE=/path/to/cache python scripts/experiments/neuron_inspect_seeds.py \
        --seeds 0 1 2 --explanations saliency smoothgrad
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from bdrun.cli import CONF_DIR
from bdrun.config import component
from bdrun.runner import prepare
from bdrun.training import torch_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--explanations", nargs="+", default=["saliency", "smoothgrad"])
    parser.add_argument("--noise", type=float, default=0.1, help="SmoothGrad's noise")
    args = parser.parse_args()
    with torch_threads(None):
        for seed in args.seeds:
            for attack in ("badnets", "none"):
                overrides = ["dataset=fashion_mnist", f"attack={attack}", f"seed={seed}"]
                with initialize_config_dir(version_base=None, config_dir=CONF_DIR):
                    cfg = compose("config", overrides=[*overrides, "logger=none"])
                with tempfile.TemporaryDirectory() as run_dir:
                    prepared = prepare(cfg, Path(run_dir))
                    for explanation in args.explanations:
                        defense = component(
                            "defense",
                            "neuron_inspect",
                            explanation=explanation,
                            smoothgrad_noise=args.noise,
                        )
                        verdict = defense.analyse(
                            prepared.model, prepared.data.holdout, prepared.ctx.for_defense()
                        )
                        index = [round(v, 2) for v in verdict.anomaly_index]
                        print(f"seed {seed} attack={attack:7s} {explanation}: {index}", flush=True)


if __name__ == "__main__":
    main()
