"""Small MNIST CNN used to score samples of the reference model.

Why: the pack's quality numbers need a judge that does not depend on the diffusion model itself:
``logits`` gives class accuracy of generated digits (does the quantized model still draw the
requested class?) and ``features`` gives the penultimate 128-d activations for an FID-like distance
between quantized and full-precision sample sets (Heusel et al. 2017, with this net in place of
Inception).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

FEATURE_DIM = 128


class Classifier(nn.Module):
    """Images ``[B,1,28,28]`` in [0, 1] → 10 logits; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)
        self.dropout = nn.Dropout(0.3)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2.0 - 1.0
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # 14×14
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)  # 7×7
        return F.relu(self.fc(x.flatten(1)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)
