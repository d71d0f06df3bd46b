"""The ensemble rule that turns member logits into one prediction, and two ways to run the members.

``ensemble_log_probs`` is the definition (docs/architecture.md): ``log(mean_i softmax(z_i))``.
``StackedEnsemble`` runs all members as one vectorized call; ``LoopEnsemble`` runs them one after
another and is the reference the stacked one is checked against (``kd_ray.train.fastpath`` picks one).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn


def ensemble_log_probs(member_logits: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """``[m, N, C]`` member logits -> ``[N, C]`` float32 log(mean_i softmax(z_i)); with
    ``class_dim=1``, ``[m, C, N]`` -> ``[C, N]``."""
    if member_logits.dim() != 3 or member_logits.shape[0] < 1:
        raise ValueError(
            f"ensemble_log_probs expects member logits of shape [m, N, C] with m >= 1; "
            f"got {tuple(member_logits.shape)}"
        )
    # logsumexp over log-softmaxes never forms a probability that could underflow to 0.
    log_probs = torch.log_softmax(member_logits.float(), dim=class_dim)
    return torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])


class StackedEnsemble:
    """Members of one architecture run as a single vectorized call (``torch.func.vmap``).

    The members' parameters and buffers are stacked along a new leading dimension, so one forward
    pass computes all ``m`` members' logits; members must be in eval mode (running statistics).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        if not members:
            raise ValueError("StackedEnsemble needs at least one member")
        params, buffers = torch.func.stack_module_state(members)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        # A parameter-free skeleton: functional_call supplies each member's tensors.
        skeleton = copy.deepcopy(members[0]).to("meta").eval()

        def member_logits(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(skeleton, (p, b), (x,))

        self._logits = torch.func.vmap(member_logits, in_dims=(0, 0, None))
        self.size = len(members)
        self.dtype = torch.float32

    def cast(self, dtype: torch.dtype) -> "StackedEnsemble":
        """A copy whose members run in ``dtype`` (e.g. bfloat16 on a bf16-capable device)."""
        other = copy.copy(self)
        other.params = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.params.items()}
        other.buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.buffers.items()}
        other.dtype = dtype
        return other

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[m, N, C]`` member logits on the batch ``x``, in the ensemble's dtype."""
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False), warnings.catch_warnings():
            # vmap falls back to a loop for a few ops (adaptive pooling); fastpath measures the cost.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return self._logits(self.params, self.buffers, x.to(self.dtype))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.logits(x))


class LoopEnsemble:
    """The reference execution: members one after another; same interface as StackedEnsemble."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.dtype = torch.float32
        self.size = len(members)

    def cast(self, dtype: torch.dtype) -> "LoopEnsemble":
        other = LoopEnsemble([copy.deepcopy(m).to(dtype) for m in self.members])
        other.dtype = dtype
        return other

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            x = x.to(self.dtype)
            return torch.stack([member(x) for member in self.members])

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.logits(x))

