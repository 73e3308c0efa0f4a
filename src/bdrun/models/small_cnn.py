"""A BadNets-style small CNN for grey or colour images of any size from 4x4 up."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from bdrun.models.base import ImageClassifier, require_features


class SmallCNN(ImageClassifier):
    """Two 3x3 conv + max-pool stages, one hidden dense layer, a linear head.

    Gu et al.'s BadNets MNIST net uses two conv stages and one hidden dense layer too; 'same'
    padding here lets the net take 8x8 digits as well as 28x28 or 32x32 images. With
    `batch_norm` each conv is followed by a BatchNorm2d (bn1, bn2) before its ReLU, the
    conv-BN pairs that BN-based defenses such as CLP read (conf/model/small_cnn_bn.yaml); without
    it the net, its parameters and their initialisation are the plain BadNets-style CNN's.
    """

    prune_layer = "conv2"
    rank_layer = "relu2"

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(in_shape, num_classes, mean, std)
        channels = self.in_shape[0]
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(require_features(self.trunk, "small_cnn", self.in_shape), hidden)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def trunk(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        return self.pool2(self.relu2(self.bn2(self.conv2(x))))

    def embed(self, x: Tensor) -> Tensor:
        return self.dropout(self.relu3(self.fc1(self.trunk(x).flatten(1))))
