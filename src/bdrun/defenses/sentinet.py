"""SentiNet: reject inputs whose salient region hijacks other images (a run-time detector).

Chou, Tramèr & Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep
Learning Systems", IEEE Security and Privacy Workshops (DLS) 2020. The authors published no
code; the defaults come from BackdoorBench (github.com/SCLBD/BackdoorBench,
detection_infer/sentinet.py and config/detection/sentinet/*.yaml: 100 clean images, Grad-CAM
mask at 0.85 of its maximum), which adapts Beatrix (github.com/wanlunsec/Beatrix,
defenses/SentiNet/SentiNet.py: uniform noise as the inert pattern, the decision boundary from
the most-fooling clean points per 0.04-wide confidence bin, a quadratic fitted through them).

A localised trigger is what the model looks at on a trojaned input, and it keeps working when
pasted anywhere: pasted onto clean images it makes most of them predict the trojaned input's
class (a high fooled share), while an inert noise patch of the same shape barely disturbs them
(a high average confidence). A benign salient region is large and class-specific: it fools
few images, and noise over it lowers the confidence. Clean holdout inputs fix the highest
fooled share seen at each confidence; inputs far above that boundary are rejected.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import (
    NOTHING_CARRIED,
    Carried,
    Defense,
    InputDetector,
    Measured,
    frr_threshold,
    require_holdout,
)
from bdrun.errors import BdrunError
from bdrun.metrics import logits_of, on_device
from bdrun.models.probes import get_module
from bdrun.report.scatter import clean_vs_trojaned_scatter

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

INERT_PLACEMENTS = ("region", "background")
SCATTER_FILE = "sentinet_boundary.png"
CURVE_POINTS = 1001  # grid over confidence in [0, 1] on which distances to the boundary are taken


def grad_cam(model: nn.Module, layer: str, x: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM maps (Selvaraju et al., ICCV 2017) of float images x [N, C, H, W] for the
    classes [N, K] of each image: ReLU of the channel sum of `layer`'s activations weighted by
    the spatial mean of the class logit's gradient, upsampled (bilinear) to H x W and scaled
    into [0, 1] per map by its maximum; [N, K, H, W]. One forward pass, one backward per class
    column; the eval-mode model treats the images of a batch independently, so the gradient of
    the summed logits is each image's own."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: Tensor) -> None:
        captured.append(out)

    handle = get_module(model, layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            activations = captured[-1]
            if activations.dim() != 4:
                raise BdrunError(
                    f"Grad-CAM needs a conv layer with [N, C, H, W] output but {layer!r} gives "
                    f"{list(activations.shape)}; set defense.layer to a conv layer"
                )
            maps = []
            for k in range(classes.shape[1]):
                chosen = logits.gather(1, classes[:, k : k + 1]).sum()
                (grads,) = torch.autograd.grad(
                    chosen, activations, retain_graph=True, allow_unused=True
                )
                if grads is None:  # a logit that does not depend on the layer: no map
                    grads = torch.zeros_like(activations)
                weights = grads.mean((2, 3), keepdim=True)
                maps.append(F.relu((weights * activations).sum(1)).detach())
    finally:
        handle.remove()
    cams = F.interpolate(
        torch.stack(maps, 1), size=x.shape[-2:], mode="bilinear", align_corners=False
    )
    peak = cams.flatten(2).amax(2)[..., None, None]
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


@torch.no_grad()
def last_feature_map(model: nn.Module, x: Tensor) -> str:
    """Name of the module whose [N, C, H, W] output comes last in a forward pass of float images
    x: the output of the model's last conv stage (after its activation and pooling), the
    feature maps Grad-CAM is meant for."""
    finished: list[str] = []
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: (
                finished.append(name) if isinstance(out, Tensor) and out.dim() == 4 else None
            )
        )
        for name, module in model.named_modules()
        if name
    ]
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise BdrunError(
            f"model {type(model).__name__} has no layer with [N, C, H, W] output for Grad-CAM; "
            "set defense.layer=LAYER"
        )
    return finished[-1]


def salient_masks(cams: Tensor, threshold: float) -> Tensor:
    """Bool masks [N, H, W] from Grad-CAM maps [N, 1 + S, H, W]: the predicted class's map
    minus the sum of the S secondary classes' maps, floored at 0 and rescaled by its maximum,
    kept where it reaches `threshold` (an input whose map vanishes gets an empty mask)."""
    heat = (cams[:, 0] - cams[:, 1:].sum(1)).clamp_min(0)
    peak = heat.flatten(1).amax(1)[:, None, None]
    return (heat >= threshold * peak) & (peak > 0)


def fit_boundary(confidence: Tensor, fooled: Tensor, bin_width: float) -> Tensor:
    """Coefficients [a, b, c] of the quadratic a x^2 + b x + c (least squares) through the most
    fooling point of every occupied `bin_width`-wide confidence bin (the paper's boundary from
    the maximum fooled count per bin; Beatrix fits a quadratic to the top points per bin).
    Fewer than three occupied bins give a line or a constant (leading coefficients 0)."""
    bins = (confidence.double() / bin_width).floor().long()
    xs, ys = [], []
    for b in bins.unique():
        members = bins == b
        top = int(fooled[members].double().argmax())
        xs.append(float(confidence[members][top]))
        ys.append(float(fooled[members][top]))
    degree = min(2, len(xs) - 1)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([x**p for p in range(degree, -1, -1)], 1)
    solution = torch.linalg.lstsq(design, y[:, None], driver="gelsd").solution[:, 0]
    return torch.cat([torch.zeros(2 - degree, dtype=torch.float64), solution])


def boundary_value(coefficients: Tensor, confidence: Tensor) -> Tensor:
    a, b, c = coefficients.tolist()
    x = confidence.double()
    return a * x**2 + b * x + c


def distance_above(coefficients: Tensor, confidence: Tensor, fooled: Tensor) -> Tensor:
    """Euclidean distance of every (confidence, fooled) point to the boundary curve over
    confidence in [0, 1], positive above the curve and negative below it."""
    grid = torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64)
    curve = torch.stack([grid, boundary_value(coefficients, grid)], 1)  # [G, 2]
    points = torch.stack([confidence.double(), fooled.double()], 1)  # [N, 2]
    nearest = torch.cdist(points, curve).amin(1)
    above = fooled.double() > boundary_value(coefficients, confidence)
    return torch.where(above, nearest, -nearest)


class SentinetDetector(InputDetector):
    """Scores inputs by their distance above the clean boundary in the (average confidence,
    fooled share) plane.

    For every input: Grad-CAM of the predicted class (minus `secondary_classes` runner-up
    classes' maps) at `layer`, thresholded at `mask_threshold` of its maximum, gives the salient
    region. The region is pasted onto each of the `pool` clean images: the fooled share is the
    share of them then predicted as the input's class, among those the model does not already
    assign to that class. The same region filled with the matching inert pattern of `noise`
    gives the average confidence (mean top softmax probability): with `inert_placement`
    "region" the noise goes into the region of the pool images (the paper), with "background"
    the input's region sits on the noise (Beatrix and BackdoorBench). Pool and noise are fixed,
    so the same input always gets the same score; all pastes of a chunk of inputs go through
    the model in one forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        pool: Tensor,
        noise: Tensor,
        secondary_classes: int,
        mask_threshold: float,
        inert_placement: str,
        inputs_per_pass: int,
        batch_size: int,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.layer = layer
        self.device = torch.device(device)
        self.pool = to_float(pool.to(self.device))
        self.noise = noise.to(self.device)
        self.secondary_classes = secondary_classes
        self.mask_threshold = mask_threshold
        self.inert_placement = inert_placement
        self.inputs_per_pass = max(1, inputs_per_pass)
        self.batch_size = max(1, batch_size)
        self.pool_pred = logits_of(model, self.pool, batch_size, self.device).argmax(1)
        self.coefficients = torch.zeros(3, dtype=torch.float64)
        self.threshold = float("inf")

    def masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted class [N], salient-region masks [N, H, W] bool) of images x."""
        logits = logits_of(self.model, x, self.batch_size, self.device)
        top = min(1 + self.secondary_classes, logits.shape[1])
        classes = logits.topk(top, 1).indices
        out = []
        with on_device(self.model.eval(), self.device):
            for start in range(0, len(x), self.batch_size):
                stop = start + self.batch_size
                images = to_float(x[start:stop].to(self.device))
                cams = grad_cam(self.model, self.layer, images, classes[start:stop].to(self.device))
                out.append(salient_masks(cams, self.mask_threshold).cpu())
        masks = torch.cat(out) if out else torch.empty(0, *x.shape[-2:], dtype=torch.bool)
        return classes[:, 0], masks

    @torch.no_grad()
    def confidence_fooled_area(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(average confidence [N], fooled share [N], mask area share [N]) of images x."""
        predicted, masks = self.masks(x)
        n = len(self.pool)
        other = self.pool_pred[None, :] != predicted.to(self.device)[:, None]  # [N, n]
        confidence, fooled = [], []
        with on_device(self.model.eval(), self.device):
            for start in range(0, len(x), self.inputs_per_pass):
                stop = start + self.inputs_per_pass
                inputs = to_float(x[start:stop].to(self.device))[:, None]  # [k, 1, C, H, W]
                region = masks[start:stop].to(self.device)[:, None, None].float()  # [k,1,1,H,W]
                pasted = self.pool[None] * (1 - region) + inputs * region  # [k, n, C, H, W]
                if self.inert_placement == "region":
                    inert = self.pool[None] * (1 - region) + self.noise[None] * region
                else:
                    inert = self.noise[None] * (1 - region) + inputs * region
                k = len(inputs)
                logits = self.model(torch.cat([pasted, inert]).flatten(0, 1)).float()
                pasted_pred = logits[: k * n].argmax(1).view(k, n)
                top_prob = F.softmax(logits[k * n :], 1).amax(1).view(k, n)
                hits = (pasted_pred == predicted[start:stop].to(self.device)[:, None]) & (
                    other[start:stop]
                )
                fooled.append((hits.sum(1) / other[start:stop].sum(1).clamp_min(1)).cpu())
                confidence.append(top_prob.mean(1).cpu())
        if not fooled:
            empty = torch.empty(0)
            return empty, empty, empty
        area = masks.flatten(1).float().mean(1)
        return torch.cat(confidence).double(), torch.cat(fooled).double(), area

    def distance(self, confidence: Tensor, fooled: Tensor) -> Tensor:
        return distance_above(self.coefficients, confidence, fooled)

    def score(self, x: Tensor) -> Tensor:
        return self.measure(x).scores

    def measure(self, x: Tensor) -> Measured:
        """Distances, with the confidence, fooled share and mask area behind them."""
        confidence, fooled, area = self.confidence_fooled_area(x)
        return Measured(
            self.distance(confidence, fooled),
            {"confidence": confidence, "fooled": fooled, "area": area},
        )

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """The boundary scatter of the clean and trojaned test inputs (PNG, logger) and the
        means of the values behind the scores."""
        grid = torch.linspace(0, 1, 201, dtype=torch.float64)
        path = clean_vs_trojaned_scatter(
            torch.stack([clean.parts["confidence"], clean.parts["fooled"]], 1),
            torch.stack([backdoor.parts["confidence"], backdoor.parts["fooled"]], 1),
            ctx.run_dir / SCATTER_FILE,
            curve=(grid, boundary_value(self.coefficients, grid)),
            level=lambda conf, fooled: self.distance(conf, fooled),
            threshold=self.threshold,
            xlabel="average confidence with the inert pattern",
            ylabel="fooled share of clean images",
            title=f"SentiNet, {len(self.pool)} pastes: clean vs trojaned test inputs",
        )
        ctx.logger.log_image("sentinet/boundary_scatter", path)
        return {
            f"{kind}_{part}_mean": _mean(measured.parts[key])
            for kind, measured in (("clean", clean), ("trojaned", backdoor))
            for part, key in (
                ("fooled", "fooled"),
                ("confidence", "confidence"),
                ("mask_area", "area"),
            )
        }

    def calibrate(self, confidence: Tensor, fooled: Tensor, bin_width: float, frr: float) -> Tensor:
        """Fit the boundary to clean points and set the threshold so that a share `frr` of them
        is rejected (empirical quantile of their distances); returns their distances."""
        self.coefficients = fit_boundary(confidence, fooled, bin_width)
        distances = self.distance(confidence, fooled)
        self.threshold = frr_threshold(distances, frr)
        return distances


class Sentinet(Defense):
    """SentiNet input filter, calibrated on the clean holdout for a preset false rejection rate.

    Parameters:
        n_pastes: clean holdout images every salient region is pasted onto (BackdoorBench's
            clean_sample_num = 100); at most `paste_share` of the holdout.
        paste_share: share of the holdout that supplies the pasted-onto images; the rest fits
            the boundary and calibrates the threshold, so no input is pasted onto itself.
        frr: false rejection rate the threshold is set for on clean holdout data (1 %).
        mask_threshold: the salient region is where the Grad-CAM map reaches this share of its
            maximum (BackdoorBench's and Beatrix's mask_cond = 0.85).
        secondary_classes: runner-up classes whose Grad-CAM maps are subtracted from the
            predicted class's map. The paper subtracts the maps of its proposed classes (top
            classes of the input's segments) so that regions explaining benign classes drop
            out; here they are the input's own next-likeliest classes. 0 (the default) uses the
            predicted class's map alone, as BackdoorBench and Beatrix do: on Fashion-MNIST
            BadNets subtracting the runner-up class's map leaves fewer trigger pixels in the
            region (docs/defenses/sentinet.md).
        layer: the module whose feature maps Grad-CAM weighs; empty = the output of the model's
            last conv stage (the last module with [N, C, H, W] output: the small CNN's pool2),
            the "last convolutional layer" of Grad-CAM's authors. The raw last conv (the small
            CNN's conv2, before its ReLU, like BackdoorBench's layer4.1.conv2) localises the
            trigger far worse (docs/defenses/sentinet.md).
        inert_placement: "region" fills the salient region of the clean images with noise
            (the paper); "background" puts the input's region on noise (Beatrix, BackdoorBench).
        bin_width: width of the confidence bins whose most-fooled clean points define the
            boundary (Beatrix's 0.04).
        max_calibration: at most this many of the remaining holdout images fit the boundary and
            the threshold (each costs a Grad-CAM and 2 x n_pastes predictions).
    """

    name = "sentinet"

    def __init__(
        self,
        n_pastes: int,
        paste_share: float,
        frr: float,
        mask_threshold: float,
        secondary_classes: int,
        layer: str,
        inert_placement: str,
        bin_width: float,
        max_calibration: int,
    ) -> None:
        if int(n_pastes) < 1:
            raise BdrunError(f"defense.n_pastes={n_pastes} must be >= 1, e.g. 100")
        if not 0 < float(paste_share) < 1:
            raise BdrunError(f"defense.paste_share={paste_share} must be in (0, 1), e.g. 0.5")
        if not 0 < float(frr) < 1:
            raise BdrunError(f"defense.frr={frr} must be in (0, 1), e.g. 0.01")
        if not 0 < float(mask_threshold) <= 1:
            raise BdrunError(
                f"defense.mask_threshold={mask_threshold} must be in (0, 1], e.g. 0.85"
            )
        if int(secondary_classes) < 0:
            raise BdrunError(f"defense.secondary_classes={secondary_classes} must be >= 0")
        if inert_placement not in INERT_PLACEMENTS:
            raise BdrunError(
                f"defense.inert_placement={inert_placement!r} must be one of "
                f"{', '.join(INERT_PLACEMENTS)}"
            )
        if not 0 < float(bin_width) <= 1:
            raise BdrunError(f"defense.bin_width={bin_width} must be in (0, 1], e.g. 0.04")
        if int(max_calibration) < 1:
            raise BdrunError(f"defense.max_calibration={max_calibration} must be >= 1, e.g. 1000")
        self.n_pastes = int(n_pastes)
        self.paste_share = float(paste_share)
        self.frr = float(frr)
        self.mask_threshold = float(mask_threshold)
        self.secondary_classes = int(secondary_classes)
        self.layer = str(layer or "")
        self.inert_placement = inert_placement
        self.bin_width = float(bin_width)
        self.max_calibration = int(max_calibration)

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        holdout = data.holdout
        require_holdout(holdout, 2, "SentiNet")
        if self.layer:
            get_module(model, self.layer)  # a BdrunError listing layers when the name is wrong
        with on_device(model, ctx.device):
            layer = self.layer or last_feature_map(model, to_float(holdout.x[:2].to(ctx.device)))
        order = torch.randperm(len(holdout), generator=ctx.generator("sentinet-holdout"))
        n_pool = min(self.n_pastes, max(1, round(self.paste_share * len(holdout))))
        n_pool = min(n_pool, len(holdout) - 1)
        pool = holdout.x[order[:n_pool]]
        calibration = holdout.x[order[n_pool : n_pool + self.max_calibration]]
        noise = torch.rand(n_pool, *pool.shape[1:], generator=ctx.generator("sentinet-noise"))
        detector = SentinetDetector(
            model,
            layer,
            pool,
            noise,
            self.secondary_classes,
            self.mask_threshold,
            self.inert_placement,
            inputs_per_pass=ctx.settings.eval_batch_size // (2 * n_pool),
            batch_size=ctx.settings.eval_batch_size,
            device=ctx.device,
        )
        calib_conf, calib_fooled, _ = detector.confidence_fooled_area(calibration)
        detector.calibrate(calib_conf, calib_fooled, self.bin_width, self.frr)
        log.info(
            "SentiNet boundary %s, distance threshold %.4f (FRR %.3f, %d pastes, layer %s)",
            [round(c, 4) for c in detector.coefficients.tolist()],
            detector.threshold,
            self.frr,
            n_pool,
            layer,
        )

        ctx.record(
            boundary_coefficients=[round(c, 6) for c in detector.coefficients.tolist()],
            n_pastes=n_pool,
            layer=layer,
        )
        return detector


def _mean(values: Tensor) -> float:
    return round(float(values.double().mean()), 6) if len(values) else float("nan")
