"""Input-aware dynamic backdoor (Nguyen & Tran 2020): every input gets its own generated trigger."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.attacks.generators import EPSILON, TriggerNet
from bdrun.cache import content_key
from bdrun.data.base import DataInfo, ImageSet, to_float
from bdrun.data.loader import InMemoryLoader
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.metrics import accuracy
from bdrun.rng import derive_seed, generator, seeded_global
from bdrun.training import Trainee, TrainingHook

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root-mean-square distance between two batches of the same shape."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def diversity_loss(x1: Tensor, x2: Tensor, out1: Tensor, out2: Tensor) -> Tensor:
    """The authors' diversity term: mean of ||x1 - x2|| / ||g(x1) - g(x2)|| (RMS distances);
    small when different inputs get different patterns or masks."""
    return (rms_distance(x1, x2) / (rms_distance(out1, out2) + EPSILON)).mean()


def other_rows(rows: Tensor, size: int, g: torch.Generator) -> Tensor:
    """For each of `rows` (positions in a batch of `size` >= 2), a random other position."""
    return (rows + torch.randint(1, size, (len(rows),), generator=g)) % size


def stamp_generated(x: Tensor, source: Tensor, patterns: nn.Module, masks: nn.Module) -> Tensor:
    """x + (G(source) - x) * threshold(M(source)): the trigger made for `source`, put on x."""
    mask = TriggerNet.threshold(masks(source))
    return x + (patterns(source) - x) * mask


class InputAware(Attack):
    """Trigger generator G and mask generator M trained with the classifier: a poisoned input
    carries G(x) through the near-binary mask M(x), so no two inputs share a trigger.

    Nguyen and Tran 2020 ("Input-Aware Dynamic Backdoor Attack"), defaults from their release
    (config.py, train.py): M is pre-trained alone for 25 epochs on clean data (diversity loss
    plus lambda_norm = 100 times the mask area above mask_density = 0.032; Adam lr 0.01, betas
    (0.5, 0.9), lr x0.1 at epochs 10 and 20), then frozen; G (Adam lr 0.01, betas (0.5, 0.9))
    trains jointly with the classifier, which sees per batch a share p_attack of backdoor
    inputs (their own trigger, target label), p_cross of cross-trigger inputs (another input's
    trigger, true label kept) and clean inputs, with the diversity loss (lambda_div = 1) on G.
    The classifier keeps bdrun's training settings (the authors: SGD lr 0.01). G's learning
    rate follows the classifier's schedule (lr_pattern times the classifier's current share of
    its initial lr), as the authors step both with the same MultiStepLR milestones: a G still
    moving at full speed while a cosine schedule has stopped the classifier leaves the final
    triggers ahead of what the classifier learned.

    Here p_attack is the poison rate: the backdoor samples are chosen once (the ground-truth
    poison mask, relabelled in the training set, images left clean because their trigger only
    exists during training); the cross-trigger rows are drawn per batch. G and M are stored in
    the poisoned model's cache entry, so a cache hit restores them, and the backdoor test set
    (each input with its own generated trigger) is rebuilt from them once the poisoned model
    exists. `evaluate` adds the cross-trigger accuracy (inputs with another input's trigger
    classified as their true label) and mask_area, the mean mask of the trained mask generator
    on test inputs (about mask_density once its pre-training has converged).

    Parameters:
        cross_rate: p_cross, the share of each batch given a cross trigger.
        lambda_div: weight of the diversity loss (pattern and mask training).
        lambda_norm: weight of the mask-size loss in the mask pre-training.
        mask_density: mask area above which the size loss applies.
        mask_epochs: epochs of mask pre-training (the authors: 25).
        lr_pattern, lr_mask: Adam learning rates of G and M.
    """

    name = "input_aware"
    triggers_in_training = True

    def __init__(
        self,
        cross_rate: float,
        lambda_div: float,
        lambda_norm: float,
        mask_density: float,
        mask_epochs: int,
        lr_pattern: float,
        lr_mask: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.cross_rate = float(cross_rate)
        self.lambda_div = float(lambda_div)
        self.lambda_norm = float(lambda_norm)
        self.mask_density = float(mask_density)
        self.mask_epochs = int(mask_epochs)
        self.lr_pattern = float(lr_pattern)
        self.lr_mask = float(lr_mask)
        self._trained: tuple[nn.Module, nn.Module] | None = None
        self._cross: ImageSet | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if not 0 <= self.cross_rate < 1 or self.poison_rate + self.cross_rate >= 1:
            raise BdrunError(
                f"attack.cross_rate={self.cross_rate} must be in [0, 1) and, with "
                f"attack.poison_rate={self.poison_rate}, leave clean samples in each batch"
            )
        if self.mask_epochs < 0 or self.lambda_div < 0 or self.lambda_norm < 0:
            raise BdrunError("attack.mask_epochs, lambda_div and lambda_norm must be >= 0")
        self.seed = seed
        with seeded_global(seed, "input-aware-pattern"):
            self.pattern_net = TriggerNet(info.shape)
        with seeded_global(seed, "input-aware-mask"):
            self.mask_net = TriggerNet(info.shape, out_channels=1)
        self._pattern_init = copy.deepcopy(self.pattern_net.state_dict())
        self.pattern_net.eval()
        self.mask_net.eval()

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        """Pre-train the mask generator on the clean training data (cached, like a model)."""
        key = content_key(
            {
                **ctx.key_parts,
                "x": clean_train.x,
                "stream": "input-aware-mask",
                "batch_size": ctx.settings.batch_size,
            }
        )
        meta = {"what": "input-aware mask generator", "epochs": self.mask_epochs}
        self._device = ctx.device
        self._batch_size = ctx.settings.eval_batch_size
        self.mask_net, _ = ctx.cache.get_or_train(
            key,
            self.mask_net,
            lambda: self.train_masks(clean_train, ctx.settings.batch_size, ctx.device),
            meta,
        )
        self.mask_net.cpu().eval().requires_grad_(False)

    def train_masks(self, data: ImageSet, batch_size: int, device: torch.device) -> nn.Module:
        """The authors' mask pre-training: diverse masks of area about mask_density."""
        net = self.mask_net.to(device).train()
        opt = torch.optim.Adam(net.parameters(), self.lr_mask, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 20], gamma=0.1)
        first = InMemoryLoader(data, batch_size, True, derive_seed(self.seed, "mask-a"))
        second = InMemoryLoader(data, batch_size, True, derive_seed(self.seed, "mask-b"))
        watch = DivergenceWatch(
            "input-aware's mask generator pre-training",
            self.lr_mask,
            self.mask_epochs,
            lr_setting="attack.lr_mask",
        )
        with seeded_global(self.seed, "input-aware-mask-training"):
            for epoch in range(self.mask_epochs):
                for (x1, _, _), (x2, _, _) in zip(first, second, strict=True):
                    x1, x2 = to_float(x1.to(device)), to_float(x2.to(device))
                    m1 = TriggerNet.threshold(net(x1))
                    m2 = TriggerNet.threshold(net(x2))
                    size_loss = F.relu(m1 - self.mask_density).mean()
                    loss = self.lambda_norm * size_loss + self.lambda_div * diversity_loss(
                        x1, x2, m1, m2
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    watch.observe(loss)
                sched.step()
                watch.check(epoch + 1, net.state_dict().values())
        return net.cpu().eval()

    # -- triggers ----------------------------------------------------------------------------------
    def generators(self) -> tuple[nn.Module, nn.Module]:
        """(G, M) of the poisoned model once it exists, else the untrained ones."""
        return self._trained or (self.pattern_net, self.mask_net)

    @torch.no_grad()
    def generate(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """Images x with the trigger generated for `source` (default: for x itself), batched."""
        patterns, masks = self.generators()
        device = getattr(self, "_device", torch.device("cpu"))
        patterns.to(device).eval()
        masks.to(device).eval()
        batch = getattr(self, "_batch_size", 1024)
        source = x if source is None else source
        out = [
            stamp_generated(
                x[i : i + batch].to(device), source[i : i + batch].to(device), patterns, masks
            ).cpu()
            for i in range(0, len(x), batch)
        ]
        patterns.cpu()
        masks.cpu()
        return torch.cat(out) if out else x.clone()

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self.generate(x)

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        # the trigger of a training sample is generated during training (InputAwareHook)
        return x

    def training_hooks(self) -> list[TrainingHook]:
        return [InputAwareHook(self)]

    # -- after training ------------------------------------------------------------------------------
    def after_training(self, test: ImageSet, ctx: RunContext) -> None:
        """Freeze copies of the generators the poisoned model came with (trained here or loaded
        from its cache entry); the backdoor and cross-trigger test sets are built from them."""
        self._trained = (
            copy.deepcopy(self.pattern_net).cpu().eval(),
            copy.deepcopy(self.mask_net).cpu().eval(),
        )
        other = other_rows(torch.arange(len(test)), len(test), ctx.generator("input-aware-cross"))
        cross_x = self.triggered(test.x, lambda xf: self.generate(xf, to_float(test.x[other])))
        self._cross = test.replace(x=cross_x)
        with torch.no_grad():  # a diagnostic: the mask generator should cover ~mask_density
            sample = to_float(test.x[:1000])
            self._mask_area = float(TriggerNet.threshold(self._trained[1](sample)).mean())

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """Cross-trigger accuracy: test inputs carrying another input's trigger, classified as
        their true label (the authors' third figure beside clean and attack accuracy)."""
        if self._cross is None:
            return {}
        return {
            "cross_acc": accuracy(predict_fn(self._cross.x), self._cross.y),
            "mask_area": self._mask_area,
        }


class InputAwareHook(TrainingHook):
    """Per batch: backdoor rows get their own generated trigger, cross rows another row's; the
    generator G trains through the classifier's loss plus the diversity loss."""

    def __init__(self, attack: InputAware) -> None:
        self.attack = attack
        self._diversity: Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.attack.pattern_net, "mask": self.attack.mask_net}

    def on_train_start(self, module: Trainee) -> None:
        if module.trainer.world_size > 1:
            raise BdrunError(
                "attack=input_aware trains its generator in one process; use trainer=cpu or gpu"
            )
        attack = self.attack
        attack.pattern_net.load_state_dict(attack._pattern_init)  # every run starts afresh
        self.patterns = attack.pattern_net.to(module.device).train()
        self.masks = attack.mask_net.to(module.device).eval()
        self.opt = torch.optim.Adam(self.patterns.parameters(), attack.lr_pattern, betas=(0.5, 0.9))
        self._g = generator(attack.seed, "input-aware-batches")

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        poisoned = module.data.poison[pos.cpu()]
        bd_rows = poisoned.nonzero().flatten()
        clean_rows = (~poisoned).nonzero().flatten()
        n_cross = min(round(len(x) * self.attack.cross_rate), len(clean_rows))
        cross_rows = clean_rows[torch.randperm(len(clean_rows), generator=self._g)[:n_cross]]
        if len(x) < 2 or (len(bd_rows) == 0 and n_cross == 0):
            return x, y
        self.follow_classifier_schedule(module)
        device = x.device
        out = x
        if n_cross:
            rows = cross_rows.to(device)
            sources = x[other_rows(cross_rows, len(x), self._g).to(device)]
            source_patterns = self.patterns(sources)
            source_masks = TriggerNet.threshold(self.masks(sources))
            targets = x[rows]
            out = out.index_put((rows,), targets + (source_patterns - targets) * source_masks)
        if len(bd_rows):
            rows = bd_rows.to(device)
            inputs = x[rows]
            patterns = self.patterns(inputs)
            masks = TriggerNet.threshold(self.masks(inputs))
            out = out.index_put((rows,), inputs + (patterns - inputs) * masks)
            # diversity as the authors: backdoor inputs paired with the cross-trigger sources
            pairs = min(len(rows), n_cross)
            if pairs:
                inputs, patterns = inputs[:pairs], patterns[:pairs]
                others, other_patterns = sources[:pairs], source_patterns[:pairs]
            else:
                others = x[other_rows(bd_rows, len(x), self._g).to(device)]
                other_patterns = self.patterns(others)
            self._diversity = self.attack.lambda_div * diversity_loss(
                inputs, others, patterns, other_patterns
            )
        return out, y

    def follow_classifier_schedule(self, module: Trainee) -> None:
        """G's lr = lr_pattern x (the classifier's lr now / its initial lr)."""
        now, base = module.trainer.optimizers[0].param_groups[0]["lr"], module.settings.lr
        for group in self.opt.param_groups:
            group["lr"] = self.attack.lr_pattern * (now / base if base > 0 else 1.0)

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor | None:
        if self._diversity is None:
            return None
        loss = F.cross_entropy(logits, y, label_smoothing=module.settings.label_smoothing)
        loss = loss + self._diversity
        self._diversity = None
        return loss

    def on_after_backward(self, module: Trainee) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
