"""Architectures by name, and the stages of each (``stage_modules``).

Names:

- ``mlp``: flatten, two hidden layers of 256 with norm + ReLU; any input shape.
- ``mlp<D>`` / ``mlp<D>-w<K>``: the same with D hidden layers of 256K units (K may be a fraction such
  as 0.5 when 256K is whole); ``mlp`` is ``mlp2`` and builds exactly as it.
- ``conv1d``: a small 1-D convnet for ``(C, L)`` signals such as mnist1d ``(1, 40)``.
- ``smallcnn``: a small 2-D convnet for tiny images (8x8 digits and up).
- ``lenet5``: LeNet-5 for images of at least 28x28 (28x28 is padded by 2 to the native 32x32).
- ``vgg16``: VGG-16 configuration D without batch norm, CIFAR-style (one linear layer on top of
  global pooling); images of at least 32x32.
- ``preresnet<D>`` / ``preresnet<D>-w<K>``: pre-activation ResNet of depth D and width K (PAPER.md):
  3 stages of 16K/32K/64K filters; basic blocks for D < 44 with (D-2)/6 blocks per stage, bottleneck
  blocks (expansion 4) for D >= 44 with (D-2)/9 blocks per stage.

``norm`` is one of ``batch`` (BatchNorm), ``group`` (GroupNorm with one group: layer-norm-like, so a
network's function depends on its weights alone, which weight interpolation needs) or ``none``.
``mlp``, ``conv1d``, ``smallcnn`` and ``preresnet`` honour it. ``lenet5`` and ``vgg16`` have no
normalisation layers in their published form, so they accept any valid ``norm`` and ignore it.

Every model that receives images (3-D input shape, including ``mlp`` on images) maps its input
x -> (x - 0.5) / 0.5 itself, because image tensors are kept in [0, 1]; 1-D signals (mnist1d) are
already standardised and pass through unchanged.

Stages (``stage_modules``: the modules whose outputs compare one network's representations with
another's, e.g. by CKA), input side first: ``mlp``, each hidden layer after its activation;
``conv1d`` and ``smallcnn``, each conv block (conv, norm, ReLU) after its ReLU; ``lenet5`` and
``vgg16``, each conv block after its max-pooling (2 and 5 blocks); ``preresnet``, its three stages
``layer1``..``layer3`` (the residual stream, before the final norm).

A user's factory (``module:function`` or ``file.py:function``) is built as
``factory(input_shape=..., num_classes=..., **args)`` and must return an ``nn.Module`` mapping
``[N, *input_shape]`` to ``[N, num_classes]`` logits (``check_user_model``); ``norm`` does not apply to it,
and its stages are those its ``stage_names`` attribute names (none: its CKA columns are NaN).

Initialisation uses PyTorch's defaults (plus He init for ``vgg16``, see ``_VGG16``) and draws only
from torch's global generator, so ``torch.manual_seed(s)`` before ``build_model`` fixes the weights.
"""

from __future__ import annotations

import difflib
import json
import math
import re

import torch
from torch import nn

from kd_ray.config import ConfigError, import_user_function, is_user_function

ARCHS: tuple[str, ...] = ("mlp", "conv1d", "smallcnn", "lenet5", "vgg16", "preresnet")
NORMS: tuple[str, ...] = ("batch", "group", "none")

_SIGNAL_ARCHS = ("conv1d",)
_IMAGE_ARCHS = ("smallcnn", "lenet5", "vgg16", "preresnet")
# Smallest spatial size (L for signals, H and W for images) each arch is built for.
_MIN_SIZE = {"conv1d": 8, "smallcnn": 8, "lenet5": 28, "vgg16": 32, "preresnet": 8}
_PRERESNET_RE = re.compile(r"^preresnet(\d+)(?:-w(\d+))?$")
_MLP_RE = re.compile(r"^mlp(\d+)(?:-w(\d+(?:\.\d+)?))?$")
MLP_DEPTH, MLP_HIDDEN = 2, 256  # ``mlp``: hidden layers, and units per hidden layer at width 1
_ARCH_HELP = ("mlp, conv1d, smallcnn, lenet5, vgg16, preresnet<D>[-w<K>] (e.g. preresnet20, preresnet56-w2), "
              "mlp<D>[-w<K>] (e.g. mlp4, mlp2-w0.5)")
USER_FACTORY_CONTRACT = ("factory(input_shape=..., num_classes=..., **args) returning a torch.nn.Module that maps "
                         "[batch, *input_shape] to [batch, num_classes] logits")
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


# ----------------------------------------------------------------------------------------------
# names and validation


def _valid_preresnet_depth(depth: int) -> bool:
    if depth < 44:
        return depth >= 8 and (depth - 2) % 6 == 0
    return (depth - 2) % 9 == 0


def _preresnet_depth_help() -> str:
    basic = ", ".join(str(d) for d in range(8, 44, 6))
    return (
        f"valid depths are {basic} (basic blocks, (D-2) % 6 == 0) or D >= 44 with (D-2) % 9 == 0 "
        "(bottleneck blocks: 47, 56, 65, ..., 110, ..., 164)"
    )


def _parse_mlp(name: str, input_shape: tuple[int, ...], depth: int, width_text: str | None) -> tuple[str, int, float]:
    width = float(width_text) if width_text is not None else 1.0
    hidden = MLP_HIDDEN * width
    if depth < 1 or hidden < 1 or not hidden.is_integer():
        raise ValueError(f"arch {name!r} for input shape {input_shape}: mlp<D>[-w<K>] needs D >= 1 hidden layers "
                         f"and a width K with {MLP_HIDDEN}*K a whole number >= 1 (e.g. mlp4, mlp2-w0.5); "
                         f"got D={depth}, K={width_text or 1}")
    return "mlp", depth, width


def _parse(name: str, input_shape: tuple[int, ...]) -> tuple[str, int, float]:
    """Split a name into (base, depth, width); depth and width are 0 for archs without them."""
    if name == "mlp":
        return "mlp", MLP_DEPTH, 1.0
    if name in ARCHS and name != "preresnet":
        return name, 0, 0
    mlp = _MLP_RE.match(name)
    if mlp is not None:
        return _parse_mlp(name, input_shape, int(mlp.group(1)), mlp.group(2))
    if name == "preresnet":
        raise ValueError(
            f"arch 'preresnet' for input shape {input_shape} needs a depth, preresnet<D>[-w<K>] "
            f"(e.g. preresnet20, preresnet56-w2); {_preresnet_depth_help()}"
        )
    match = _PRERESNET_RE.match(name)
    if match is None:
        candidates = [a for a in ARCHS if a != "preresnet"] + ["preresnet20", "preresnet56", "mlp4", "mlp2-w2"]
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown arch {name!r} for input shape {input_shape}; {hint}known archs: {_ARCH_HELP}"
        )
    depth = int(match.group(1))
    width = int(match.group(2)) if match.group(2) is not None else 1
    if not _valid_preresnet_depth(depth):
        raise ValueError(
            f"arch {name!r} for input shape {input_shape}: preresnet depth {depth} is not valid; "
            f"{_preresnet_depth_help()}"
        )
    if width < 1:
        raise ValueError(
            f"arch {name!r} for input shape {input_shape}: preresnet width must be an integer >= 1 "
            "(preresnet<D>-w<K>)"
        )
    return "preresnet", depth, width


def check_arch(name: str, input_shape: tuple[int, ...], norm: str = "batch") -> None:
    """Raise ValueError with one clear message when ``name`` cannot be built for ``input_shape``; a user's
    factory is judged by building it (``check_user_model``)."""
    input_shape = tuple(input_shape)
    if is_user_function(name):
        return
    if not input_shape or not all(isinstance(d, int) and d >= 1 for d in input_shape):
        raise ValueError(
            f"arch {name!r}: input shape {input_shape} must be a non-empty tuple of positive ints "
            "without the batch dimension, e.g. (1, 40) or (3, 32, 32)"
        )
    base, _, _ = _parse(name, input_shape)
    if norm not in NORMS:
        raise ValueError(
            f"arch {name!r} for input shape {input_shape}: unknown norm {norm!r}; "
            f"allowed: {', '.join(NORMS)}"
        )
    if base in _SIGNAL_ARCHS:
        if len(input_shape) != 2:
            raise ValueError(
                f"arch {name!r} takes 1-D signals of shape (C, L); got input shape {input_shape}"
            )
        if input_shape[1] < _MIN_SIZE[base]:
            raise ValueError(
                f"arch {name!r} needs signals of length L >= {_MIN_SIZE[base]}; "
                f"got input shape {input_shape}"
            )
    if base in _IMAGE_ARCHS:
        if len(input_shape) != 3:
            raise ValueError(
                f"arch {name!r} takes images of shape (C, H, W); got input shape {input_shape}"
            )
        if min(input_shape[1:]) < _MIN_SIZE[base]:
            raise ValueError(
                f"arch {name!r} needs images with H, W >= {_MIN_SIZE[base]}; "
                f"got input shape {input_shape}"
            )


# ----------------------------------------------------------------------------------------------
# building blocks


class _ImageScale(nn.Module):
    """Maps images from [0, 1] to [-1, 1], as the paper's official code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.5


def _norm(norm: str, channels: int, dims: int) -> nn.Module:
    # dims: 1 for [N, C] or [N, C, L] (BatchNorm1d covers both), 2 for [N, C, H, W].
    if norm == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _conv_bias(norm: str) -> bool:
    # A norm layer after a conv has its own shift, so a conv bias would be redundant; without one
    # the conv keeps its bias so the network is not bias-free.
    return norm == "none"


def _mlp(input_shape: tuple[int, ...], num_classes: int, norm: str, depth: int, hidden: int) -> nn.Module:
    layers: list[nn.Module] = [_ImageScale()] if len(input_shape) == 3 else []
    layers.append(nn.Flatten())
    features = math.prod(input_shape)
    for _ in range(depth):  # in this order, so ``mlp`` keeps the layer names and draws of stored teachers
        layers += [nn.Linear(features, hidden, bias=_conv_bias(norm)), _norm(norm, hidden, 1), nn.ReLU(inplace=True)]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _conv1d(input_shape: tuple[int, ...], num_classes: int, norm: str) -> nn.Module:
    channels = input_shape[0]
    bias = _conv_bias(norm)

    def block(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias),
            _norm(norm, c_out, 1),
            nn.ReLU(inplace=True),
        ]

    # Two stride-2 layers give the last layer a receptive field wide enough to see a whole mnist1d
    # digit pattern (~40 samples), so global pooling loses little.
    return nn.Sequential(
        *block(channels, 32, 5, 1),
        *block(32, 64, 3, 2),
        *block(64, 64, 3, 1),
        *block(64, 128, 3, 2),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def _smallcnn(input_shape: tuple[int, ...], num_classes: int, norm: str) -> nn.Module:
    channels = input_shape[0]
    bias = _conv_bias(norm)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out, 2),
            nn.ReLU(inplace=True),
        ]

    # One pooling step only, so an 8x8 image still has a 4x4 map for the second stage.
    return nn.Sequential(
        _ImageScale(),
        *block(channels, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    # 28x28 (MNIST) is padded to LeNet-5's native 32x32; larger inputs are used as they are.
    pad = 2 if min(height, width) < 32 else 0

    def feature_size(size: int) -> int:
        size = (size + 2 * pad - 4) // 2  # conv 5x5, max-pool 2
        return (size - 4) // 2  # conv 5x5, max-pool 2

    flat = 16 * feature_size(height) * feature_size(width)
    return nn.Sequential(
        _ImageScale(),
        nn.Conv2d(channels, 6, 5, padding=pad),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )


class _VGG16(nn.Module):
    """VGG-16 (configuration D) without batch norm; global pooling feeds one linear layer."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ImageScale()]
        c_in = in_channels
        for item in _VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        # Global pooling makes inputs larger than 32x32 work; at 32x32 the map is already 1x1.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        # Without batch norm, 13 stacked convs at PyTorch's default init shrink the signal until
        # training stalls; He init keeps its scale. It draws from the same global generator.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                assert module.bias is not None
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _PreActBasic(nn.Module):
    """norm-ReLU-conv3x3, norm-ReLU-conv3x3, plus the shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = _conv_bias(norm)
        self.norm1 = _norm(norm, c_in, 2)
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = _norm(norm, planes, 2)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, planes * self.expansion, stride, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        out = self.conv2(self.relu(self.norm2(out)))
        return out + self.shortcut(x)


class _PreActBottleneck(nn.Module):
    """norm-ReLU-conv1x1, norm-ReLU-conv3x3 (strided), norm-ReLU-conv1x1 to 4x planes, shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = _conv_bias(norm)
        self.norm1 = _norm(norm, c_in, 2)
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=bias)
        self.norm2 = _norm(norm, planes, 2)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm3 = _norm(norm, planes, 2)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, planes * self.expansion, stride, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        out = self.conv2(self.relu(self.norm2(out)))
        out = self.conv3(self.relu(self.norm3(out)))
        return out + self.shortcut(x)


def _shortcut(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
    # As in the official pre-activation code: identity when shapes match, else a bare strided 1x1
    # conv on the block's raw input.
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)


class PreResNet(nn.Module):
    """Pre-activation ResNet for images; ``layer1``..``layer3`` are the three stages."""

    def __init__(
        self, depth: int, width: int, in_channels: int, num_classes: int, norm: str
    ) -> None:
        super().__init__()
        block: type[_PreActBasic] | type[_PreActBottleneck]
        if depth < 44:
            block, blocks_per_stage = _PreActBasic, (depth - 2) // 6
        else:
            block, blocks_per_stage = _PreActBottleneck, (depth - 2) // 9
        planes = [16 * width, 32 * width, 64 * width]
        self.scale = _ImageScale()
        self.conv = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=_conv_bias(norm))
        c_in = planes[0]
        stages = []
        for index, stage_planes in enumerate(planes):
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks_per_stage):
                stage.append(block(c_in, stage_planes, stride if b == 0 else 1, norm))
                c_in = stage_planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.norm = _norm(norm, c_in, 2)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.scale(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.pool(self.relu(self.norm(out)))
        return self.fc(torch.flatten(out, 1))


# ----------------------------------------------------------------------------------------------
# public entry points


def build_user_model(
    reference: str, input_shape: tuple[int, ...], num_classes: int, args: str = "", field: str = "arch"
) -> nn.Module:
    """The model a user's factory builds: ``factory(input_shape=..., num_classes=..., **json.loads(args))``.

    Raises ``ConfigError`` naming the factory when it does not import, fails, or returns no ``nn.Module``. Its
    stages are the submodules its ``stage_names`` attribute names, if it has one, else none (CKA is then NaN)."""
    factory = import_user_function(field, reference)
    kwargs = json.loads(args) if args else {}
    try:
        model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except Exception as exc:  # whatever the user's factory raises
        raise ConfigError(f"{field}={reference!r} with args {args or '{}'} failed to build "
                          f"({type(exc).__name__}: {exc}); allowed: {USER_FACTORY_CONTRACT}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{field}={reference!r} returned {type(model).__name__}, not a torch.nn.Module; allowed: "
                          f"{USER_FACTORY_CONTRACT}")
    model.stage_names = tuple(getattr(model, "stage_names", ()))
    return model


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, norm: str = "batch", args: str = ""
) -> nn.Module:
    """A freshly initialised float32 model mapping ``[N, *input_shape]`` to ``[N, num_classes]``.

    ``name`` may be a user's factory (``module:function`` or ``file.py:function``, see ``build_user_model``),
    built with the keyword arguments ``args`` (a JSON object); ``norm`` does not apply to it."""
    input_shape = tuple(input_shape)
    if is_user_function(name):
        return build_user_model(name, input_shape, num_classes, args)
    check_arch(name, input_shape, norm)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"arch {name!r}: num_classes must be a positive int; got {num_classes!r}")
    base, depth, width = _parse(name, input_shape)
    model: nn.Module
    if base == "mlp":
        model = _mlp(input_shape, num_classes, norm, depth, int(MLP_HIDDEN * width))
    elif base == "conv1d":
        model = _conv1d(input_shape, num_classes, norm)
    elif base == "smallcnn":
        model = _smallcnn(input_shape, num_classes, norm)
    elif base == "lenet5":
        model = _lenet5(input_shape, num_classes)
    elif base == "vgg16":
        model = _VGG16(input_shape[0], num_classes)
    else:
        model = PreResNet(depth, int(width), input_shape[0], num_classes, norm)
    # Names, not modules: they survive copies and moves of the model unchanged.
    model.stage_names = _stage_names(base, model)
    return model


def check_user_model(
    reference: str, input_shape: tuple[int, ...], num_classes: int, args: str = "", field: str = "arch"
) -> None:
    """Build the user's factory ``reference`` with ``args`` and run it on 2 zero inputs: it must give
    ``[2, num_classes]`` float logits. Raises ``ConfigError`` saying what it gave instead. Torch's global
    generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model = build_user_model(reference, input_shape, num_classes, args, field)
        try:
            with torch.no_grad():
                out = model.eval()(torch.zeros(2, *input_shape))
        except Exception as exc:  # whatever the user's forward raises
            raise ConfigError(f"{field}={reference!r} with args {args or '{}'}: the forward pass on zeros of shape "
                              f"[2, {', '.join(map(str, input_shape))}] failed ({type(exc).__name__}: {exc}); "
                              f"allowed: {USER_FACTORY_CONTRACT}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes) or not out.is_floating_point():
        got = f"shape {list(out.shape)} of {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{field}={reference!r} with args {args or '{}'}: the forward pass on 2 inputs of shape "
                          f"{list(input_shape)} gave {got}; allowed: float logits of shape [2, {num_classes}] "
                          f"({USER_FACTORY_CONTRACT})")
    for stage in model.stage_names:
        try:
            model.get_submodule(stage)
        except AttributeError:
            raise ConfigError(f"{field}={reference!r}: stage_names names {stage!r}, no submodule of the model; "
                              "allowed: names of model.named_modules()") from None


def _stage_names(base: str, model: nn.Module) -> tuple[str, ...]:
    if base == "preresnet":
        return ("layer1", "layer2", "layer3")
    if base == "vgg16":
        assert isinstance(model, _VGG16)
        return tuple(f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d))
    # A lenet5 conv block ends in its pooling (its other ReLUs follow linear layers); the blocks of
    # mlp, conv1d and smallcnn end in their ReLU.
    block_end = nn.MaxPool2d if base == "lenet5" else nn.ReLU
    return tuple(name for name, m in model.named_children() if isinstance(m, block_end))


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``model``'s stages, input side first (the module docstring
    says which for each architecture); ``model`` is one ``build_model`` made."""
    names = getattr(model, "stage_names", None)
    if names is None:
        raise ValueError(f"{type(model).__name__} names no stages: only a model from build_model does")
    return [model.get_submodule(name) for name in names]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
