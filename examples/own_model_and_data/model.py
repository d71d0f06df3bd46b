"""A user's model for kd_ray: a small MLP with one residual block.

kd_ray calls ``build(input_shape=..., num_classes=..., **args)`` with ``args`` from ``--set
student_arch_args='{"hidden": 32}'`` and expects a ``torch.nn.Module`` mapping ``[batch, *input_shape]``
to ``[batch, num_classes]`` logits.
"""

import math

from torch import nn


class ResidualMLP(nn.Module):
    """Flatten, a linear layer to ``hidden`` units, one residual block (two linear layers), a linear head."""

    def __init__(self, features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.relu = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)
        # The stages kd_ray compares with CKA: the embedding and the residual block's output.
        self.stage_names = ("embed", "relu")

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.relu(h + self.block(h)))


def build(input_shape, num_classes, hidden=64):
    return ResidualMLP(math.prod(input_shape), num_classes, hidden)
