"""NIC: reject inputs that break the invariants clean inputs keep inside the model (a run-time
detector).

Ma, Liu, Tao, Lee, Zhang, "NIC: Detecting Adversarial Samples with Neural Network Invariant
Checking", NDSS 2019, and the authors' code (github.com/RU-System-Software-and-Security/NIC:
PCA.py, svm_2.1.py, svm_2.2.py, svm_3.py). Two kinds of invariant, each a one-class model fitted
on clean holdout data:
- value invariants (VI): the distribution of one layer's activations;
- provenance invariants (PI): how the decision evolves from one layer to the next, seen through
  a linear softmax classifier per layer that predicts the model's label from that layer: a
  one-class model over the concatenated class probabilities of two consecutive layers.
A final one-class model over the vector of all VI and PI decision values makes the call (the
authors' svm_3.py). A trigger drives activations the clean data never produce and routes the
decision differently, so a trojaned input falls outside some invariant.

Choices (the paper leaves them open or the code is Keras/thundersvm specific):
- layers: the outputs of the model's conv and linear layers, conv maps averaged over positions
  (the paper checks every layer's full output; pooling keeps the one-class models small).
- features are standardised, and reduced by PCA when wider than `pca_components` (the authors
  reduce to 5000 only to fit thundersvm's memory); the RBF width is sklearn's "scale" (1 /
  n_features on standardised data): the authors' fixed gammas (0.1, 0.5, 1) were tuned on their
  MNIST net's raw activations and do not transfer. nu: 0.1 for VI (svm_2.1.py, most layers),
  0.01 for PI (svm_2.2.py) and 0.1 for the final model (svm_3.py).
- the linear classifiers learn the model's own predicted labels (the invariant is the model's
  decision, not the ground truth; svm_2.2.py applies untrained Dense layers).
- the holdout is split three ways: invariants, final model, threshold calibration, so that no
  model scores the data it was fitted on (the authors fit and score the same training set).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import (
    NOTHING_CARRIED,
    Carried,
    Defense,
    InputDetector,
    Measured,
    calibrate_on_holdout,
    require_holdout,
)
from bdrun.defenses.pruning import reduce_channels
from bdrun.errors import BdrunError
from bdrun.metrics import auroc, logits_of, on_device
from bdrun.models.probes import get_module
from bdrun.report.histograms import clean_vs_trojaned

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

ONE_CLASS_MODELS = ("ocsvm", "isolation_forest")
HISTOGRAM_FILE = "nic_scores.png"


def default_layers(model: nn.Module) -> list[str]:
    """Names of the model's conv and linear layers, in registration (forward) order."""
    return [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]


@torch.no_grad()
def pooled_outputs(
    model: nn.Module,
    layers: list[str],
    x: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> list[Tensor]:
    """Every layer's output for every image of x in one pass per batch, conv maps averaged over
    positions: one [N, C] float64 tensor per layer, on the CPU."""
    captured: dict[str, list[Tensor]] = {name: [] for name in layers}

    def keeper(name: str):
        def keep(_module: nn.Module, _inputs: object, out: Tensor) -> None:
            captured[name].append(reduce_channels(out.detach().float()).cpu())

        return keep

    handles = [get_module(model, name).register_forward_hook(keeper(name)) for name in layers]
    try:
        with on_device(model.eval(), device):
            for start in range(0, len(x), batch_size):
                model(to_float(x[start : start + batch_size].to(device)))
    finally:
        for handle in handles:
            handle.remove()
    return [
        torch.cat(captured[name]).double() if captured[name] else torch.empty(0, 0)
        for name in layers
    ]


def one_class_model(kind: str, nu: float, gamma: str | float, seed: int) -> Any:
    """A fresh (standardise -> one-class model) sklearn pipeline."""
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    if kind == "ocsvm":
        detector = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma)
    else:
        detector = IsolationForest(random_state=seed)
    return make_pipeline(StandardScaler(), detector)


class LayerView:
    """One layer's standardised (and, when wider than `pca_components`, PCA-reduced) features,
    with the linear softmax classifier that reads the model's label from them."""

    def __init__(self, features: Tensor, labels: Tensor, pca_components: int, seed: int) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        steps: list[Any] = [StandardScaler()]
        width = features.shape[1]
        if pca_components and width > pca_components:
            steps.append(PCA(min(pca_components, len(features)), random_state=seed))
        self.transform = make_pipeline(*steps).fit(features.numpy())
        # a model that gives one label to all of them (a smoke-sized model) leaves nothing to
        # learn: that layer's probability vector is the constant [1]
        self.classifier: Any = None
        if len(labels.unique()) > 1:
            self.classifier = LogisticRegression(max_iter=1000)
            self.classifier.fit(self.transform.transform(features.numpy()), labels.numpy())

    def features(self, values: Tensor) -> np.ndarray:
        return self.transform.transform(values.numpy())

    def probabilities(self, values: Tensor) -> np.ndarray:
        if self.classifier is None:
            return np.ones((len(values), 1))
        return self.classifier.predict_proba(self.features(values))


class NicDetector(InputDetector):
    """Scores inputs by minus the final one-class model's decision value over all invariants
    (higher = further outside the clean invariants)."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        one_class: str,
        value_nu: float,
        provenance_nu: float,
        final_nu: float,
        gamma: str | float,
        pca_components: int,
        batch_size: int,
        device: torch.device | str,
        seed: int,
    ) -> None:
        self.model = model
        self.layers = layers
        self.one_class = one_class
        self.value_nu, self.provenance_nu, self.final_nu = value_nu, provenance_nu, final_nu
        self.gamma = gamma
        self.pca_components = pca_components
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.views: list[LayerView] = []
        self.value_models: list[Any] = []
        self.provenance_models: list[Any] = []
        self.final_model: Any = None
        self.threshold = float("inf")

    def _outputs(self, x: Tensor) -> list[Tensor]:
        return pooled_outputs(self.model, self.layers, x, self.batch_size, self.device)

    def fit_invariants(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Fit each layer's view, value invariant and the provenance invariants on clean x; the
        linear classifiers learn `labels`, by default the model's own predictions."""
        outputs = self._outputs(x)
        if labels is None:
            labels = logits_of(self.model, x, self.batch_size, self.device).argmax(1)
        if len(labels.unique()) < 2:
            log.warning(
                "NIC: the model gives every holdout image one label; provenance is constant"
            )
        self.views = [
            LayerView(values, labels, self.pca_components, self.seed) for values in outputs
        ]
        self.value_models = [
            self._new(self.value_nu).fit(view.features(values))
            for view, values in zip(self.views, outputs, strict=True)
        ]
        probabilities = [view.probabilities(v) for view, v in zip(self.views, outputs, strict=True)]
        self.provenance_models = [
            self._new(self.provenance_nu).fit(np.concatenate(pair, 1))
            for pair in zip(probabilities[:-1], probabilities[1:], strict=True)
        ]

    def _new(self, nu: float) -> Any:
        return one_class_model(self.one_class, nu, self.gamma, self.seed)

    def invariant_values(self, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Decision values (positive inside) of the value invariants [N, L] and the provenance
        invariants [N, L - 1] for images x."""
        outputs = self._outputs(x)
        values = np.stack(
            [
                m.decision_function(view.features(v))
                for m, view, v in zip(self.value_models, self.views, outputs, strict=True)
            ],
            1,
        )
        probabilities = [view.probabilities(v) for view, v in zip(self.views, outputs, strict=True)]
        provenance = [
            m.decision_function(np.concatenate(pair, 1))
            for m, pair in zip(
                self.provenance_models,
                zip(probabilities[:-1], probabilities[1:], strict=True),
                strict=True,
            )
        ]
        provenance_values = np.stack(provenance, 1) if provenance else np.empty((len(x), 0))
        return values, provenance_values

    def fit_final(self, x: Tensor) -> None:
        self.final_model = self._new(self.final_nu).fit(np.concatenate(self.invariant_values(x), 1))

    def combine(self, values: np.ndarray, provenance: np.ndarray) -> Tensor:
        """Score from invariant decision values: minus the final model's decision value."""
        decision = self.final_model.decision_function(np.concatenate([values, provenance], 1))
        return -torch.from_numpy(np.asarray(decision, dtype=np.float64))

    def score(self, x: Tensor) -> Tensor:
        return self.measure(x).scores

    def measure(self, x: Tensor) -> Measured:
        """Scores, with each invariant's decision values behind them (`value`: one column per
        layer; `provenance`: one per pair of consecutive layers)."""
        if len(x) == 0:
            layers = len(self.layers)
            return Measured(
                torch.empty(0, dtype=torch.float64),
                {"value": torch.empty(0, layers), "provenance": torch.empty(0, layers - 1)},
            )
        values, provenance = self.invariant_values(x)
        return Measured(
            self.combine(values, provenance),
            {"value": torch.from_numpy(values), "provenance": torch.from_numpy(provenance)},
        )

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """Each invariant's own AUROC on the test sets and the score histogram (PNG, logger)."""

        def invariant_auroc(part: str, column: int) -> float:
            # an invariant's decision value is higher for inputs that fit it: minus it scores
            return auroc(-clean.parts[part][:, column], -backdoor.parts[part][:, column])

        path = clean_vs_trojaned(
            clean.scores,
            backdoor.scores,
            ctx.run_dir / HISTOGRAM_FILE,
            threshold=self.threshold,
            xlabel="NIC score (minus the final one-class model's decision value)",
            title=f"NIC, {len(self.layers)} layers: clean vs trojaned test inputs",
        )
        ctx.logger.log_image("nic/score_histogram", path)
        pairs = zip(self.layers[:-1], self.layers[1:], strict=True)
        return {
            "value_auroc": {
                name: invariant_auroc("value", i) for i, name in enumerate(self.layers)
            },
            "provenance_auroc": {
                f"{a}>{b}": invariant_auroc("provenance", i) for i, (a, b) in enumerate(pairs)
            },
        }


class Nic(Defense):
    """NIC input filter, calibrated on the clean holdout for a preset false rejection rate.

    Parameters:
        layers: layers whose outputs carry the invariants; empty = every conv and linear layer
            of the model (conv maps averaged over positions).
        one_class: "ocsvm" (the paper: RBF one-class SVMs) or "isolation_forest".
        value_nu, provenance_nu, final_nu: the OC-SVMs' nu (the authors' 0.1, 0.01, 0.1).
        gamma: the RBF width, "scale" (sklearn's 1 / (n_features * variance)) or a number.
        pca_components: features wider than this are PCA-reduced to it first (0: never).
        frr: false rejection rate the threshold is set for on clean holdout data (1 %).
        invariant_share, final_share: shares of the holdout that fit the invariants and the
            final model; the rest calibrates the threshold.
    """

    name = "nic"

    def __init__(
        self,
        layers: list[str] | tuple[str, ...] | None,
        one_class: str,
        value_nu: float,
        provenance_nu: float,
        final_nu: float,
        gamma: str | float,
        pca_components: int,
        frr: float,
        invariant_share: float,
        final_share: float,
    ) -> None:
        if one_class not in ONE_CLASS_MODELS:
            raise BdrunError(
                f"defense.one_class={one_class!r} must be one of {', '.join(ONE_CLASS_MODELS)}"
            )
        for key, nu in (("value_nu", value_nu), ("provenance_nu", provenance_nu)):
            if not 0 < float(nu) <= 1:
                raise BdrunError(f"defense.{key}={nu} must be in (0, 1], e.g. 0.1")
        if not 0 < float(final_nu) <= 1:
            raise BdrunError(f"defense.final_nu={final_nu} must be in (0, 1], e.g. 0.1")
        if gamma != "scale" and not (
            isinstance(gamma, int | float) and not isinstance(gamma, bool) and gamma > 0
        ):
            raise BdrunError(f"defense.gamma={gamma!r} must be 'scale' or a number > 0")
        if int(pca_components) < 0:
            raise BdrunError(f"defense.pca_components={pca_components} must be >= 0 (0: no PCA)")
        if not 0 < float(frr) < 1:
            raise BdrunError(f"defense.frr={frr} must be in (0, 1), e.g. 0.01")
        shares = float(invariant_share), float(final_share)
        if min(shares) <= 0 or sum(shares) >= 1:
            raise BdrunError(
                f"defense.invariant_share={invariant_share} and defense.final_share="
                f"{final_share} must be > 0 with a sum below 1, e.g. 0.5 and 0.25"
            )
        self.layers = [str(name) for name in layers] if layers else []
        self.one_class = one_class
        self.value_nu = float(value_nu)
        self.provenance_nu = float(provenance_nu)
        self.final_nu = float(final_nu)
        self.gamma: str | float = gamma if gamma == "scale" else float(gamma)
        self.pca_components = int(pca_components)
        self.frr = float(frr)
        self.invariant_share = float(invariant_share)
        self.final_share = float(final_share)

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        holdout = data.holdout
        require_holdout(holdout, 6, "NIC")
        layers = self.layers or default_layers(model)
        for name in layers:
            get_module(model, name)  # a BdrunError listing layers when a name is wrong
        if not layers:
            raise BdrunError("model has no conv or linear layer; set defense.layers=[LAYER,...]")
        order = torch.randperm(len(holdout), generator=ctx.generator("nic-holdout"))
        n_invariant = max(2, round(self.invariant_share * len(holdout)))
        n_final = max(2, round(self.final_share * len(holdout)))
        parts = order[:n_invariant], order[n_invariant : n_invariant + n_final]
        calibration = order[n_invariant + n_final :]
        detector = NicDetector(
            model,
            layers,
            self.one_class,
            self.value_nu,
            self.provenance_nu,
            self.final_nu,
            self.gamma,
            self.pca_components,
            batch_size=ctx.settings.eval_batch_size,
            device=ctx.device,
            seed=ctx.seed,
        )
        detector.fit_invariants(holdout.x[parts[0]])
        detector.fit_final(holdout.x[parts[1]])
        calibrate_on_holdout(detector, detector.score(holdout.x[calibration]), self.frr, ctx, "NIC")
        log.info(
            "NIC on %d layers (%s), threshold %.4f (FRR %.3f; %d/%d/%d holdout images)",
            len(layers),
            ", ".join(layers),
            detector.threshold,
            self.frr,
            len(parts[0]),
            len(parts[1]),
            len(calibration),
        )

        ctx.record(layers=layers)
        return detector
