"""How many students fit in one pack: the memory budget of a pack, the bytes one student adds to it,
and the size limit that follows. Builds one student network to measure it; no Ray."""

from __future__ import annotations

import os

import torch

from kd_ray.config import TrialConfig
from kd_ray.data.datasets import dataset_info
from kd_ray.packs.plan import PACK_LIMIT
from kd_ray.train.distill import build_seeded

UNSEEN_GPU_BYTES = 16 * 2**30  # a GPU the driver cannot see is taken to have this much memory


def memory_budget(gpus_per_trial: float, slots: int) -> float:
    """Bytes a pack's students may take: half the trial's share of a GPU, or half this machine's free
    memory over the trials that run at once."""
    if gpus_per_trial > 0:
        total = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else UNSEEN_GPU_BYTES
        return 0.5 * total * min(1.0, gpus_per_trial)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0.5 * free / slots


def student_bytes(cfg: TrialConfig) -> int:
    """Memory one student adds to a pack: weights, gradients and two optimizer states, plus the
    activations of one training batch kept for the backward pass (measured by a forward pass)."""
    info = dataset_info(cfg.dataset)
    model = build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, 0,
                         cfg.student_arch_args).train()
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(cfg.batch_size, *info.input_shape))
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for p in model.parameters())
    return 4 * (4 * parameters + 2 * sum(outputs))


def max_pack_size(cfg: TrialConfig, budget_bytes: float, limit: int = PACK_LIMIT) -> int:
    """The most students of ``cfg``'s shape a pack may hold within ``budget_bytes`` (1 at least)."""
    return max(1, min(limit, int(budget_bytes // student_bytes(cfg))))
