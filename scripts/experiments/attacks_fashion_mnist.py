"""The field's current attacks on Fashion-MNIST with the small CNN at their defaults
(docs/attacks/fashion_mnist.md, partly run): BPP, FTrojan, LF, Blind, Refool, Adaptive-Blend,
Adaptive-Patch and Narcissus against the clean model, against the latent-separation defenses,
and against the course's classic defenses.

`bdrun -m` sweeps, seed 0, one torch thread per job (run two of them at a time with `--only`,
one per core):
- `undefended`: each attack and the clean baseline with `defense=none`; the issue's bars are
  ASR >= 95 % at a CCA drop of at most 2 points for the dirty-label attacks, ASR >= 80 % for
  the clean-label ones (Refool, Narcissus);
- `separation`: Adaptive-Blend, Adaptive-Patch and BadNets against `spectral` and
  `activation_clustering` (isolation precision and recall: the evasion is the point);
- `separation_paper`: the same three against spectral signatures as Tran et al.'s Algorithm 1
  has it (`centre=class scope=per_class`; bdrun's default centres on the clean holdout and
  ranks over all classes), the variant Qi et al. evaluate against;
- `classic`: every new attack against fine_pruning, neural_cleanse, strip and abl, whose
  `bdrun-report` matrix goes on the page.
Each poisoned model is trained once (the model cache) and reused by every defense. Needs
Fashion-MNIST (Debian's dataset-fashion-mnist).

    .venv/bin/python scripts/experiments/attacks_fashion_mnist.py --dry-run
"""

from __future__ import annotations

from typing import Any

from measure import Sweep, measured_runs, metric, num, pct, pick, show

from bdrun.report.collect import JobRecord

NEW_ATTACKS = (
    "bpp", "ftrojan", "lf", "blind", "refool", "adaptive_blend", "adaptive_patch", "narcissus",
)  # fmt: skip
CLEAN_LABEL = ("refool", "narcissus")
ADAPTIVE = ("adaptive_blend", "adaptive_patch")
SEPARATION = ("spectral", "activation_clustering")
CLASSIC = ("fine_pruning", "neural_cleanse", "strip", "abl")
BASE = ("dataset=fashion_mnist", "seed=0")
CCA_DROP_BAR = 0.02
ASR_BAR = {"dirty": 0.95, "clean": 0.80}

SWEEPS = [
    Sweep("undefended", (*BASE, f"attack=none,{','.join(NEW_ATTACKS)}", "defense=none")),
    Sweep(
        "separation",
        (*BASE, f"attack=badnets,{','.join(ADAPTIVE)}", f"defense={','.join(SEPARATION)}"),
    ),
    Sweep(
        "separation_paper",
        (
            *BASE,
            f"attack=badnets,{','.join(ADAPTIVE)}",
            "defense=spectral",
            "defense.centre=class",
            "defense.scope=per_class",
        ),
    ),
    Sweep("classic", (*BASE, f"attack={','.join(NEW_ATTACKS)}", f"defense={','.join(CLASSIC)}")),
]


def undefended(runs: dict[str, list[JobRecord]], attack: str) -> tuple[dict[str, Any] | None, str]:
    """An attack's results for the undefended row and where they come from: its `undefended`
    job, else the first finished job of another sweep with that attack. Every sweep shares the
    model cache, so that job's `before` figures score the same trained model, undefended."""
    results = pick(runs["undefended"], attack=attack)
    if results is not None:
        return results, "undefended"
    for sweep in ("separation", "separation_paper", "classic"):
        for record in runs[sweep]:
            if record.results is not None and record.params.get("attack") == attack:
                return record.results, f"{sweep} ({record.params.get('defense')})"
    return None, "-"


def yes_no(flag: bool | None) -> str:
    """A verdict for a table ('-' where there is none)."""
    return "-" if flag is None else ("yes" if flag else "no")


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    clean = pick(runs["undefended"], attack="none")
    clean_cca = metric(clean, "before", "cca")
    rows = []
    for attack in NEW_ATTACKS:
        results, source = undefended(runs, attack)
        cca, asr = metric(results, "before", "cca"), metric(results, "before", "asr")
        kind = "clean" if attack in CLEAN_LABEL else "dirty"
        drop = None if cca is None or clean_cca is None else clean_cca - cca
        met = yes_no(
            None if drop is None or asr is None else asr >= ASR_BAR[kind] and drop <= CCA_DROP_BAR
        )
        seconds = num(results["timing"]["total_s"], 0) if source == "undefended" else "-"
        rows.append([attack, kind, pct(cca), pct(drop), pct(asr), met, seconds, source])
    header = [
        "attack", "labels", "CCA", "CCA drop (points)", "ASR", "at the bar", "run s", "from",
    ]  # fmt: skip
    show(f"Undefended (clean model CCA {pct(clean_cca)} %)", header, rows)

    separation = [
        (attack, defense, pick(runs["separation"], attack=attack, defense=defense))
        for attack in ("badnets", *ADAPTIVE)
        for defense in SEPARATION
    ]
    separation += [
        (attack, "spectral (class mean, per class)", pick(runs["separation_paper"], attack=attack))
        for attack in ("badnets", *ADAPTIVE)
    ]
    rows = [
        [
            attack,
            defense,
            pct(metric(results, "detection", "precision")),
            pct(metric(results, "detection", "recall")),
            pct(metric(results, "before", "asr")),
            pct(metric(results, "after", "asr")),
        ]
        for attack, defense, results in separation
    ]
    header = ["attack", "defense", "precision", "recall", "ASR before", "ASR after"]
    show("Isolation by latent separation (%)", header, rows)

    rows = []
    for attack in NEW_ATTACKS:
        for defense in CLASSIC:
            results = pick(runs["classic"], attack=attack, defense=defense)
            rows.append(
                [
                    attack,
                    defense,
                    pct(metric(results, "before", "cca")),
                    pct(metric(results, "before", "asr")),
                    pct(metric(results, "after", "cca")),
                    pct(metric(results, "after", "asr")),
                    num(metric(results, "detection", "auroc"), 3),
                    yes_no(metric(results, "detection", "model_flagged")),
                    num(results["timing"]["defense_s"], 0) if results else "-",
                ]
            )
    header = [
        "attack", "defense", "CCA before", "ASR before", "CCA after", "ASR after", "AUROC",
        "model flagged", "defense s",
    ]  # fmt: skip
    show("Against the classic defenses (%)", header, rows)


if __name__ == "__main__":
    main()
