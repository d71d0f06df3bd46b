"""The loss and the optimizer step of K students at once, each with its own hyperparameters.

``pack_kd_loss`` is ``losses.kd_loss`` for a ``[K, classes, batch]`` stack, with a temperature, a
label weight and a divergence per student. ``PackOptimizer`` is ``torch.optim.SGD`` (momentum 0.9,
Nesterov) and ``torch.optim.Adam`` (defaults), per student: every parameter of a wide network (``kd_ray.packs.wide``)
is seen as ``[K, -1]`` blocks, and learning rate, weight decay and the choice of optimizer are
vectors over K. The update arithmetic is that of torch's own optimizers, so a packed student
follows the same trajectory as one trained alone, up to the last bits of float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_ray.train.losses import divergence, divergence_scale

MOMENTUM = 0.9  # SGD's, as distill.make_optimizer
BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's defaults


def pack_kd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    alpha: torch.Tensor,
    mix_index: torch.Tensor | None = None,
    lam: float = 1.0,
    losses: Sequence[str] | None = None,
    jsd_beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[K]`` losses, student k's ``kd_loss`` with its own temperature, label weight ``alpha_k``,
    divergence ``losses[k]`` (all ``kl`` when ``None``) and ``jsd_beta[k]``, from class-major
    ``[K, classes, batch]`` logits and teacher log-probabilities."""
    soft = pack_divergences(student_logits, teacher_log_probs, temperature, losses, jsd_beta)
    if not bool((alpha > 0).any()):
        return soft
    k, _, batch = student_logits.shape
    logits = student_logits.float()
    hard = F.cross_entropy(logits, labels.expand(k, batch), reduction="none").mean(-1)
    if mix_index is not None and lam < 1.0:
        mixed = F.cross_entropy(logits, labels[mix_index].expand(k, batch), reduction="none").mean(-1)
        hard = lam * hard + (1.0 - lam) * mixed
    return torch.where(alpha > 0, alpha * hard + (1.0 - alpha) * soft, soft)


def pack_divergences(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    temperature: torch.Tensor,
    losses: Sequence[str] | None = None,
    jsd_beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[K]``: student k's divergence ``losses[k]`` from its teacher, batch mean times its scale
    (``losses.divergence_scale``). Students of one divergence are computed together: a pack of one
    divergence (``kl`` the common case) is one call over the whole stack, as before divergences varied."""
    k = student_logits.shape[0]
    names = ["kl"] * k if losses is None else list(losses)
    if len(names) != k:
        raise ValueError(f"pack_kd_loss: got {len(names)} losses for {k} students")
    groups = {name: [i for i, other in enumerate(names) if other == name] for name in dict.fromkeys(names)}
    if len(groups) == 1:
        beta = 0.5 if jsd_beta is None else jsd_beta.view(-1, 1, 1)
        return divergence(student_logits, teacher_log_probs, names[0], temperature.view(-1, 1, 1), beta,
                          dim=1).mean(-1) * divergence_scale(names[0], temperature)
    parts, order = [], []
    for name, members in groups.items():
        index = torch.tensor(members, device=student_logits.device)
        tau = temperature[index]
        beta = 0.5 if jsd_beta is None else jsd_beta[index].view(-1, 1, 1)
        values = divergence(student_logits[index], teacher_log_probs[index], name, tau.view(-1, 1, 1), beta,
                            dim=1).mean(-1)
        parts.append(values * divergence_scale(name, tau))
        order.extend(members)
    return in_students_order(parts, order)


def in_students_order(parts: Sequence[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """``[K]``: values computed group by group, ``parts`` concatenated, put back in the students' order, where
    ``order[j]`` is the student whose value is the j-th of the concatenation."""
    values = torch.cat(list(parts))
    return values[torch.tensor(list(order), device=values.device).argsort()]


class PackOptimizer:
    """SGD with Nesterov momentum or Adam, per student, over the parameters of a wide network."""

    def __init__(self, params: list[torch.nn.Parameter], students: int, weight_decay: list[float],
                 adam: list[bool]) -> None:
        self.params = params
        self.k = students
        device = params[0].device
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float32, device=device).view(-1, 1)
        self.adam = torch.tensor(adam, dtype=torch.bool, device=device).view(-1, 1)
        self.any_adam, self.any_sgd = any(adam), not all(adam)
        self.step_count = 0
        self.state: list[dict[str, torch.Tensor]] = [self._fresh(p) for p in params]

    def _fresh(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(self.k, p.numel() // self.k, device=p.device, dtype=p.dtype)
        state = {}
        if self.any_sgd:
            state["momentum"] = zeros.clone()
        if self.any_adam:
            state["exp_avg"], state["exp_avg_sq"] = zeros.clone(), zeros.clone()
        return state

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with ``lr`` ``[K]``, the students' learning rates at this step."""
        self.step_count += 1
        lr = lr.view(-1, 1)
        if self.any_adam:
            bias1 = 1.0 - BETAS[0] ** self.step_count
            bias2_sqrt = (1.0 - BETAS[1] ** self.step_count) ** 0.5
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            weights = p.view(self.k, -1)
            grad = p.grad.view(self.k, -1).addcmul_(weights, self.weight_decay)  # grad + wd * p, in place
            if not self.any_adam:
                buf = state["momentum"]
                buf.mul_(MOMENTUM).add_(grad)
                weights.addcmul_(grad.add_(buf, alpha=MOMENTUM), lr, value=-1.0)  # Nesterov
                continue
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1.0 - BETAS[0])
            exp_avg_sq.mul_(BETAS[1]).addcmul_(grad, grad, value=1.0 - BETAS[1])
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(EPS)
            update = (lr / bias1) * exp_avg / denom
            if self.any_sgd:
                buf = state["momentum"]
                buf.mul_(MOMENTUM).add_(grad)
                update = torch.where(self.adam, update, lr * grad.add(buf, alpha=MOMENTUM))
            weights.sub_(update)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "state": [{k: v.clone() for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, saved: dict) -> None:
        self.step_count = int(saved["step_count"])
        self.state = [{k: v.to(p.device).clone() for k, v in s.items()} for s, p in zip(saved["state"], self.params)]

    def keep(self, keep: list[int], params: list[torch.nn.Parameter]) -> "PackOptimizer":
        """This optimizer for the students ``keep`` only, over the parameters of their wide network."""
        index = torch.tensor(keep, device=self.weight_decay.device)
        other = PackOptimizer.__new__(PackOptimizer)
        other.params, other.k = params, len(keep)
        other.weight_decay, other.adam = self.weight_decay[index], self.adam[index]
        adam = other.adam.view(-1).tolist()
        other.any_adam, other.any_sgd = any(adam), not all(adam)
        other.step_count = self.step_count
        other.state = [{name: value[index].clone() for name, value in state.items()
                        if (name == "momentum" and other.any_sgd) or (name != "momentum" and other.any_adam)}
                       for state in self.state]
        return other
