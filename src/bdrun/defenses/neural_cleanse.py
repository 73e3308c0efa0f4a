"""Neural Cleanse (Wang et al. 2019): reverse-engineer triggers, flag outlier labels, mitigate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from bdrun.data.base import ImageSet, to_float, to_storage
from bdrun.defenses.anomaly import flagged_labels, mad_anomaly_index
from bdrun.defenses.base import (
    NOTHING_CARRIED,
    Carried,
    Defense,
    InputDetector,
    Verdict,
    frr_threshold,
)
from bdrun.defenses.finetune import finetune
from bdrun.defenses.pruning import (
    PruneSite,
    chunks,
    copy_model,
    make_permanent,
    mask_channels,
    masked_predictions,
    reduce_channels,
    resolve_site,
)
from bdrun.defenses.trigger_reversal import ReversalSettings, ReversedTriggers, reverse_triggers
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, on_device
from bdrun.models.probes import layer_outputs, penultimate
from bdrun.report.pruning_curve import write_pruning_curve
from bdrun.report.triggers import plot_reversed_triggers, save_triggers
from bdrun.validate import check_schedule, coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

MITIGATIONS = ("none", "unlearning", "pruning", "filter")


class ActivationFilter(InputDetector):
    """Neural Cleanse's input filter: the mean activation of the neurons the reversed trigger
    excites most; inputs above the threshold (set at a false-positive rate on clean holdout
    data) are rejected."""

    def __init__(self, scorer: Any, neurons: Tensor, threshold: float) -> None:
        self.scorer, self.neurons, self.threshold = scorer, neurons, threshold

    def score(self, x: Tensor) -> Tensor:
        return self.scorer(x)[:, self.neurons].mean(1)


class NeuralCleanse(Defense):
    """Reverse-engineer a minimal trigger per label, flag labels whose trigger is anomalously
    small (MAD outlier test), and optionally mitigate the flagged backdoor.

    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks"
    (IEEE S&P 2019). Reverse-engineering: see bdrun.defenses.trigger_reversal (authors' defaults,
    labels optimised `label_batch` at a time on the clean holdout: 1 on CPU, 16 on GPU unless
    set). Detection: L1 norm of each mask, anomaly index by MAD (constant 1.4826), flag index >
    `anomaly_threshold` (2) on the small side; the model is flagged when any label is.
    Mitigations (Sec. VI), using only the reversed triggers of the flagged labels, never the
    real one:

    - unlearning: stamp a reversed trigger on `unlearn_fraction` (20 %, the paper) of the clean
      holdout, keep the true labels, and fine-tune `epochs` (1, the paper) with `lr`;
    - pruning: rank neurons of `neuron_layer` (the penultimate layer, the paper's "second to
      last") by their mean activation gap between reversed-trigger and clean holdout inputs and
      prune the largest gaps first until the reversed trigger succeeds on at most
      `prune_target` of the holdout, without letting holdout accuracy fall more than
      `acc_drop` (pruned neurons are masked with torch's pruning utilities);
    - filter: a run-time detector on the mean activation of the top `filter_top` (1 %) of those
      neurons, threshold at `filter_fpr` (5 %) false positives on the clean holdout.

    Parameters:
        mitigation: none | unlearning | pruning | filter.
        mitigate_unflagged: also mitigate with the smallest trigger when nothing is flagged
            (off: a model Neural Cleanse calls clean is returned unchanged).
        neuron_layer: penultimate, or prune_layer (the model's prune / rank conv layers).
        max_samples: reverse on at most this many holdout images (null: all).
        max_images: labels shown in reversed_triggers.png (smallest norms first).
        mask_lr, init_cost, steps, samples_per_step, batch_size, attack_succ_threshold,
        patience, cost_multiplier, early_stop, early_stop_threshold, early_stop_patience,
        label_batch: reverse-engineering settings (bdrun.defenses.trigger_reversal).
    """

    def __init__(
        self,
        mitigation: str,
        mitigate_unflagged: bool,
        anomaly_threshold: float,
        consistency: float,
        lr: float,
        epochs: int,
        unlearn_fraction: float,
        neuron_layer: str,
        prune_target: float,
        acc_drop: float,
        filter_top: float,
        filter_fpr: float,
        max_samples: int | None,
        max_images: int,
        mask_lr: float,
        init_cost: float,
        beta1: float,
        beta2: float,
        steps: int,
        samples_per_step: int,
        batch_size: int,
        attack_succ_threshold: float,
        patience: int,
        cost_multiplier: float,
        early_stop: bool,
        early_stop_threshold: float,
        early_stop_patience: int,
        epsilon: float,
        label_batch: int | None,
    ) -> None:
        if mitigation not in MITIGATIONS:
            raise BdrunError(
                f"defense.mitigation={mitigation!r} must be one of {', '.join(MITIGATIONS)}"
            )
        if neuron_layer not in ("penultimate", "prune_layer"):
            raise BdrunError(
                f"defense.neuron_layer={neuron_layer!r} must be penultimate or prune_layer"
            )
        self.mitigation = mitigation
        self.mitigate_unflagged = bool(mitigate_unflagged)
        self.anomaly_threshold = coerce(anomaly_threshold, "float", "defense.anomaly_threshold")
        self.consistency = coerce(consistency, "float", "defense.consistency")
        self.lr, self.epochs = check_schedule(lr, epochs)
        self.unlearn_fraction = fraction(unlearn_fraction, "defense.unlearn_fraction")
        self.neuron_layer = neuron_layer
        self.prune_target = fraction(prune_target, "defense.prune_target")
        self.acc_drop = fraction(acc_drop, "defense.acc_drop")
        self.filter_top = fraction(filter_top, "defense.filter_top")
        self.filter_fpr = fraction(filter_fpr, "defense.filter_fpr")
        self.max_samples = (
            None if max_samples is None else coerce(max_samples, "int", "defense.max_samples")
        )
        self.max_images = coerce(max_images, "int", "defense.max_images")
        self.settings = ReversalSettings.from_config(
            {
                "lr": mask_lr,
                "init_cost": init_cost,
                "beta1": beta1,
                "beta2": beta2,
                "steps": steps,
                "samples_per_step": samples_per_step,
                "batch_size": batch_size,
                "attack_succ_threshold": attack_succ_threshold,
                "patience": patience,
                "cost_multiplier": cost_multiplier,
                "early_stop": early_stop,
                "early_stop_threshold": early_stop_threshold,
                "early_stop_patience": early_stop_patience,
                "epsilon": epsilon,
                "label_batch": label_batch,
            }
        )

    # -- detection -----------------------------------------------------------------------------
    def analyse(self, model: nn.Module, holdout: ImageSet, ctx: RunContext) -> Verdict:
        """Reverse every label's trigger on the holdout and run the MAD outlier test; the
        verdict's evidence is the reversed triggers, its score the largest anomaly index."""
        x = holdout.random_subset(self.max_samples, ctx.generator("nc-samples")).x
        labels = torch.arange(ctx.info.num_classes)
        triggers = reverse_triggers(
            model, x, labels, self.settings, ctx.generator("nc-reverse"), ctx.device
        )
        model.to("cpu")
        index, median, mad = mad_anomaly_index(triggers.l1, self.consistency)
        flagged = flagged_labels(index, labels, self.anomaly_threshold)
        ctx.record(
            l1_norms=triggers.l1.tolist(),
            l1_median=median,
            l1_mad=mad,
            reverse_success=triggers.success.tolist(),
            reverse_s=triggers.seconds,
            seconds_per_label=triggers.seconds / len(labels),
            reverse_steps_mean=float(triggers.steps.double().mean()),
        )
        plot = plot_reversed_triggers(
            triggers.masks,
            triggers.patterns,
            labels.tolist(),
            triggers.l1.tolist(),
            index.tolist(),
            flagged,
            ctx.run_dir / "reversed_triggers.png",
            self.max_images,
        )
        ctx.logger.log_image("reversed_triggers", plot)
        save_triggers(
            triggers.masks,
            triggers.patterns,
            labels,
            triggers.l1,
            ctx.run_dir / "reversed_triggers.safetensors",
        )
        return Verdict(flagged, index.tolist(), float(index.max()), evidence=triggers)

    def mitigation_labels(self, verdict: Verdict) -> list[int]:
        """Labels whose reversed triggers drive the mitigation (the flagged ones)."""
        if verdict.flagged_labels:
            return list(verdict.flagged_labels)
        if self.mitigate_unflagged:
            return [int(torch.tensor(verdict.anomaly_index).argmax())]
        return []

    # -- stages ----------------------------------------------------------------------------------
    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict:
        return self.analyse(model, data.holdout, ctx)

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        verdict = self.own_verdict(carried)
        targets = self.mitigation_labels(verdict)
        ctx.record(mitigation=self.mitigation, mitigated_labels=targets)
        if not targets or self.mitigation in ("none", "filter"):
            return model
        if self.mitigation == "unlearning":
            return self.unlearn(model, data.holdout, ctx, verdict.evidence, targets)
        return self.prune_neurons(model, data, ctx, verdict.evidence, targets)

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector | None:
        if self.mitigation != "filter":
            return None
        verdict = self.own_verdict(carried)
        targets = self.mitigation_labels(verdict)
        if not targets:
            return None
        return self.build_filter(model, data, ctx, verdict.evidence, targets)

    @staticmethod
    def own_verdict(carried: Carried) -> Verdict:
        if carried.verdict is None:
            raise RuntimeError("Neural Cleanse mitigates with its own verdict (inspect_model)")
        return carried.verdict

    # -- mitigation helpers ------------------------------------------------------------------------
    @staticmethod
    def stamped(
        data: ImageSet, triggers: ReversedTriggers, targets: list[int], g: torch.Generator
    ) -> ImageSet:
        """Holdout samples whose label is not the trigger's, each stamped with a reversed trigger
        of one of `targets` (cycled); y is that target, orig_y the true label."""
        position = {int(label): i for i, label in enumerate(triggers.labels)}
        which = torch.tensor([position[t] for t in targets])[torch.arange(len(data)) % len(targets)]
        which = which[torch.randperm(len(data), generator=g)]
        target_labels = triggers.labels[which]
        keep = data.y != target_labels
        subset, which = data.subset(keep), which[keep]
        x = to_storage(triggers.stamp(to_float(subset.x), which).clamp_(0, 1), like=subset.x)
        return subset.replace(x=x, y=triggers.labels[which], orig_y=subset.y)

    def unlearn(
        self,
        model: nn.Module,
        holdout: ImageSet,
        ctx: RunContext,
        triggers: ReversedTriggers,
        targets: list[int],
    ) -> nn.Module:
        """Fine-tune with reversed triggers stamped on a share of the holdout, labels kept."""
        g = ctx.generator("nc-unlearning")
        chosen = torch.randperm(len(holdout), generator=g)[
            : round(self.unlearn_fraction * len(holdout))
        ]
        position = {int(label): i for i, label in enumerate(triggers.labels)}
        which = torch.tensor([position[t] for t in targets])[
            torch.arange(len(chosen)) % len(targets)
        ]
        x = holdout.x.clone()
        x[chosen] = to_storage(
            triggers.stamp(to_float(holdout.x[chosen]), which).clamp_(0, 1), like=holdout.x
        )
        ctx.record(unlearn_stamped=len(chosen))
        return finetune(
            model, holdout.replace(x=x), ctx, self.lr, self.epochs, stream="nc-unlearning"
        )

    def neuron_scorer(self, model: nn.Module, ctx: RunContext) -> tuple[Any, Any, Any]:
        """(activations [N, C], predictions with neurons kept [K, N], apply-mask) for the
        configured neuron layer."""
        batch, device = ctx.settings.eval_batch_size, ctx.device
        if self.neuron_layer == "penultimate":

            def activations(x: Tensor) -> Tensor:
                return penultimate(model, x, batch, device)

            @torch.no_grad()
            def predictions(x: Tensor, keeps: Tensor) -> Tensor:
                feats = activations(x)
                head = model.classifier.to("cpu")
                return torch.stack([head(feats * keep).argmax(1) for keep in keeps.float()])

            def apply(target: nn.Module, pruned: Tensor) -> nn.Module:
                weight = target.classifier.weight
                keep = (~pruned).float().view(1, -1).expand_as(weight).contiguous()
                prune.custom_from_mask(target.classifier, "weight", keep)
                return target

            return activations, predictions, apply
        site: PruneSite = resolve_site(model, None, None)

        def conv_activations(x: Tensor) -> Tensor:
            with on_device(model, device):  # one transfer, not one per chunk
                return torch.cat(
                    [
                        reduce_channels(layer_outputs(model, site.rank_layer, x[p], batch, device))
                        for p in chunks(len(x), batch)
                    ]
                )

        def conv_predictions(x: Tensor, keeps: Tensor) -> Tensor:
            return masked_predictions(model, site.rank_layer, x, keeps, batch, device)

        def conv_apply(target: nn.Module, pruned: Tensor) -> nn.Module:
            return mask_channels(target, site, pruned)

        return conv_activations, conv_predictions, conv_apply

    def activation_gap(self, activations: Any, clean: ImageSet, stamped: ImageSet) -> Tensor:
        return activations(stamped.x).mean(0) - activations(clean.x).mean(0)

    def prune_neurons(
        self,
        model: nn.Module,
        data: RunData,
        ctx: RunContext,
        triggers: ReversedTriggers,
        targets: list[int],
    ) -> nn.Module:
        """Prune the neurons the reversed trigger excites most, until it stops working."""
        activations, predictions, apply = self.neuron_scorer(model, ctx)
        holdout = data.holdout
        stamped = self.stamped(holdout, triggers, targets, ctx.generator("nc-pruning"))
        order = torch.argsort(self.activation_gap(activations, holdout, stamped), descending=True)
        neurons = len(order)
        keeps = torch.ones(neurons + 1, neurons)
        for k in range(1, neurons + 1):
            keeps[k, order[:k]] = 0
        clean_acc = torch.tensor([accuracy(p, holdout.y) for p in predictions(holdout.x, keeps)])
        trigger_rate = torch.tensor([accuracy(p, stamped.y) for p in predictions(stamped.x, keeps)])
        allowed = clean_acc >= clean_acc[0] - self.acc_drop - 1e-9
        reached = (trigger_rate <= self.prune_target + 1e-9) & allowed
        if reached.any():
            count = int(reached.nonzero()[0])
        else:  # the reversed trigger outlives the accuracy budget: prune as far as allowed
            too_far = (~allowed).nonzero().flatten()
            count = int(too_far[0]) - 1 if len(too_far) else neurons
        rows = [
            {
                "pruned": k,
                "fraction": k / neurons,
                "holdout_acc": float(clean_acc[k]),
                "reversed_trigger_success": float(trigger_rate[k]),
            }
            for k in range(neurons + 1)
        ]
        self.score_prune_curve(data, predictions, keeps, rows)
        write_pruning_curve(
            ctx.run_dir,
            f"pruning_curve_{self.name}",
            rows,
            ctx.logger,
            title=f"{self.name}: pruning {self.neuron_layer} neurons by reversed-trigger gap",
            columns=(
                "pruned",
                "fraction",
                "holdout_acc",
                "reversed_trigger_success",
                "cca",
                "asr",
                "ra",
            ),
            stops=[{"fraction": count / neurons, "label": "chosen"}],
            x_label="fraction of neurons pruned",
        )
        ctx.record(
            neuron_layer=self.neuron_layer,
            neurons=neurons,
            pruned_neurons=count,
            pruned_fraction=count / neurons,
            holdout_acc_pruned=float(clean_acc[count]),
            reversed_trigger_success_pruned=float(trigger_rate[count]),
        )
        pruned = torch.zeros(neurons, dtype=torch.bool)
        pruned[order[:count]] = True
        return make_permanent(apply(copy_model(model), pruned)).eval()

    @staticmethod
    def score_prune_curve(
        data: RunData, predictions: Any, keeps: Tensor, rows: list[dict[str, Any]]
    ) -> None:
        """CCA, ASR and RA of every pruning level on the test sets (scoring only)."""
        test, backdoor_test = data.test, data.backdoor_test
        clean = predictions(test.x, keeps)
        backdoor = predictions(backdoor_test.x, keeps) if len(backdoor_test) else None
        for k, row in enumerate(rows):
            row["cca"] = accuracy(clean[k], test.y)
            if backdoor is not None:
                row["asr"] = accuracy(backdoor[k], backdoor_test.y)
                row["ra"] = accuracy(backdoor[k], backdoor_test.orig_y)

    def build_filter(
        self,
        model: nn.Module,
        data: RunData,
        ctx: RunContext,
        triggers: ReversedTriggers,
        targets: list[int],
    ) -> InputDetector:
        """The input filter, calibrated on the clean holdout (the runner scores it)."""
        activations, _, _ = self.neuron_scorer(model, ctx)
        holdout = data.holdout
        stamped = self.stamped(holdout, triggers, targets, ctx.generator("nc-filter"))
        gap = self.activation_gap(activations, holdout, stamped)
        top = max(1, round(self.filter_top * len(gap)))
        neurons = torch.argsort(gap, descending=True)[:top]
        clean_scores = activations(holdout.x)[:, neurons].mean(1)
        threshold = frr_threshold(clean_scores, self.filter_fpr)
        ctx.record(filter_neurons=neurons.tolist())
        return ActivationFilter(activations, neurons, threshold)
