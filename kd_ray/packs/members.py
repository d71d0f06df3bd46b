"""Teacher members trained fused: K members of one recipe as one wide network, each fed its own batches.

Members of a study share an architecture and a recipe but not their data stream: each has its own
initial weights, batch order and augmentation draws (``teachers.member_streams``) and, under
``teacher_split=half``, its own training half. A fused group keeps all of that per member: member k's
batches come from its own generators through ``distill.epoch_batches``, the very function ``fit``
draws a lone member's batches with, and are stacked feature-major, ``[K, features, batch]``, so the
wide network's first layer takes each member's own input (``wide.FeatureMajorLinear``) and every batch
norm normalises a member's channels over that member's batch. The loss is the sum of the members'
cross-entropies, so each block of the wide network receives its own member's gradient; SGD (momentum,
weight decay, the cosine schedule) is elementwise, so one optimizer over the wide parameters steps
each member as its own would. The result is what ``teachers.train_member`` returns, member by member,
within float32 rounding of training it alone.

Only plain MLPs fuse (the feature-major layout); ``can_fuse_members`` says why a group cannot, and
``ensure_members_fused`` trains such members one by one, as before.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.config import TrialConfig
from kd_ray.data.augment import AugmentedBatch
from kd_ray.data.datasets import Arrays, dataset_info
from kd_ray.models.archs import build_model
from kd_ray.packs.plan import split_evenly
from kd_ray.packs.wide import feature_major_applies, narrow, per_network_forward, stack_inputs, widen
from kd_ray.progress import Progress
from kd_ray.train.distill import (
    AugmentSpec,
    Diverged,
    Recipe,
    epoch_batches,
    lr_at,
    make_optimizer,
    schedule,
)
from kd_ray.train.teachers import (
    NeededMember,
    TeacherStore,
    finish_member,
    member_key,
    start_member,
    teacher_indices,
    teacher_recipe,
    train_member,
)

# The fields that must agree for members to share one wide network and one schedule.
FUSE_FIELDS = ("dataset", "teacher_arch", "teacher_arch_args", "norm", "teacher_epochs", "teacher_batch_size",
               "teacher_lr", "device")
MAX_GROUP = 16  # members per fused group: beyond it a CPU step gains little, and one group holds one task longer

MemberResult = tuple[dict, dict, dict]  # (weights, logits, metrics), as teachers.train_member returns


def fuse_key(cfg: TrialConfig) -> tuple:
    """What members of one fused group share (``FUSE_FIELDS``)."""
    return tuple(getattr(cfg, name) for name in FUSE_FIELDS)


@functools.lru_cache(maxsize=None)
def _layout_refusal(arch: str, arch_args: str, dataset: str, norm: str) -> str | None:
    info = dataset_info(dataset)
    template = build_model(arch, info.input_shape, info.num_classes, norm, arch_args)
    if feature_major_applies(template):
        return None
    return (f"teacher_arch={arch!r} is not a plain MLP (linear layers, 1-D norms and ReLUs), the only "
            "architecture whose members fuse")


def can_fuse_members(cfgs: Sequence[TrialConfig]) -> str | None:
    """None when the members of ``cfgs`` can train as one fused group; else why not, in one line. The
    members must share ``FUSE_FIELDS`` and be plain MLPs; their training sets must also be of one size,
    which ``train_members_fused`` checks once the data is loaded."""
    first = cfgs[0]
    for name in FUSE_FIELDS:
        values = sorted({repr(getattr(cfg, name)) for cfg in cfgs})
        if len(values) > 1:
            return f"the members differ in {name} ({', '.join(values)})"
    return _layout_refusal(first.teacher_arch, first.teacher_arch_args, first.dataset, first.norm)


# --- the fused training loop ---------------------------------------------------------------------


def member_losses(logits: torch.Tensor, drawn: Sequence[tuple[AugmentedBatch, torch.Tensor]]) -> torch.Tensor:
    """``[K]``: member k's cross-entropy on its own batch, from ``[K, classes, batch]`` logits, with the
    partner labels mixed in (weight ``1 - lam``) where its augmentation mixed inputs, as ``fit`` does."""
    labels = torch.stack([y for _, y in drawn])
    losses = F.cross_entropy(logits.float(), labels, reduction="none").mean(-1)
    if all(batch.mix_index is None for batch, _ in drawn):
        return losses
    partners = torch.stack([y if batch.mix_index is None else y[batch.mix_index] for batch, y in drawn])
    lam = torch.tensor([batch.lam for batch, _ in drawn], device=logits.device)
    return lam * losses + (1.0 - lam) * F.cross_entropy(logits.float(), partners, reduction="none").mean(-1)


def fit_members(
    wide: nn.Sequential,
    fit_data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    generators: Sequence[tuple[torch.Generator, torch.Generator]],
    recipe: Recipe,
    augment_spec: AugmentSpec,
    on_epoch=None,
) -> None:
    """Train the feature-major ``wide`` network of K members for ``schedule(recipe, n)``: each step
    member k's batch is drawn from ``fit_data[k]`` by its own ``generators[k]`` (batch order, augmentation)
    exactly as ``distill.fit`` draws it alone. ``on_epoch(epoch, mean losses, lr)`` after each epoch."""
    plan = schedule(recipe, fit_data[0][0].shape[0])
    optimizer = make_optimizer(wide, recipe)
    device = fit_data[0][0].device
    for epoch in range(plan.epochs):
        wide.train()
        loss_sum = torch.zeros(len(fit_data), device=device)
        steps = plan.steps_in(epoch)
        streams = [epoch_batches(x, y, steps, recipe, augment_spec, batch_generator, augment_generator)
                   for (x, y), (batch_generator, augment_generator) in zip(fit_data, generators)]
        lr = recipe.lr
        for i, drawn in enumerate(zip(*streams)):
            lr = lr_at(recipe, epoch * plan.steps_per_epoch + i, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = per_network_forward(wide, stack_inputs([batch.x for batch, _ in drawn]), class_major=True)
            losses = member_losses(logits, drawn)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # blocks never mix: each member's gradient is its own loss's
            optimizer.step()
            loss_sum += losses.detach()
        mean_losses = (loss_sum / steps).tolist()  # one host sync per epoch, as in fit
        for loss in mean_losses:
            if not math.isfinite(loss):
                raise Diverged(epoch + 1, loss)
        if on_epoch is not None:
            on_epoch(epoch + 1, mean_losses, lr)


def train_members_fused(
    cfg_members: Sequence[tuple[TrialConfig, int, str]],
    arrays: Arrays,
    device: torch.device,
    progress: Progress | None = None,
) -> list[MemberResult]:
    """Train the members ``(cfg, member, role)`` from scratch as one fused group; for each, in order, what
    ``teachers.train_member`` returns: initial and final state dicts under the narrow network's keys, its
    float32 logits on the test and the whole train set, and metrics (``train_time_s``: its share of the
    group's time). Raises ValueError when ``can_fuse_members`` refuses them or their training sets differ
    in size."""
    members = [NeededMember(*needed) for needed in cfg_members]
    reason = can_fuse_members([m.cfg for m in members])
    if reason:
        raise ValueError(f"train_members_fused: {reason}")
    base = members[0].cfg
    info = dataset_info(base.dataset)
    recipe = teacher_recipe(base)
    started = time.perf_counter()

    # --- each member's network, training set and generators, as train_member sets them up alone ---
    begins = [start_member(cfg, member, role, arrays, device) for cfg, member, role in members]
    fit_data = [(begin.x_fit, begin.y_fit) for begin in begins]
    sizes = sorted({len(x) for x, _ in fit_data})
    if len(sizes) > 1:
        raise ValueError(f"train_members_fused: the members' training sets differ in size ({sizes}); "
                         "fuse only members whose epochs have the same number of steps")

    # --- one wide network, every member fed its own batches ---
    wide = widen([begin.model for begin in begins], feature_major=True)

    def on_epoch(epoch: int, losses: list[float], lr: float) -> None:
        if progress and (epoch % max(1, recipe.epochs // 5) == 0 or epoch == recipe.epochs):
            progress(f"teacher members fused ({len(members)}): epoch {epoch}/{recipe.epochs} "
                     f"mean loss {sum(losses) / len(losses):.3f}")

    augment_spec = AugmentSpec(info.kind, info.crop_pad, info.hflip)
    fit_members(wide, fit_data, [begin.generators for begin in begins], recipe, augment_spec, on_epoch)

    # --- each member's final weights and logits, from its own narrow network ---
    results = [finish_member(narrow(wide, begin.model, k), begin.initial, arrays, device)
               for k, begin in enumerate(begins)]
    share = (time.perf_counter() - started) / len(members)
    for _, _, metrics in results:
        metrics.update(train_time_s=share, fused_members=len(members))
    return results


# --- groups, and the store ------------------------------------------------------------------------


def member_groups(members: Iterable[NeededMember], tasks_at_least: int = 1,
                  max_group: int = MAX_GROUP) -> tuple[list[list[NeededMember]], dict[tuple, str]]:
    """The members in groups to train one task each: members that fuse (``fuse_key``) together, at most
    ``max_group`` to a group, split further until there are ``tasks_at_least`` groups (so every slot of
    the cluster trains) or every group is a single member. Members that cannot fuse each get a group of
    their own. Returns the groups and, by fuse key, why the members of that key were refused."""
    by_key: dict[tuple, list[NeededMember]] = {}
    for needed in members:
        by_key.setdefault(fuse_key(needed.cfg), []).append(needed)
    groups: list[list[NeededMember]] = []
    refused: dict[tuple, str] = {}
    parts: dict[tuple, int] = {}  # fusable key: into how many groups its members are split
    for key, same in by_key.items():
        reason = can_fuse_members([same[0].cfg])
        if reason:
            refused[key] = reason
            groups += [[needed] for needed in same]
        else:
            parts[key] = math.ceil(len(same) / max_group)
    # One more group at a time, for the key whose groups are largest, until the slots are filled.
    while parts and len(groups) + sum(parts.values()) < tasks_at_least:
        key = max(parts, key=lambda k: math.ceil(len(by_key[k]) / parts[k]))
        if math.ceil(len(by_key[key]) / parts[key]) < 2:
            break
        parts[key] += 1
    for key, count in parts.items():
        groups += split_evenly(by_key[key], count)
    return groups, refused


def ensure_members_fused(
    members: Sequence[tuple[TrialConfig, int, str]],
    store: TeacherStore,
    arrays: Arrays,
    device: torch.device,
    progress: Progress | None = None,
    max_group: int = MAX_GROUP,
) -> list[str]:
    """Make sure the members ``(cfg, member, role)`` are in ``store``: the missing ones that fuse train as
    fused groups (one per fuse key and training-set size, at most ``max_group`` each), the others one by one
    (``teachers.train_member``). Each is stored under its own key, spec and lock, as ``teachers.ensure_members``
    stores it; a member another process stored meanwhile is not trained again. Returns the keys, in order."""
    needed = [NeededMember(*m) for m in members]
    keys = [member_key(m.cfg, m.member, m.role) for m in needed]
    missing = [m for m, key in zip(needed, keys) if not store.has(key)]
    groups, _ = member_groups(missing, max_group=max_group)
    for group in groups:
        by_size: dict[int, list[NeededMember]] = {}
        for m in group:
            by_size.setdefault(len(teacher_indices(m.cfg, arrays.y_train)), []).append(m)
        for same_size in by_size.values():
            _train_and_store(same_size, store, arrays, device, progress)
    return keys


def _train_and_store(group: list[NeededMember], store: TeacherStore, arrays: Arrays, device: torch.device,
                     progress: Progress | None) -> None:
    """Train the members of ``group`` not yet stored (fused when more than one) and store each, holding
    every member's lock meanwhile (taken in key order, so two groups never wait on each other)."""
    keys = {member_key(m.cfg, m.member, m.role): m for m in group}
    with contextlib.ExitStack() as locks:
        for key in sorted(keys):
            locks.enter_context(store.lock(key))
        todo = [(key, m) for key, m in keys.items() if not store.has(key)]  # others may have stored some
        if len(todo) > 1:
            results = train_members_fused([m for _, m in todo], arrays, device, progress)
        else:
            results = [train_member(m.cfg, m.member, arrays, device, m.role, progress) for _, m in todo]
        for (key, m), (weights, logits, metrics) in zip(todo, results):
            store.save(key, m.cfg.teacher_spec(m.member, m.role), weights, logits, metrics)
            if progress:
                progress(f"teacher member {m.member} stored as {key} (test acc {metrics['test_acc']:.3f})")
