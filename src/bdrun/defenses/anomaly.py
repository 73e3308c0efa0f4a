"""The MAD outlier rule of model inspectors: which labels stand out from the others.

Neural Cleanse (Wang et al., IEEE S&P 2019; the authors' mad_outlier_detection.py) flags a label
whose score lies more than 2 consistency-scaled median absolute deviations from the median, on
the side that reveals a backdoor; NeuronInspect (Huang et al. 2019) applies the same rule to its
combined heatmap features.
"""

from __future__ import annotations

import torch
from torch import Tensor

CONSISTENCY = 1.4826  # MAD -> standard deviation for normally distributed norms (authors' code)


def mad_anomaly_index(l1: Tensor, consistency: float = CONSISTENCY) -> tuple[Tensor, float, float]:
    """(anomaly index per label, median, MAD) of the reversed triggers' L1 norms.

    The authors' mad_outlier_detection.py: MAD = consistency * median(|l1 - median|), and a
    label's index is its distance from the median in MADs. Here the index is signed towards the
    small side, (median - l1) / MAD, since only unusually small triggers reveal a backdoor: a
    label is flagged when its index exceeds 2 (the paper's threshold). An all-equal set of norms
    (MAD 0) gets index 0 everywhere.
    """
    l1 = l1.double()
    median = float(torch.quantile(l1, 0.5))  # numpy's median: mean of the middle two
    mad = consistency * float(torch.quantile((l1 - median).abs(), 0.5))
    if mad == 0:
        return torch.zeros_like(l1), median, 0.0
    return (median - l1) / mad, median, mad


def flagged_labels(index: Tensor, labels: Tensor, threshold: float = 2.0) -> list[int]:
    """Labels whose anomaly index exceeds `threshold`, smallest trigger (largest index) first."""
    hits = (index > threshold).nonzero().flatten()
    return [int(labels[i]) for i in hits[torch.argsort(index[hits], descending=True)]]
