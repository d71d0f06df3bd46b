"""Linear CKA between two networks' representations, stage by stage (paper Table 1, E10).

Linear centred kernel alignment of feature matrices X ``[n, d1]`` and Y ``[n, d2]`` (one row per
input), with Xc, Yc their column-centred copies:

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
              = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   Kc = Xc Xc^T, Lc = Yc Yc^T  (the centred Grams)

It lies in [0, 1], is 1 for X against itself, and is unchanged by an orthogonal transform or an
isotropic scaling of either matrix, so two networks of different widths can be compared. Both forms
are computed in float64; the Gram form, whose cost grows with n rather than with d, is used when
d1 + d2 > n (convolutional stages flattened per input).

A trial's CKA columns (``tables.CKA_METRICS``) compare its final student with teacher member 0 (the
teacher itself at m = 1) on the first ``CKA_TEST_INPUTS`` test inputs. ``archs.stage_modules`` names
each network's stages; column j pairs the student's j-th chosen stage with the teacher's j-th
(``chosen_stages``): a network of at most three stages gives them in order, one of more gives its
first, its middle (index ``count // 2``: the third of vgg16's five blocks, of conv1d's and
smallcnn's four) and its last. A column is NaN where either network has no j-th chosen stage (the
default two-layer mlp has no third), and where a stage's features are constant over the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_ray.models.archs import stage_modules
from kd_ray.tables import CKA_METRICS

CKA_TEST_INPUTS = 2000  # the first this many test inputs: enough for a stable estimate, cheap to run
GRAM_CHUNK = 4096  # feature columns centred and multiplied at a time, so no float64 copy of all of X


def _on_float64_device(x: torch.Tensor) -> torch.Tensor:
    # MPS has no float64.
    return x.cpu() if x.device.type == "mps" else x


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix Xc Xc^T of the column-centred ``x`` ``[n, d]``."""
    x = _on_float64_device(x)
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], GRAM_CHUNK):
        block = x[:, start : start + GRAM_CHUNK].double()
        block = block - block.mean(dim=0)
        gram += block @ block.T
    return gram


def _ratio(numerator: torch.Tensor, norm_x: torch.Tensor, norm_y: torch.Tensor) -> float:
    denominator = (norm_x * norm_y).item()
    if denominator == 0.0 or not math.isfinite(denominator):
        return float("nan")  # constant (or non-finite) features: no direction to align
    value = numerator.item() / denominator
    # In [0, 1] by Cauchy-Schwarz; clipping removes only float64 rounding past the ends.
    return min(1.0, max(0.0, value)) if math.isfinite(value) else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of feature matrices ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` (rows: the same inputs)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(
            f"linear_cka needs feature matrices [n, d1] and [n, d2] with the same n >= 2 rows; "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    with torch.inference_mode():
        if d1 + d2 > n:
            gram_x, gram_y = centred_gram(x), centred_gram(y.to(_on_float64_device(x).device))
            return _ratio((gram_x * gram_y).sum(), gram_x.norm(), gram_y.norm())
        xc = _on_float64_device(x).double()
        yc = y.to(xc.device).double()
        xc, yc = xc - xc.mean(dim=0), yc - yc.mean(dim=0)
        return _ratio((yc.T @ xc).square().sum(), (xc.T @ xc).norm(), (yc.T @ yc).norm())


def module_outputs(
    model: nn.Module, modules: list[nn.Module], x: torch.Tensor, batch_size: int = 1024
) -> list[torch.Tensor]:
    """The outputs of ``modules`` (submodules of ``model``) on ``x``, one float32 ``[N, d]`` matrix
    each (flattened per input), from forward hooks; ``model`` runs in eval mode under inference mode
    and is left in the mode it was in."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]

    def keeper(index: int):
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # A copy: a later in-place op (a ReLU after an identity norm) may rewrite the output.
            captured[index].append(output.flatten(1).to(torch.float32, copy=True))

        return keep

    handles = [module.register_forward_hook(keeper(i)) for i, module in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            for start in range(0, x.shape[0], batch_size):
                model(x[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in captured]


def stage_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> list[torch.Tensor]:
    """``model``'s per-stage outputs on ``x`` (``archs.stage_modules``), input side first."""
    return module_outputs(model, stage_modules(model), x, batch_size)


def chosen_stages(count: int) -> list[int]:
    """The indices of the stages the CKA columns use, of a network with ``count`` stages."""
    if count <= len(CKA_METRICS):
        return list(range(count))
    return [0, count // 2, count - 1]


def stage_cka(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The CKA columns (``tables.CKA_METRICS``) between ``student`` and ``teacher`` on inputs ``x``."""
    chosen = {}
    for role, model in (("student", student), ("teacher", teacher)):
        stages = stage_modules(model)
        chosen[role] = [stages[i] for i in chosen_stages(len(stages))]
    pairs = min(len(chosen["student"]), len(chosen["teacher"]))
    student_features = module_outputs(student, chosen["student"][:pairs], x)
    teacher_features = module_outputs(teacher, chosen["teacher"][:pairs], x)
    return {
        name: linear_cka(student_features[j], teacher_features[j]) if j < pairs else float("nan")
        for j, name in enumerate(CKA_METRICS)
    }
