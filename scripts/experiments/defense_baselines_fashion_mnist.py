"""The field's current defense baselines on Fashion-MNIST with the small CNN with BatchNorm
(docs/defenses/baselines_fashion_mnist.md): ANP, i-BAU, CLP, RNP, FT-SAM, SAU, FST, SCALE-UP and
IBD-PSC at their defaults, against BadNets, Blend, WaNet and SIG.

`bdrun -m` sweeps, one torch thread per job (two sweeps at a time with `--only`, one per
core, the expensive defenses apart from the cheap ones):
- BadNets with seeds 0, 1 and 2: mean ± std against the issue's bars (ASR <= 10 % at a CCA
  drop of at most 5 points for the repairs, AUROC >= 0.9 for the detectors);
- Blend, WaNet and SIG with seed 0.
SAU runs 10 of its 100 epochs (SAU_EPOCHS: compute, not tuning). `bdrun-report` on the
script's output folder gives the attack x defense matrix over all of them (the BadNets row a
mean over the seeds). With a GPU the whole table is one command:
`bdrun -m dataset=fashion_mnist model=small_cnn_bn attack=badnets,blend,wanet,sig
defense=none,anp,i_bau,clp,rnp,ft_sam,sau,fst,scale_up,ibd_psc seed=0,1,2`.
Every defense decides on the 5 % clean holdout; the test sets only score. Needs Fashion-MNIST
(Debian's dataset-fashion-mnist). Each poisoned model is trained once (the model cache) and
reused by every defense.

    .venv/bin/python scripts/experiments/defense_baselines_fashion_mnist.py --dry-run
"""

from __future__ import annotations

import statistics

from measure import Sweep, measured_runs, metric, num, pct, show

REPAIRS = ("anp", "i_bau", "clp", "rnp", "ft_sam", "sau", "fst")
DETECTORS = ("scale_up", "ibd_psc")
DEFENSES = (*REPAIRS, *DETECTORS)
ATTACKS = ("badnets", "blend", "wanet", "sig")
BASE = ("dataset=fashion_mnist", "model=small_cnn_bn")
ASR_BAR, CCA_DROP_BAR, AUROC_BAR = 0.10, 0.05, 0.9

CHEAP = ("none", "i_bau", "clp", "rnp", "fst", "scale_up", "ibd_psc")
# SAU at the authors' 100 epochs is about an hour of one CPU core per Fashion-MNIST model here
# (5 PGD steps through two models per batch); the sweeps give it 10 epochs and say so.
SAU_EPOCHS = "defense.n_rounds=10"

SWEEPS = [
    Sweep("badnets-cheap", (*BASE, "attack=badnets", f"defense={','.join(CHEAP)}", "seed=0,1,2")),
    Sweep("badnets-anp-ft_sam", (*BASE, "attack=badnets", "seed=0,1,2", "defense=anp,ft_sam")),
    Sweep("badnets-sau", (*BASE, "attack=badnets", "seed=0,1,2", "defense=sau", SAU_EPOCHS)),
    # The jobs of badnets-anp-ft_sam (run in that order) that the first session's stop cut off;
    # a sweep does not resume, so these finish it without repeating the finished ones.
    Sweep("badnets-anp-seed2", (*BASE, "attack=badnets", "seed=2", "defense=anp")),
    Sweep("badnets-ft_sam-seeds12", (*BASE, "attack=badnets", "seed=1,2", "defense=ft_sam")),
    Sweep(
        "others-cheap", (*BASE, "attack=blend,wanet,sig", f"defense={','.join(CHEAP)}", "seed=0")
    ),
    Sweep("others-anp-ft_sam", (*BASE, "attack=blend,wanet,sig", "defense=anp,ft_sam", "seed=0")),
    Sweep("others-sau", (*BASE, "attack=blend,wanet,sig", "defense=sau", SAU_EPOCHS, "seed=0")),
]


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sample std (scaled), '-' when empty."""
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    std = (statistics.stdev(values) if len(values) > 1 else 0.0) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    done = [r.results for sweep in runs.values() for r in sweep if r.results is not None]

    def jobs(attack: str, defense: str) -> list[dict]:
        return [r for r in done if r["attack"] == attack and r["defense"] == defense]

    rows = []
    for attack in ATTACKS:
        for defense in ("none", *DEFENSES):
            for results in sorted(jobs(attack, defense), key=lambda r: r["seed"]):
                rows.append(
                    [
                        attack,
                        defense,
                        results["seed"],
                        pct(metric(results, "before", "cca"), 2),
                        pct(metric(results, "after", "cca"), 2),
                        pct(metric(results, "before", "asr"), 2),
                        pct(metric(results, "after", "asr"), 2),
                        num(metric(results, "detection", "auroc"), 3),
                        num(results["timing"]["defense_s"], 1),
                    ]
                )
    header = ["attack", "defense", "seed", "CCA before", "CCA after", "ASR before", "ASR after",
              "AUROC", "defense s"]  # fmt: skip
    show("Every job (%, seconds of the defense stage)", header, rows)

    bars = []
    for defense in DEFENSES:
        seeds = jobs("badnets", defense)
        drops = [r["metrics"]["before"]["cca"] - r["metrics"]["after"]["cca"] for r in seeds]
        asrs = [r["metrics"]["after"]["asr"] for r in seeds]
        aurocs = [metric(r, "detection", "auroc") for r in seeds]
        aurocs = [a for a in aurocs if a is not None]
        if defense in REPAIRS:
            passed = sum(
                a <= ASR_BAR and d <= CCA_DROP_BAR for a, d in zip(asrs, drops, strict=True)
            )
        else:
            passed = sum(a >= AUROC_BAR for a in aurocs)
        bars.append(
            [defense, len(seeds), spread(drops), spread(asrs), spread(aurocs, 1.0, 3),
             f"{passed} of {len(seeds)}"]
        )  # fmt: skip
    header = ["defense", "seeds", "CCA drop (points)", "ASR after", "AUROC", "seeds at the bar"]
    show("BadNets, mean ± std over seeds 0, 1, 2", header, bars)


if __name__ == "__main__":
    main()
