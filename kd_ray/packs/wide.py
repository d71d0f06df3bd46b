"""K networks of one architecture as one wide network: the students of a pack in one forward pass.

Student k owns block k of every layer's channels (features): a linear or convolution layer becomes
one block-diagonal (grouped) layer, a norm layer one over K times the channels, so one call runs
every student and no student's numbers touch another's. The first layer reads the shared input
once: its K blocks form one ordinary layer of K times the outputs. Activations are laid out
``[batch, K * channels, ...]``, student-major, so ReLU, pooling, flattening and residual sums work
unchanged; the wide network's output is ``[K, batch, classes]``. A plain MLP runs feature-major
(``[K, features, batch]``: batched matmuls without transposes, and its batch norm a layer norm of
each channel over the batch), and hands the pack's loss its logits ``[K, classes, batch]``; for
evaluation its batch norms fold into the linear layers before them (``fold_batch_norms``).

Every parameter and buffer of the wide network keeps its name; ``tensor.view(K, *shape)[k]`` is
student k's (``shape`` that of the narrow network), so a student is taken out (``narrow``) or left
out (``keep``) by slicing. A scalar buffer (BatchNorm's step count) is shared: the students step
together. Only the layers below, inside networks of ``kd_ray.models.archs`` or torch's containers, are
widened; any other layer raises ``NotFusable``. A user's factory may build such layers: a study asks
``unwidened_students`` before it plans its packs, and runs those students one per trial, unpacked.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.config import TrialConfig, is_user_function
from kd_ray.data.datasets import dataset_info
from kd_ray.train.distill import build_seeded

# Layers that act on each channel (or element) alone, whatever the number of channels.
_CHANNELWISE = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Identity)


class NotFusable(ValueError):
    """A network holds a layer that cannot be widened block by block."""


class WideLinear(nn.Module):
    """K linear layers: ``weight`` ``[K, out, in]``, ``bias`` ``[K, out]``."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = len(layers), layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        has_bias = layers[0].bias is not None
        self.register_parameter("bias", nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))
                                if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if x.shape[1] == self.in_features and self.k > 1:  # the shared input: one layer of K * out outputs
            bias = None if self.bias is None else self.bias.reshape(-1)
            return F.linear(x, self.weight.reshape(-1, self.in_features), bias)
        blocks = x.reshape(batch, self.k, self.in_features).transpose(0, 1)  # [K, B, in]
        out = torch.bmm(blocks, self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.transpose(0, 1).reshape(batch, self.k * self.out_features)


class WideConv(nn.Module):
    """K convolutions as one grouped convolution: ``weight`` ``[K * out, in / groups, *kernel]``."""

    def __init__(self, layers: list[nn.Conv1d | nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        if first.padding_mode != "zeros" or isinstance(first.padding, str):
            raise NotFusable(f"{type(first).__name__} with padding {first.padding!r} ({first.padding_mode})")
        self.k, self.in_channels, self.groups = len(layers), first.in_channels, first.groups
        self.conv = F.conv1d if isinstance(first, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]))
        has_bias = first.bias is not None
        self.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers])) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shared input has in_channels; the students' activations K * in_channels.
        groups = self.groups if x.shape[1] == self.in_channels and self.k > 1 else self.groups * self.k
        return self.conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


def _wide_norm(layers: list[nn.Module]) -> nn.Module:
    first, k = layers[0], len(layers)
    if isinstance(first, nn.GroupNorm):
        wide = nn.GroupNorm(k * first.num_groups, k * first.num_channels, first.eps, first.affine)
    else:
        wide = type(first)(k * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats)
    state = {}
    for name, value in first.state_dict().items():
        values = [layer.state_dict()[name] for layer in layers]
        state[name] = value.clone() if value.dim() == 0 else torch.cat(values)
    wide.load_state_dict(state)
    return wide.to(first.weight.device if first.affine else next(iter(state.values())).device)


class FeatureMajorLinear(WideLinear):
    """K linear layers on activations laid out ``[K, features, batch]`` (the shared input: ``[batch, in]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.unsqueeze(2)
        if x.dim() == 2:  # the shared input: one layer of K * out outputs, then per-student blocks
            weight = self.weight.reshape(-1, self.in_features)
            out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias.reshape(-1, 1), weight, x.t())
            return out.view(self.k, self.out_features, -1)
        return torch.bmm(self.weight, x) if bias is None else torch.baddbmm(bias, self.weight, x)

    def folded(self, scale: torch.Tensor, shift: torch.Tensor) -> "FeatureMajorLinear":
        """This layer followed by ``out * scale + shift`` (``[K, out]`` each), as one layer with a bias."""
        out = copy.copy(self)
        bias = shift if self.bias is None else self.bias * scale + shift
        out._parameters = {"weight": nn.Parameter(self.weight * scale.unsqueeze(-1), requires_grad=False),
                           "bias": nn.Parameter(bias, requires_grad=False)}
        return out


@torch.no_grad()
def fold_batch_norms(wide: nn.Module) -> nn.Module:
    """For evaluation: a copy of a feature-major wide network (in eval mode) whose batch norms are
    folded into the linear layers before them, ``W' = s W`` and ``b' = s (b - mean) + beta``, so
    each hidden layer is one matmul with a bias, then its ReLU. Any other network is returned as is."""
    if not isinstance(wide, nn.Sequential) or wide.training:
        return wide
    layers: list[nn.Module] = []
    for layer in wide:
        previous = layers[-1] if layers else None
        if (isinstance(layer, FeatureMajorBatchNorm) and layer.running_mean is not None
                and isinstance(previous, FeatureMajorLinear)):
            scale, shift = layer.affine_map()
            layers[-1] = previous.folded(scale.view(previous.k, -1), shift.view(previous.k, -1))
        else:
            layers.append(layer)
    if len(layers) == len(wide):
        return wide
    folded = nn.Sequential(*layers).eval()
    folded.students, folded.stage_names = wide.students, getattr(wide, "stage_names", ())
    return folded


class FeatureMajorBatchNorm(nn.BatchNorm1d):
    """BatchNorm over K * features channels, on ``[K, features, batch]``: each channel over the batch.

    In training, each channel's normalisation over the batch is a layer norm over the last dimension
    (torch's batch norm on this layout is slower on a CPU: docs/performance.md), then the affine map;
    the running statistics are updated as torch's batch norm updates them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = (*x.shape[:-1], 1)
        if not self.training and self.running_mean is not None:
            scale, shift = self.affine_map()
            return x * scale.view(channels).to(x.dtype) + shift.view(channels).to(x.dtype)
        batch = x.shape[-1]
        out, mean, rstd = torch.native_layer_norm(x, [batch], None, None, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # as torch's: the unbiased variance enters the running estimate
                var = (rstd.float().pow(-2) - self.eps) * (batch / max(batch - 1, 1))
                self.running_mean.lerp_(mean.float().view(-1), momentum)
                self.running_var.lerp_(var.view(-1), momentum)
        if self.affine:
            out = out * self.weight.view(channels).to(out.dtype) + self.bias.view(channels).to(out.dtype)
        return out

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` per channel: evaluation mode's ``x * scale + shift``."""
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return scale, shift


class FeatureMajorGroupNorm(nn.GroupNorm):
    """GroupNorm(1, features) of each student, on ``[K, features, batch]``: each sample over its features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, features, _ = x.shape
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.view(k, features, 1) + self.bias.view(k, features, 1)
        return out


def _feature_major(template: nn.Module) -> bool:
    """A plain stack of linear layers, 1-D norms and ReLUs: it runs without any transposes."""
    if type(template) is not nn.Sequential:
        return False
    for layer in template:
        if isinstance(layer, nn.GroupNorm) and layer.num_groups != 1:
            return False
        plain = isinstance(layer, (nn.Linear, nn.BatchNorm1d, nn.GroupNorm, nn.ReLU, nn.Identity, nn.Flatten))
        if not plain and not (_from_models(layer) and not list(layer.parameters())):
            return False
    return True


def _widen_feature_major(layers: list[nn.Module]) -> nn.Module:
    first, k = layers[0], len(layers)
    if isinstance(first, nn.Linear):
        wide = FeatureMajorLinear(layers)
        return wide
    if isinstance(first, (nn.BatchNorm1d, nn.GroupNorm)):
        norm = _wide_norm(layers)
        if isinstance(first, nn.GroupNorm):
            wide = FeatureMajorGroupNorm(k, k * first.num_channels, first.eps, first.affine)
        else:
            wide = FeatureMajorBatchNorm(k * first.num_features, first.eps, first.momentum, first.affine,
                                         first.track_running_stats)
        wide.load_state_dict(norm.state_dict())
        return wide.to(next(iter(norm.state_dict().values())).device)
    return copy.deepcopy(first)


def _widen_layer(layers: list[nn.Module]) -> nn.Module:
    first = layers[0]
    if isinstance(first, nn.Linear):
        return WideLinear(layers)
    if isinstance(first, (nn.Conv1d, nn.Conv2d)):
        return WideConv(layers)
    if isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
        return _wide_norm(layers)
    flatten_rows = isinstance(first, nn.Flatten) and first.start_dim == 1 and first.end_dim == -1
    if isinstance(first, _CHANNELWISE) or flatten_rows:
        return copy.deepcopy(first)
    if not list(first.children()) and not list(first.parameters(recurse=False)) and _from_models(first):
        return copy.deepcopy(first)  # an elementwise layer of kd_ray.models.archs (the image scaling)
    raise NotFusable(f"{type(first).__name__} cannot be widened block by block")


def _from_models(module: nn.Module) -> bool:
    # kd_ray.models.archs' containers call their layers in order and flatten from dim 1: layout-agnostic.
    return type(module).__module__ in ("kd_ray.models.archs", "torch.nn.modules.container")


def feature_major_applies(template: nn.Module) -> bool:
    """Whether ``widen`` can lay ``template``'s activations out feature-major (a plain MLP)."""
    return _feature_major(template)


def widen(models: list[nn.Module], feature_major: bool | None = None) -> nn.Module:
    """One wide network computing ``models`` (one architecture, K >= 1 of them) side by side;
    feature-major where it applies unless ``feature_major=False`` (both compute the same numbers)."""
    template = models[0]

    def build(parts: list[nn.Module]) -> nn.Module:
        children = list(parts[0].named_children())
        if not children:
            return _widen_layer(parts)
        if not _from_models(parts[0]):
            raise NotFusable(f"{type(parts[0]).__name__} is not a network of kd_ray.models.archs")
        wide = copy.copy(parts[0])
        wide._modules = {}
        for name, _ in children:
            wide._modules[name] = build([getattr(part, name) for part in parts])
        wide._parameters = {}  # containers of kd_ray.models.archs hold layers, not parameters of their own
        if list(parts[0].parameters(recurse=False)):
            raise NotFusable(f"{type(parts[0]).__name__} holds parameters of its own")
        return wide

    if _feature_major(template) and feature_major is not False:
        wide = nn.Sequential(*(_widen_feature_major([m[i] for m in models]) for i in range(len(template))))
        wide.stage_names = getattr(template, "stage_names", ())
    else:
        wide = build(models)
    wide.students = len(models)
    wide.train(template.training)
    return wide


def wide_forward(wide: nn.Module, x: torch.Tensor, class_major: bool = False) -> torch.Tensor:
    """``[K, batch, classes]`` logits of every student on the shared batch ``x``; with ``class_major``,
    ``[K, classes, batch]`` (contiguous): the layout the pack's loss takes, since a CPU softmax over a
    last dimension of ten classes is many times slower than over the middle one (docs/performance.md)."""
    out = wide(x)
    if out.dim() == 3:  # feature-major: [K, classes, batch]
        return out if class_major else out.transpose(1, 2).contiguous()
    blocks = out.reshape(out.shape[0], wide.students, -1)  # [batch, K, classes]
    return blocks.permute(1, 2, 0).contiguous() if class_major else blocks.transpose(0, 1)


def stack_inputs(batches: list[torch.Tensor], feature_major: bool = True) -> torch.Tensor:
    """Each network's own batch, ``[batch, ...]`` each, as the input of a wide network whose network k reads
    ``batches[k]`` (``per_network_forward``): feature-major ``[K, features, batch]``, each batch flattened; in
    channel blocks ``[batch, K * channels, ...]``, network k's channels the k-th block, as its first layer's
    grouped convolution (or block matmul) reads them."""
    if feature_major:
        return torch.stack([batch.reshape(batch.shape[0], -1).t() for batch in batches])
    return torch.cat(batches, dim=1)


def per_network_forward(wide: nn.Module, x: torch.Tensor, feature_major: bool = True,
                        class_major: bool = False) -> torch.Tensor:
    """``wide_forward`` of a wide network whose K networks each read their own batch, stacked by ``stack_inputs``
    in the same layout; feature-major inputs are already flat, so the flattening layers are skipped."""
    if not feature_major:
        return wide_forward(wide, x, class_major)
    out = x
    for layer in wide:
        if not isinstance(layer, nn.Flatten):
            out = layer(out)
    return out if class_major else out.transpose(1, 2).contiguous()


def student_state(wide: nn.Module, template: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Student k's state dict, under the names and shapes of the narrow ``template``."""
    wide_state, state = wide.state_dict(), {}
    for name, value in template.state_dict().items():
        whole = wide_state[name]
        state[name] = whole.clone() if value.dim() == 0 else whole.reshape(wide.students, *value.shape)[k].clone()
    return state


def narrow(wide: nn.Module, template: nn.Module, k: int) -> nn.Module:
    """Student k as a network of its own (a copy of ``template`` holding its weights)."""
    model = copy.deepcopy(template)
    model.load_state_dict(student_state(wide, template, k))
    model.train(wide.training)
    return model


def blocks(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """``tensor`` of a wide network as ``[K, -1]``, one row per student (a view)."""
    return tensor.reshape(k, -1)


def can_widen(model: nn.Module, x: torch.Tensor | None = None) -> str | None:
    """None when two copies of ``model`` widen into one network (and, given inputs ``x``, it computes what each
    copy computes); else why not, in a few words."""
    models = [copy.deepcopy(model).eval(), copy.deepcopy(model).eval()]
    try:
        wide = widen(models).eval()
    except NotFusable as exc:
        return str(exc)
    if x is not None:
        with torch.no_grad():
            alone = torch.stack([m(x) for m in models])
            together = wide_forward(fold_batch_norms(copy.deepcopy(wide)), x)
        if together.shape != alone.shape or not torch.allclose(together, alone, rtol=1e-3, atol=1e-4):
            return f"{type(model).__name__} widened does not compute what its students compute"
    return None


def unwidened_students(configs: list[TrialConfig]) -> dict[tuple[str, str, str], str]:
    """Why ``widen`` cannot fuse the students of each user's factory among ``configs`` that it cannot fuse, by
    (student_arch, student_arch_args, dataset); built-in architectures always widen. Each factory is built
    twice (two seeds) and checked on a few seeded random inputs."""
    reasons = {}
    for key, cfg in {(c.student_arch, c.student_arch_args, c.dataset): c for c in configs}.items():
        if not is_user_function(cfg.student_arch):
            continue
        info = dataset_info(cfg.dataset)
        first, second = (build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, seed,
                                      cfg.student_arch_args) for seed in (0, 1))
        x = torch.randn(4, *info.input_shape, generator=torch.Generator().manual_seed(0))
        reason = can_widen(first, x) or (None if type(first) is type(second) else "the factory builds different types")
        if reason:
            reasons[key] = reason
    return reasons
