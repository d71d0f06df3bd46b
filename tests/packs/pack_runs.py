"""What the pack tests share: the tiny recipe, a pack run that records its checkpoints as Ray Tune stores
them, each student's weights in a checkpoint, and equality that holds NaN equal to NaN."""

from __future__ import annotations

import io
import math

import torch

from kd_ray.config import TrialConfig
from kd_ray.models.archs import build_model
from kd_ray.packs.run import run_pack
from kd_ray.packs.wide import student_state, widen

TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=2,
            epochs=3, eval_every=1, batch_size=256, device="cpu", precision="fp32")


def tiny(**changes) -> TrialConfig:
    return TrialConfig(**{**TINY, **changes})


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (a metric a network has no stage for)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def recorded(configs, store):
    """A pack's results and its checkpoints by epoch, each through torch.save and a weights-only load
    as a Ray Tune trial stores them."""
    checkpoints: dict[int, dict] = {}

    def keep(epoch: int, _metrics: dict, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        checkpoints[epoch] = torch.load(buffer, weights_only=True)

    return run_pack(configs, keep, store=store), checkpoints


def pack_weights(checkpoint: dict, arch: str = "mlp", input_shape: tuple[int, ...] = (40,), norm: str = "batch",
                 feature_major: bool | None = None) -> list[dict[str, torch.Tensor]]:
    """Each active student's weights in a pack checkpoint, under its narrow network's names."""
    template = build_model(arch, input_shape, 10, norm)
    active = checkpoint["pack"]["active"]
    wide = widen([template] * len(active), feature_major)
    wide.load_state_dict(checkpoint["pack"]["wide"])
    return [student_state(wide, template, k) for k in range(len(active))]
